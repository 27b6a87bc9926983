"""The launcher's ruleset file (v1) and the landlockconfig JSON export."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from enforcer.landlock_formats import (RulesetFileError, dump_landlockconfig, landlockconfig,
                                       landlockconfig_gaps, parse_ruleset_file, ruleset_file)
from enforcer.landlock_rules import ExecNeeds, compile_ruleset

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "landlockconfig"
                     / "landlockconfig.schema.json").read_text())
W = "agents/Deployment/research-agent/agent"
FILES = ["file:read:/etc/resolv.conf", "file:read:/usr/lib/python3.11/*", "file:read:/home/agent/*",
         "file:create:/tmp/out/r.json", "file:write:/tmp/out/r.json", "file:list:/srv/my data"]
NEEDS = {"/usr/bin/python3": ExecNeeds(("/lib64/ld-linux-x86-64.so.2",), ("/lib/x86_64-linux-gnu/libc.so.6",))}


@pytest.fixture
def compiled():
    return compile_ruleset(W, execs=["/usr/bin/python3"], files=FILES, exec_needs=NEEDS)


def test_ruleset_file_round_trips(compiled):
    text = ruleset_file(compiled)
    assert text.startswith("envelope-landlock 1\n") and text.endswith("\nend\n")
    parsed, on_unsupported = parse_ruleset_file(text)
    assert on_unsupported == "refuse"
    assert parsed.handled_fs == compiled.handled_fs
    assert parsed.restrict_flags == ("log_new_exec_on",)
    assert [(r.path, r.object, r.rights, r.exclude) for r in parsed.rules] == \
        [(r.path, r.object, r.rights, r.exclude) for r in compiled.rules]
    assert "tree read_dir /srv/my data\n" in text  # a path runs to the end of the line
    assert ruleset_file(compiled, "best-effort").count("on_unsupported best-effort") == 1


@pytest.mark.parametrize("mutate, error", [
    (lambda t: t.replace("envelope-landlock 1", "envelope-landlock 2"), "line 1"),
    (lambda t: t.replace("\nend\n", "\n"), "truncated"),
    (lambda t: t.replace("file execute,read_file /usr/bin/python3", "file execute,fly /usr/bin/python3"),
     "unknown right 'fly'"),
    (lambda t: t.replace("handled_fs execute,", "handled_fs "), "not in handled_fs"),
    (lambda t: t.replace("restrict_flags", "restrict_flagz"), "unknown record"),
    (lambda t: t + "extra\n", "after end"),
])
def test_bad_ruleset_files_are_refused_with_the_line(compiled, mutate, error):
    with pytest.raises(RulesetFileError, match=error):
        parse_ruleset_file(mutate(ruleset_file(compiled)))


def test_unwritable_paths_are_refused():
    c = compile_ruleset(W, files=["file:read:/tmp/x"])
    bad = c.__class__(c.workload, c.handled_fs, (c.rules[0].__class__("/tmp/a\tb", "file", ("read_file",)),))
    with pytest.raises(RulesetFileError):
        ruleset_file(bad)


def test_landlockconfig_validates_against_its_schema(compiled):
    with pytest.raises(RulesetFileError, match="children rule on /home/agent"):
        landlockconfig(compiled)
    doc = landlockconfig(compiled, {"/home/agent": ["/home/agent/notes.md", "/home/agent/plan.txt"]})
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    assert doc["abi"] == 5
    assert doc["ruleset"] == [{"handledAccessFs": list(compiled.handled_fs)}]
    groups = {tuple(x["allowedAccess"]): x["parent"] for x in doc["pathBeneath"]}
    assert groups[("execute", "read_file")] == ["/lib64/ld-linux-x86-64.so.2", "/usr/bin/python3"]
    assert "/home/agent/notes.md" in groups[("read_file",)]
    assert any("log_new_exec_on" in g for g in landlockconfig_gaps(compiled))


def test_landlockconfig_formatting_matches_jq(compiled, tmp_path):
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq not installed (make setup installs it)")
    text = dump_landlockconfig(landlockconfig(compiled, {"/home/agent": ["/home/agent/ünï"]}))
    p = tmp_path / "c.json"
    p.write_text(text)
    assert subprocess.run([jq, "."], stdin=p.open(), capture_output=True, text=True, check=True).stdout == text


def test_exec_only_export_has_no_reads():
    doc = landlockconfig(compile_ruleset(W, execs=["/usr/bin/git"]))
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    # refer is handled and granted everywhere: any ruleset would otherwise deny reparenting
    assert doc == {"abi": 2, "ruleset": [{"handledAccessFs": ["execute", "refer"]}],
                   "pathBeneath": [{"allowedAccess": ["execute"], "parent": ["/usr/bin/git"]},
                                   {"allowedAccess": ["refer"], "parent": ["/"]}]}
