"""The derive, explain, diff, replay and validity commands through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import yaml

from envelope.cli import main
from enforcer.policy import load_policy
from sensor.profile import Profile
from sensor.store import ProfileStore
from sensor.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600.0
DAY = 86400.0


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` configures structlog to write to the sys.stderr of the moment, which is pytest's
    capture stream here; reset it afterwards so later tests do not log into a closed stream."""
    yield
    structlog.reset_defaults()


def agent_profile(workload=Workload("research", "Deployment", "agent", "main"), growing=False) -> Profile:
    p = Profile(workload)
    n = p.node("n1")
    for i in range(4):
        start = T0 + i * DAY
        n.open_session(f"s{i}", start)
        for k, c in {"syscall:read": 10, "syscall:openat": 3, "exec:/usr/bin/git": 2,
                     "connect:tcp:10.0.3.7:443": 2}.items():
            n.observe(f"s{i}", k, c, start + 1)
        if i == 0:
            n.observe("s0", "exec:/usr/bin/curl", 1, start + 2)
        n.close_session(f"s{i}", start + 3600)
    if growing:
        n.open_session("s9", T0 + 4 * DAY)
        n.observe("s9", "syscall:memfd_create", 1, T0 + 4 * DAY)
    n.add_fingerprint("model", "m1", T0)
    n.touch(T0 + 4 * DAY + 3600)
    return p


@pytest.fixture
def state(tmp_path):
    store = ProfileStore(tmp_path / "state")
    store.save(agent_profile())
    return tmp_path / "state"


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # usage errors exit from the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("envelope: error: ")
    return lines[0]


def test_derive_from_store_to_file_and_stdout(state, tmp_path, capsys):
    out_file = tmp_path / "p.yaml"
    code, out, err = run(capsys, "--state-dir", state, "derive", "agent", "--out", out_file)
    assert code == 0 and out == ""
    assert "derived agent-main" in err and "1 in review" in err
    pol = load_policy(out_file)
    assert pol.execs == ("/usr/bin/git",) and pol.watch == ("exec:/usr/bin/curl",)
    code, out, _ = run(capsys, "--state-dir", state, "derive", "research/agent", "-o", "json",
                       "--closure", "literal", "--substrates", "syscall,exec")
    assert code == 0 and json.loads(out)["spec"]["decisions"]["granularity"]["substrates"] == ["syscall", "exec"]


def test_derive_admit_fingerprint_expiry(state, tmp_path, capsys):
    out_file = tmp_path / "p.json"
    code, _, err = run(capsys, "--state-dir", state, "derive", "agent", "-o", "json", "--out", out_file,
                       "--admit", "exec:/usr/bin/curl", "--reason", "release notes; SEC-12",
                       "--fingerprint", "identity=sa/agent", "--expires-in", "14d",
                       "--min-sessions", "egress=2")
    assert code == 0, err
    pol = load_policy(out_file)
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["exec:/usr/bin/curl"]["reason"] == "release notes; SEC-12"
    assert pol.validity["fingerprint"] == {"identity": ["sa/agent"], "model": ["m1"]}
    assert pol.validity["expiresAt"] == "2026-01-19T01:00:00Z"
    assert pol.decisions["confidence"]["minSessions"]["egress"] == 2


@pytest.mark.parametrize("argv,expect", [
    (["derive", "agent", "--closure", "fuzzy"], "unknown closure 'fuzzy'"),
    (["derive", "agent", "--min-count", "-1"], "--min-count: -1 is negative"),
    (["derive", "agent", "--min-sessions", "exec=-3"], "--min-sessions: -3 is negative"),
    (["derive", "agent", "--substrates", "syscall,dns"], "unknown substrate 'dns'"),
    (["derive", "agent", "--admit", "exec:/usr/bin/curl"], "--admit needs --reason"),
    (["derive", "agent", "--admit", "exec:/bin/nope", "--reason", "x"], "not in the review list"),
    (["derive", "agent", "--expires-in", "soon"], "--expires-in: 'soon' is not a duration"),
    (["derive", "agent", "-o", "table"], "argument -o/--output: invalid choice: 'table'"),
    (["derive", "nobody"], "no profile for workload 'nobody'"),
])
def test_derive_bad_input_is_one_clear_line(state, capsys, argv, expect):
    code, out, err = run(capsys, "--state-dir", state, *argv)
    assert code == 2 and out == ""
    assert expect in one_line_error(err)


def test_ambiguous_name(state, capsys):
    ProfileStore(state).save(agent_profile(Workload("other", "Deployment", "agent", "main")))
    code, _, err = run(capsys, "--state-dir", state, "derive", "agent")
    assert code == 2 and "ambiguous" in one_line_error(err)


def test_malformed_profile(state, tmp_path, capsys):
    store = ProfileStore(state)
    store.path_for(Workload("research", "Deployment", "agent", "main")).write_bytes(b"\x93garbage")
    code, _, err = run(capsys, "--state-dir", state, "derive", "research/agent")
    assert code == 2 and "corrupt or truncated profile" in one_line_error(err)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "workload": {"namespace": "a"}, "nodes": []}))
    code, _, err = run(capsys, "derive", bad)
    assert code == 2 and f"{bad}: malformed profile" in one_line_error(err)


def test_coverage_stop_refusal_and_force(tmp_path, capsys):
    store = ProfileStore(tmp_path)
    store.save(agent_profile(growing=True))
    code, _, err = run(capsys, "--state-dir", tmp_path, "derive", "agent")
    line = one_line_error(err)
    assert code == 1 and "coverage-stop not reached" in line and "1 new syscall" in line and "--force" in line
    code, out, err = run(capsys, "--state-dir", tmp_path, "derive", "agent", "--force")
    assert code == 0 and "LOW CONFIDENCE" in err
    doc = yaml.safe_load(out)
    assert doc["spec"]["mode"] == "alert" and doc["spec"]["decisions"]["confidence"]["lowConfidence"] is True


def test_unknown_api_version_is_one_line(tmp_path, state, capsys):
    p = tmp_path / "p.yaml"
    run(capsys, "--state-dir", state, "derive", "agent", "--out", p)
    p.write_text(p.read_text().replace("envelope.dev/v1alpha1", "envelope.dev/v9"))
    for argv in (["explain", p], ["diff", p, p], ["replay", p, "agent"], ["validity", "check", p]):
        code, out, err = run(capsys, "--state-dir", state, *argv)
        assert code == 2 and out == ""
        assert f"{p}: apiVersion: 'envelope.dev/v9' is not supported" in one_line_error(err)


def test_cli_error_via_subprocess(state):
    r = subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), "derive", "agent",
                        "--closure", "fuzzy"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "envelope: error: unknown closure 'fuzzy' (want one of literal, structural, probabilistic)"]


def test_explain_diff_replay_validity(state, tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    run(capsys, "--state-dir", state, "derive", "agent", "--closure", "literal", "--out", a)
    run(capsys, "--state-dir", state, "derive", "agent", "--out", b, "--expires-in", "2d")

    code, out, _ = run(capsys, "explain", b)
    assert code == 0
    assert "syscall-group:file-open" in out and "Review (1 below threshold" in out
    assert "exec:/usr/bin/curl" in out and "Coverage-stop: reached" in out and "model=m1" in out
    code, out, _ = run(capsys, "explain", b, "-o", "json")
    x = json.loads(out)
    assert {e["entry"] for e in x["allowed"]} >= {"syscall:openat2", "egress:tcp:10.0.3.0/24:443"}
    assert x["coverage"]["reached"] is True and x["watch"] == ["exec:/usr/bin/curl"]

    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1 and "+  egress:tcp:10.0.3.0/24:443" in out
    assert "its evidence is covered by egress:tcp:10.0.3.0/24:443" in out
    code, out, _ = run(capsys, "diff", b, b)
    assert code == 0 and "no differences" in out

    code, out, _ = run(capsys, "--state-dir", state, "replay", b, "agent")
    assert code == 0 and "would deny 1 behaviours" in out and "exec:/usr/bin/curl" in out
    code, out, _ = run(capsys, "--state-dir", state, "replay", b, "agent", "--strict", "-o", "json")
    assert code == 1 and json.loads(out)["denied"][0]["key"] == "exec:/usr/bin/curl"

    code, out, _ = run(capsys, "validity", "check", b, "--current", "model=m1", "--at", "2026-01-06T00:00:00Z")
    assert code == 0 and "valid" in out
    code, out, _ = run(capsys, "validity", "check", b, "--current", "model=m2", "--at", "2026-01-06T00:00:00Z")
    assert code == 1 and "STALE" in out and "model changed" in out
    code, out, _ = run(capsys, "validity", "check", b, "--current", "model=m1", "--at", "2026-02-01T00:00:00Z",
                       "-o", "json")
    assert code == 1 and [t["trigger"] for t in json.loads(out)["triggers"] if t["fired"]] == ["expiry"]
