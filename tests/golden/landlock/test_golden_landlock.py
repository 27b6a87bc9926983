"""Golden Landlock artefacts: the research-agent fixture's file behaviours derived through
:func:`enforcer.derive.derive` (``--substrates exec,file``), compiled with its exec needs into
byte-exact launcher ruleset file and landlockconfig JSON.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 python -m pytest tests/golden/landlock``
and review the diff like code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jsonschema

from enforcer.landlock_formats import dump_landlockconfig, landlockconfig, parse_ruleset_file, ruleset_file
from enforcer.landlock_rules import ExecNeeds, compile_policy
from enforcer.policy import dump_policy, load_policy
from tests.file_profiles import derive_files, file_profile

HERE = Path(__file__).resolve().parent
POLICY = HERE.parent / "compiled" / "policies" / "research-agent.yaml"
SCHEMA = HERE.parents[1] / "fixtures" / "landlockconfig" / "landlockconfig.schema.json"


def inputs():
    raw = json.loads((HERE / "research-agent.files.json").read_text())["behaviours"]
    fixture = load_policy(POLICY)
    profile = file_profile({k: tuple(v) for k, v in raw.items()}, workload=fixture.workload)
    needs_raw = json.loads((HERE / "research-agent.exec-needs.json").read_text())
    needs = {k: ExecNeeds(tuple(v["execute"]), tuple(v["read"]), tuple(v.get("notes", ())))
             for k, v in needs_raw.items() if k != "comment"}
    return fixture, profile, needs


def artefacts() -> dict[str, str]:
    fixture, profile, needs = inputs()
    # derive --substrates file --file-tree-depth 1, default thresholds (5 over 3): this agent writes
    # one directory per session under /tmp, which only a /tmp/** tree can admit
    derived = derive_files(profile, file_tree_depth=1)
    policy = dataclasses.replace(fixture, substrates=fixture.substrates + ("file",), files=derived.files)
    compiled = compile_policy(policy, exec_needs=needs)
    return {
        "research-agent.files.policy.yaml": dump_policy(derived),
        "research-agent.compiled.json": json.dumps(compiled.to_dict(), indent=2, sort_keys=True) + "\n",
        "research-agent.ruleset": ruleset_file(compiled),
        "research-agent.landlockconfig.json": dump_landlockconfig(landlockconfig(compiled)),
    }


def test_golden_landlock():
    got = artefacts()
    for name, text in got.items():
        expected = HERE / name
        if os.environ.get("UPDATE_GOLDEN"):
            expected.write_text(text)
        assert expected.exists(), f"missing {name}; run with UPDATE_GOLDEN=1"
        assert text == expected.read_text(), f"{name} differs from the golden file"
    assert artefacts() == got  # deterministic


def test_golden_outputs_say_what_the_fixture_shows():
    derived = load_policy(HERE / "research-agent.files.policy.yaml")
    allowed = {p["entry"]: p["rule"] for p in derived.provenance}
    assert allowed["file:read:/usr/lib/python3.11/__pycache__/*"] == "directory-children"
    assert allowed["file:read:/opt/agent/site/**"] == "directory-tree"
    # per-session output directories /tmp/agent-N/out.json, one session each, earn /tmp/** together
    assert allowed["file:write:/tmp/**"] == "directory-tree"
    assert allowed["file:mkdir:/tmp/*"] == "directory-children"
    assert allowed["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"] == "exact:sensitive"
    reviewed = {r["key"] for r in derived.review}
    assert "file:read:/root/.aws/credentials" in reviewed  # sensitive, below the threshold
    assert "file:read:/var/run/secrets/kubernetes.io/serviceaccount/namespace" in reviewed
    parsed, _ = parse_ruleset_file((HERE / "research-agent.ruleset").read_text())
    objects = {(r.path, r.object): r.rights for r in parsed.rules}
    assert objects[("/usr/bin/git", "file")] == ("execute", "read_file")
    assert objects[("/usr/local/bin", "tree")] == ("execute", "read_file")
    assert objects[("/tmp", "tree")] == ("write_file", "make_dir", "make_reg")
    doc = json.loads((HERE / "research-agent.landlockconfig.json").read_text())
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(doc)
