"""Golden compiled artefacts: every fixture policy under tests/golden/compiled/policies compiles,
through the real ``envelope compile`` command, to the byte-identical files beside it.

Regenerate after a deliberate change with ``ENVELOPE_UPDATE_GOLDEN=1 pytest tests/unit -k golden``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envelope.cli import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "compiled"
POLICIES = sorted((GOLDEN / "policies").glob("*.yaml"))
FORMATS = {"oci-seccomp": "oci.json", "spo": "spo.yaml", "networkpolicy": "networkpolicy.yaml",
           "cilium": "cilium.yaml"}


def compile_to(tmp_path, policy: Path, fmt: str) -> bytes:
    out = tmp_path / f"{policy.stem}.{FORMATS[fmt]}"
    rc = main(["--state-dir", str(tmp_path / "state"), "compile", str(policy), "--format", fmt,
               "--out", str(out)])
    assert rc == 0
    return out.read_bytes()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.stem)
def test_golden(tmp_path, policy, fmt):
    got = compile_to(tmp_path, policy, fmt)
    expected = GOLDEN / f"{policy.stem}.{FORMATS[fmt]}"
    if os.environ.get("ENVELOPE_UPDATE_GOLDEN"):
        expected.write_bytes(got)
    assert expected.exists(), f"missing golden file {expected}; run with ENVELOPE_UPDATE_GOLDEN=1"
    assert got == expected.read_bytes()


def test_fixtures_present():
    assert len(POLICIES) >= 3
