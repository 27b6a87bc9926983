"""Golden Landlock artefacts: the research-agent fixture's file behaviours and exec needs in,
byte-exact derived file entries, launcher ruleset file and landlockconfig JSON out.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 python -m pytest tests/golden/landlock``
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema

from enforcer.file_closure import derive_files
from enforcer.landlock_formats import dump_landlockconfig, landlockconfig, parse_ruleset_file, ruleset_file
from enforcer.landlock_rules import ExecNeeds, compile_policy
from enforcer.policy import load_policy
from sensor.profile import BehaviourStats

HERE = Path(__file__).resolve().parent
POLICY = HERE.parent / "compiled" / "policies" / "research-agent.yaml"
SCHEMA = HERE.parents[1] / "fixtures" / "landlockconfig" / "landlockconfig.schema.json"
T0 = 1_767_225_600.0


def inputs():
    raw = json.loads((HERE / "research-agent.files.json").read_text())["behaviours"]
    stats = {k: BehaviourStats(c, s, T0 + h * 3600, T0 + h * 3600 + 600, session_ids=[f"s{h + i}" for i in range(s)])
             for k, (c, s, h) in raw.items()}
    needs_raw = json.loads((HERE / "research-agent.exec-needs.json").read_text())
    needs = {k: ExecNeeds(tuple(v["execute"]), tuple(v["read"]), tuple(v.get("notes", ())))
             for k, v in needs_raw.items() if k != "comment"}
    return stats, needs


def artefacts() -> dict[str, str]:
    stats, needs = inputs()
    derived = derive_files(stats)
    compiled = compile_policy(load_policy(POLICY), files=derived.entries(), exec_needs=needs)
    return {
        "research-agent.files.derived.json": json.dumps(derived.to_dict(), indent=2, sort_keys=True) + "\n",
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
    derived = json.loads((HERE / "research-agent.files.derived.json").read_text())
    allowed = {e["entry"]: e["rule"] for e in derived["allowed"]}
    assert allowed["file:read:/usr/lib/python3.11/__pycache__/*"] == "directory-children"
    assert allowed["file:read:/opt/agent/site/**"] == "directory-tree"
    assert allowed["file:write:/tmp/**"] == "directory-tree"
    assert allowed["file:read:/var/run/secrets/kubernetes.io/serviceaccount/token"] == "exact:sensitive"
    reviewed = {r["key"] for r in derived["review"]}
    assert "file:read:/root/.aws/credentials" in reviewed  # sensitive, below the threshold
    assert "file:read:/var/run/secrets/kubernetes.io/serviceaccount/namespace" in reviewed
    parsed, _ = parse_ruleset_file((HERE / "research-agent.ruleset").read_text())
    objects = {(r.path, r.object): r.rights for r in parsed.rules}
    assert objects[("/usr/bin/git", "file")] == ("execute", "read_file")
    assert objects[("/usr/local/bin", "tree")] == ("execute", "read_file")
    assert objects[("/tmp", "tree")] == ("write_file", "make_dir", "make_reg")
    doc = json.loads((HERE / "research-agent.landlockconfig.json").read_text())
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(doc)
