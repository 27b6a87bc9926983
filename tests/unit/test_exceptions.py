"""Expiring exceptions, per-workload mode and re-baseline: state files, expiry against explicit
clocks, auditing of every change, and the CLI's one-line errors."""

from __future__ import annotations

import json

import pytest

from enforcer import audit, exceptions, state
from envelope.cli import main
from sensor.profile import Profile
from sensor.store import ProfileStore
from sensor.workload import Workload

W = Workload("agents", "Deployment", "research-agent", "main")
T0 = 1800000000.0


@pytest.fixture
def sd(tmp_path):
    """A state dir with one recorded workload."""
    p = Profile(W)
    c = p.node("node-a")
    c.open_session("s1", T0 - 100)
    c.observe("s1", "syscall:read", 3, T0 - 90)
    ProfileStore(tmp_path).save(p)
    return tmp_path


def cli(sd, *args) -> int:
    return main(["--state-dir", str(sd), *args])


# ---- TTL and keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,secs", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                       ("1h30m", 5400), ("1d2h3m4s", 93784), ("1.5h", 5400),
                                       ("2w", 14 * 86400)])
def test_parse_ttl(text, secs):
    assert exceptions.parse_ttl(text) == secs


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "-1h", "0s", "31d", "5w", "2h 30m", "30m2h"])
def test_parse_ttl_rejects(text):
    with pytest.raises(exceptions.ExceptionError):
        exceptions.parse_ttl(text)


@pytest.mark.parametrize("key,norm", [
    ("syscall:ptrace", "syscall:ptrace"),
    ("exec:/usr/bin/curl", "exec:/usr/bin/curl"),
    ("connect:tcp:10.0.0.1:443", "connect:tcp:10.0.0.1:443"),
    ("send:udp:[2001:db8:0::1]:53", "send:udp:[2001:db8::1]:53"),
    ("egress:tcp:10.0.0.0/24:443,8443", "egress:tcp:10.0.0.0/24:443,8443"),
    ("egress:tcp:10.0.0.0/24:8000-8100", "egress:tcp:10.0.0.0/24:8000-8100"),
    ("mcp:tools/call:git_commit", "mcp:tools/call:git_commit"),
    ("mcp:tools/call:git_log#repo_path", "mcp:tools/call:git_log#repo_path"),
    ("mcp:prompts/get:summarise#style", "mcp:prompts/get:summarise#style"),
    ("mcp:resources/read:file:///logs/{name}", "mcp:resources/read:file:///logs/{name}"),
    ("mcp:tools/list", "mcp:tools/list"),
])
def test_normalise_key(key, norm):
    assert exceptions.normalise_key(key) == norm


@pytest.mark.parametrize("key", ["ptrace", "syscall:Bad-Name", "exec:relative", "connect:tcp:nohost:1",
                                 "connect:icmp:10.0.0.1:1", "egress:tcp:10.0.0.0/33:443", "dns:x",
                                 "smtp:x", "mcp:tools/call", "mcp:delete:x", "mcp:tools/call:git_log#",
                                 "mcp:tools/list#x", "mcp:tools/call:git_log#max_count:range:1..5"])
def test_normalise_key_rejects(key):
    with pytest.raises(exceptions.ExceptionError):
        exceptions.normalise_key(key)


# ---- expiry against explicit clocks ---------------------------------------------------------------


def test_exception_active_until_ttl_then_lapses(sd):
    e = exceptions.add(sd, W, "syscall:ptrace", "2h", reason="debug session", actor="alice", now=T0)
    assert e.expires == T0 + 7200
    assert [x.id for x in exceptions.active_exceptions(sd, W, T0)] == [e.id]
    assert [x.id for x in exceptions.active_exceptions(sd, W, T0 + 7199.9)] == [e.id]
    assert exceptions.active_exceptions(sd, W, T0 + 7200) == []
    assert exceptions.active_exceptions(sd, W, T0 - 1) == []  # not before it was made
    assert exceptions.syscall_allowances(sd, W, T0 + 1) == {"ptrace": f"exception:{e.id}"}
    assert exceptions.syscall_allowances(sd, W, T0 + 8000) == {}
    assert exceptions.active_exceptions(sd, Workload("x", "Deployment", "y", "z"), T0) == []


def test_next_expiry(sd):
    assert exceptions.next_expiry(sd, W, T0) is None
    exceptions.add(sd, W, "syscall:ptrace", "2h", reason="a", now=T0)
    exceptions.add(sd, W, "connect:tcp:10.0.0.9:443", "30m", reason="b", now=T0 + 60)
    assert exceptions.next_expiry(sd, W, T0 + 61) == T0 + 60 + 1800
    assert exceptions.next_expiry(sd, W, T0 + 1900) == T0 + 7200
    assert exceptions.next_expiry(sd, None, T0 + 7300) is None


def test_allows_matching(sd):
    e = exceptions.add(sd, W, "egress:tcp:10.0.0.0/24:8000-8100", "1h", reason="x", now=T0)
    assert e.allows("connect:tcp:10.0.0.77:8080")
    assert not e.allows("connect:tcp:10.0.1.77:8080")
    assert not e.allows("connect:udp:10.0.0.77:8080")
    c = exceptions.add(sd, W, "connect:tcp:10.0.0.1:443", "1h", reason="x", now=T0 + 1)
    assert c.allows("send:tcp:10.0.0.1:443") and not c.allows("connect:tcp:10.0.0.1:444")
    assert c.substrate == "egress" and e.substrate == "egress"


def test_add_is_audited_and_revoke_ends_it(sd):
    e = exceptions.add(sd, W, "syscall:ptrace", "2h", reason="debug", actor="alice", now=T0)
    exceptions.revoke(sd, e.id, reason="done", actor="bob", now=T0 + 10)
    assert exceptions.active_exceptions(sd, W, T0 + 11) == []
    es = audit.read(sd)
    assert [(x["action"], x["actor"], x["reason"]) for x in es] == [
        ("exception.add", "alice", "debug"), ("exception.revoke", "bob", "done")]
    assert es[0]["details"]["allow"] == "syscall:ptrace" and es[0]["details"]["ttl_seconds"] == 7200
    assert audit.verify(sd).ok
    with pytest.raises(exceptions.ExceptionError, match="not active"):
        exceptions.revoke(sd, e.id, reason="again", now=T0 + 12)


def test_failed_audit_leaves_no_exception(sd):
    audit.append(sd, "mode.set", reason="x", now=T0)
    with open(audit.log_path(sd), "ab") as f:
        f.write(b'{"torn')  # a partial last line: appends refuse
    with pytest.raises(audit.AuditError):
        exceptions.add(sd, W, "syscall:ptrace", "2h", reason="debug", now=T0)
    assert exceptions.load_all(sd) == []


# ---- mode and re-baseline ---------------------------------------------------------------------------


def test_mode_default_set_and_audited(sd):
    assert state.get_mode(sd, W) == "observe"
    state.set_mode(sd, W, "enforce", reason="reviewed", actor="alice", now=T0)
    assert state.get_mode(sd, W) == "enforce"
    (e,) = audit.read(sd)
    assert e["action"] == "mode.set" and e["details"] == {"from": None, "to": "enforce"}
    state.set_mode(sd, W, "alert", reason="noisy", actor="bob", now=T0 + 1)
    assert audit.read(sd)[-1]["details"] == {"from": "enforce", "to": "alert"}
    with pytest.raises(state.StateError):
        state.set_mode(sd, W, "permissive", reason="x")
    with pytest.raises(state.StateError):
        state.set_mode(sd, W, "enforce", reason="  ")


def test_failed_audit_rolls_mode_back(sd):
    state.set_mode(sd, W, "alert", reason="start", now=T0)
    with open(audit.log_path(sd), "ab") as f:
        f.write(b"partial")
    with pytest.raises(audit.AuditError):
        state.set_mode(sd, W, "observe", reason="sneaky", now=T0 + 1)
    assert state.get_mode(sd, W) == "alert"


def test_rebaseline_archives_profile_and_moves_to_alert(sd):
    state.set_mode(sd, W, "enforce", reason="go", now=T0)
    store = ProfileStore(sd)
    original = store.path_for(W).read_bytes()
    s = state.rebaseline(sd, W, reason="new model version", actor="alice", now=T0 + 60)
    assert s["mode"] == "alert" and s["rebaseline"]["generation"] == 1
    assert not store.path_for(W).exists()  # a new window starts empty
    archived = sd / "profiles" / "archive" / "20270115T080100Z" / store.path_for(W).name
    assert archived.read_bytes() == original
    assert s["rebaseline"]["archive"] == str(archived)
    assert store.workloads() == []  # archived profiles are not live ones
    e = audit.read(sd)[-1]
    assert e["action"] == "rebaseline" and e["details"]["from"] == "enforce"
    assert e["details"]["archived_profile"] == str(archived)
    # the workload stays known through its state; a second rebaseline in the same second
    s2 = state.rebaseline(sd, W, reason="again", now=T0 + 60)
    assert s2["rebaseline"]["generation"] == 2 and s2["rebaseline"]["archive"] is None
    assert state.rebaseline_generation(sd, W) == 2


def test_resolve_workload(sd):
    assert state.resolve_workload(sd, "research-agent") == W
    assert state.resolve_workload(sd, "agents/research-agent") == W
    assert state.resolve_workload(sd, W.key) == W
    with pytest.raises(state.StateError, match="unknown workload"):
        state.resolve_workload(sd, "nope")
    with pytest.raises(state.StateError, match="unknown workload"):
        state.resolve_workload(sd, "ns/Deployment/new/main")
    new = state.resolve_workload(sd, "ns/Deployment/new/main", allow_new=True)
    assert new == Workload("ns", "Deployment", "new", "main")
    with pytest.raises(state.StateError, match="unknown workload"):
        state.resolve_workload(sd, "new", allow_new=True)  # a bare name never adds one


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cli_exception_flow(sd, capsys):
    assert cli(sd, "exception", "add", "research-agent", "--allow", "syscall:ptrace", "--ttl", "2h",
               "--reason", "debugging a hang") == 0
    out = capsys.readouterr().out
    assert "may syscall:ptrace until" in out
    assert cli(sd, "exception", "list", "-o", "json") == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["allow"] == "syscall:ptrace" and item["active"] is True
    assert 7100 < item["remaining_seconds"] <= 7200
    assert cli(sd, "exception", "revoke", item["id"], "--reason", "fixed") == 0
    capsys.readouterr()
    assert cli(sd, "exception", "list", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli(sd, "exception", "list", "--all", "-o", "json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.mark.parametrize("args,msg", [
    (["--allow", "syscall:ptrace", "--ttl", "2 hours"], "--ttl"),
    (["--allow", "ptrace", "--ttl", "2h"], "not a behaviour key"),
    (["--allow", "connect:tcp:10.0.0.1:99999", "--ttl", "2h"], "port"),
    (["--allow", "mcp:tools/call", "--ttl", "2h"], "not an mcp behaviour key"),
])
def test_cli_exception_bad_input_one_line(sd, capsys, args, msg):
    assert cli(sd, "exception", "add", "research-agent", *args, "--reason", "x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err and err.startswith("envelope: error:")
    assert exceptions.load_all(sd) == []


def test_cli_unknown_workload(sd, capsys):
    assert cli(sd, "exception", "add", "ghost", "--allow", "syscall:ptrace", "--ttl", "2h",
               "--reason", "x") == 2
    assert "unknown workload 'ghost'" in capsys.readouterr().err
    assert cli(sd, "mode", "ghost", "enforce", "--reason", "x") == 2
    assert cli(sd, "rebaseline", "ghost", "--reason", "x") == 2
    # a full key registers a workload through its first mode change, then it is known
    assert cli(sd, "mode", "ns/Deployment/ghost/main", "alert", "--reason", "pre-set") == 0
    assert cli(sd, "exception", "add", "ghost", "--allow", "syscall:ptrace", "--ttl", "2h",
               "--reason", "x") == 0


def test_cli_mode_and_rebaseline(sd, capsys):
    assert cli(sd, "mode", "research-agent", "enforce", "--reason", "reviewed") == 0
    assert "mode observe -> enforce" in capsys.readouterr().out
    assert cli(sd, "mode", "research-agent", "alert") == 2  # a change needs a reason
    capsys.readouterr()
    assert cli(sd, "mode", "-o", "json") == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["mode"] == "enforce" and s["reason"] == "reviewed"
    assert cli(sd, "rebaseline", "research-agent", "--reason", "new prompt template") == 0
    assert "mode alert" in capsys.readouterr().out
    assert state.get_mode(sd, W) == "alert"
    assert [e["action"] for e in audit.read(sd)] == ["mode.set", "rebaseline"]
    assert cli(sd, "audit", "verify") == 0
