"""The policy's mcp section through the CLI: derive, explain and diff show MCP entries with their
rules and evidence, from a profile the gateway's sink wrote (pure evidence, real commands)."""

from __future__ import annotations

import json
import subprocess
import sys

from enforcer.derive import derive
from enforcer.diff import diff
from enforcer.policy import dump_policy
from envelope.commands.explain import explanation, render_text
from sensor.mcp_evidence import TOOLS_LIST, tool_call_key
from sensor.store import ProfileStore

from tests.unit.mcp_profiles import options, record

LOG, STATUS, COMMIT = tool_call_key("git_log"), tool_call_key("git_status"), tool_call_key("git_commit")


def sessions(max_counts, commit: bool) -> list:
    calls = []
    for s, n in enumerate(max_counts):
        calls += [(f"s{s}", TOOLS_LIST, {}), (f"s{s}", STATUS, {"repo_path": "/srv/repo"}),
                  (f"s{s}", LOG, {"repo_path": "/srv/repo", "max_count": n})]
        if commit:
            calls.append((f"s{s}", COMMIT, {"repo_path": "/srv/repo", "message": f"change {s}"}))
    return calls


def envelope(state, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)


def test_derive_cli_writes_the_mcp_section_and_explain_shows_rules_and_evidence(tmp_path):
    state = tmp_path / "state"
    ProfileStore(state).save(record(sessions([1, 2, 3, 4], commit=False)))
    out = envelope(state, "derive", "agent", "--substrates", "mcp", "--force", "--max-values", "2",
                   "--min-count", "3", "--out", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    assert "2 MCP tools and prompts" in out.stderr
    text = (tmp_path / "p.yaml").read_text()
    assert "mcp:\n      catalog: {}\n      methods:\n      - tools/list\n" in text
    out = envelope(state, "explain", str(tmp_path / "p.yaml"))
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if line.startswith(f"{LOG}#max_count")][0]
    assert "range" in row and "threshold" in row and "from 1 to 4" in row and "seen: 1, 2, 3, 4" in row
    assert "mcp: exact-tools+argument-envelopes" in out.stdout and "enumeration up to 2 values" in out.stdout
    got = json.loads(envelope(state, "explain", str(tmp_path / "p.yaml"), "-o", "json").stdout)
    by = {a["entry"]: a for a in got["allowed"]}
    assert by[f"{LOG}#repo_path:path-prefix:/srv/repo/**"]["values"] == ["/srv/repo"]
    assert by[STATUS]["count"] == 4 and by[STATUS]["sessions"] == 4 and got["mcpCatalog"] == {}
    out = envelope(state, "profile", "show", "agent", "--substrate", "mcp", "-o", "json")
    assert {b["key"] for b in json.loads(out.stdout)["behaviours"]} == {TOOLS_LIST, STATUS, LOG}


def test_diff_names_mcp_tools_and_argument_changes():
    old = derive(record(sessions([1, 2, 3, 4], commit=False)), options())
    new = derive(record(sessions([1, 5, 9, 10], commit=True)), options())
    d = diff(old, new)
    added = {a["entry"]: a for a in d["added"]}
    removed = {r["entry"]: r for r in d["removed"]}
    assert added[COMMIT]["rule"] == "exact"
    assert added[f"{LOG}#max_count:range:1..10 integer"]["previously"] == \
        "argument 'max_count' was range 1..4 integer in the old policy"
    assert added[f"{COMMIT}#repo_path:path-prefix:/srv/repo/**"]["previously"] == \
        f"{COMMIT} was not allowed by the old policy"
    assert removed[f"{LOG}#max_count:range:1..4 integer"]["why"] == "argument 'max_count' is now range 1..10 integer"
    back = diff(new, old)
    assert {r["entry"]: r["why"] for r in back["removed"]}[COMMIT].startswith("not part of the new policy")
    assert {r["entry"]: r["why"] for r in back["removed"]}[f"{COMMIT}#repo_path:path-prefix:/srv/repo/**"] == \
        f"{COMMIT} is not allowed by the new policy"
    assert diff(old, old)["identical"]
    text = render_text(explanation(new))
    reviewed = [line for line in text.splitlines() if line.startswith(f'{COMMIT}#message:enum:"change 0"')]
    assert reviewed and "count 1 < 3; sessions 1 < 3" in reviewed[0]
    assert f'{COMMIT}#message:enum:"change 0"' in new.watch
    assert dump_policy(new) == dump_policy(derive(record(sessions([1, 5, 9, 10], commit=True)), options()))
