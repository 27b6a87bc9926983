"""The gateway on stdio, end to end: the official MCP client launches ``envelope mcp wrap``, which
runs the reference servers from PyPI (mcp-server-git on repositories the test makes,
mcp-server-time). Record, derive, enforce; both protocol eras; a rug-pull; broken peers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import anyio
import pytest

from enforcer import audit
from sensor.store import ProfileStore
from sensor.workload import Workload

from tests.unit.mcp_peers import (
    ENVELOPE,
    POISON,
    ROOT,
    envelope,
    errlog,
    git,
    git_server,
    make_repo,
    session,
    text,
    time_server,
    wrap_params,
)

ERAS = {"auto": "2026-07-28", "legacy": "2025-11-25"}


def run(coro_fn, *args):
    return anyio.run(coro_fn, *args)


@pytest.mark.parametrize("era", sorted(ERAS))
def test_record_derive_enforce_with_mcp_server_git(tmp_path, era):
    repo, commits = make_repo(tmp_path / "repo")
    other, _ = make_repo(tmp_path / "other", 1)
    state = tmp_path / "state"
    w = "git-agent"
    # unconfined (no --repository), as it is often run: only the envelope keeps it to one repository

    for s in range(3):  # training: three sessions of the agent's ordinary work
        calls = [("git_status", {"repo_path": str(repo)}),
                 ("git_log", {"repo_path": str(repo), "max_count": 1 + s}),
                 ("git_log", {"repo_path": str(repo), "max_count": 5}),
                 ("git_show", {"repo_path": str(repo), "revision": commits[s]})]
        version, tools, results = run(session, wrap_params(state, w, git_server()), calls, era)
        assert version == ERAS[era]
        assert "git_commit" in {t.name for t in tools}
        assert all(not r.is_error for r in results), [text(r) for r in results]

    evidence = ProfileStore(state).load(Workload.host(w)).arguments()
    log_calls = evidence.calls["mcp:tools/call:git_log"]
    assert log_calls.calls.count == 6 and log_calls.calls.sessions == 3
    assert evidence.catalogs and all("git_commit" in c["tools"] for c in evidence.catalogs.values())

    out = envelope(state, "derive", w, "--substrates", "mcp", "--force", "--min-count", "3", "--min-sessions", "3",
                   "--out", str(tmp_path / "env.yaml"))
    assert out.returncode == 0, out.stderr
    env_text = (tmp_path / "env.yaml").read_text()
    assert "mcp:tools/call:git_log#max_count:range:1..5 integer" in env_text
    assert f"prefix: {repo}" in env_text and "pattern: hash" in env_text

    # held out: the same work with other values inside the envelope passes, in enforce mode
    held_out = [("git_log", {"repo_path": str(repo), "max_count": 4}),
                ("git_show", {"repo_path": str(repo), "revision": commits[3]}),
                ("git_status", {"repo_path": str(repo)})]
    # out of the envelope: another repository, a tool never used
    outside = [("git_log", {"repo_path": str(other), "max_count": 2}),
               ("git_commit", {"repo_path": str(repo), "message": "injected"})]
    params = wrap_params(state, w, git_server(), "--policy", str(tmp_path / "env.yaml"), "--mode", "enforce")
    head = git(repo, "rev-parse", "HEAD")
    with errlog(tmp_path / "enforce.log") as log:
        _, tools, results = run(session, params, held_out + outside, era, log)
    assert {t.name for t in tools} == {"git_log", "git_show", "git_status"}
    assert [r.is_error for r in results] == [False, False, False, True, True]
    assert commits[3] in text(results[1])
    assert "repo_path" in text(results[3]) and "outside the envelope" in text(results[3])
    assert "change 0" not in text(results[3])  # the server never ran it
    assert "not in the allowlist" in text(results[4])
    assert git(repo, "rev-parse", "HEAD") == head  # nothing was committed
    stderr = (tmp_path / "enforce.log").read_text()
    assert stderr.count("mcp call denied") == 2

    # alert mode: the same calls run, and are reported
    params = wrap_params(state, w, git_server(), "--policy", str(tmp_path / "env.yaml"), "--mode", "alert")
    with errlog(tmp_path / "alert.log") as log:
        _, tools, results = run(session, params, outside[:1], era, log)
    assert "git_commit" in {t.name for t in tools}
    assert not results[0].is_error and "change 0" in text(results[0])
    assert "mcp call alerted" in (tmp_path / "alert.log").read_text()


def test_a_changed_tool_description_is_detected(tmp_path):
    state = tmp_path / "state"
    w = "time-agent"
    for tz in ("Europe/Paris", "Asia/Tokyo", "Europe/Paris"):
        _, _, results = run(session, wrap_params(state, w, time_server()),
                            [("get_current_time", {"timezone": tz})] * 2)
        assert not results[0].is_error
    out = envelope(state, "derive", w, "--substrates", "mcp", "--force", "--min-count", "2", "--min-sessions", "1",
                   "--out", str(tmp_path / "env.yaml"))
    assert out.returncode == 0, out.stderr

    # the server now describes the same tool differently: a rug pull
    for mode in ("enforce", "alert"):
        params = wrap_params(state, w, time_server(POISON), "--policy", str(tmp_path / "env.yaml"), "--mode", mode)
        with errlog(tmp_path / f"{mode}.log") as log:
            _, tools, results = run(session, params, [("get_current_time", {"timezone": "Europe/Paris"})], "auto", log)
        if mode == "enforce":
            assert "get_current_time" not in {t.name for t in tools}
            assert results[0].is_error and "changed since the policy was derived" in text(results[0])
        else:
            assert [t.description for t in tools if t.name == "get_current_time"] == [POISON]
            assert not results[0].is_error
        assert "tool definition changed" in (tmp_path / f"{mode}.log").read_text()
    stale = audit.read(state, action="policy.stale")
    assert len(stale) == 2 and stale[0]["details"]["tools"] == ["get_current_time"]
    assert audit.verify(state).ok


def _exchange(proc, line: bytes) -> dict:
    proc.stdin.write(line + b"\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_malformed_and_oversized_messages_from_the_client(tmp_path):
    state = tmp_path / "state"
    cmd = [*ENVELOPE, "--state-dir", str(state), "mcp", "wrap", "--workload", "raw", "--max-message-bytes",
           "65536", "--", *time_server()]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        r = _exchange(proc, b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {')
        assert r["id"] is None and r["error"]["code"] == -32700
        r = _exchange(proc, b'[{"jsonrpc":"2.0","id":2,"method":"tools/list"}]')
        assert "batches" in r["error"]["message"]
        r = _exchange(proc, b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_current_time",'
                            b'"arguments":{"timezone":"' + b"A" * 200_000 + b'"}}}')
        assert r["id"] == 3 and "exceeds" in r["error"]["message"]
        r = _exchange(proc, json.dumps({"jsonrpc": "2.0", "id": 4, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}).encode())
        assert r["id"] == 4 and r["result"]["protocolVersion"] == "2025-11-25"
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        r = _exchange(proc, b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_current_time",'
                            b'"arguments":{"timezone":"UTC"}}}')
        assert r["id"] == 5 and r["result"]["isError"] is False
    finally:
        proc.stdin.close()
        rc = proc.wait(30)
        stderr = proc.stderr.read().decode()
    assert rc == 0, stderr
    assert stderr.count("mcp message not relayed") == 3
    ev = ProfileStore(state).load(Workload.host("raw")).arguments()
    assert list(ev.calls) == ["mcp:tools/call:get_current_time"] and ev.calls["mcp:tools/call:get_current_time"].calls.count == 1


def test_a_broken_server_cannot_crash_the_gateway(tmp_path):
    """A server that prints junk on stdout before speaking MCP, and answers with a message over the limit."""
    repo, commits = make_repo(tmp_path / "repo", 1)
    (repo / "big.txt").write_text("x" * 300_000 + "\n")
    git(repo, "add", "big.txt")
    git(repo, "commit", "-q", "-m", "big file")
    big = git(repo, "rev-parse", "HEAD")
    noisy = ["sh", "-c", 'printf "starting server...\\n{\\"jsonrpc\\": 1}\\n"; exec "$@"', "sh", *git_server(repo)]
    state = tmp_path / "state"
    params = wrap_params(state, "noisy", noisy, "--max-message-bytes", "131072")
    calls = [("git_show", {"repo_path": str(repo), "revision": big}),
             ("git_show", {"repo_path": str(repo), "revision": commits[0]})]
    with errlog(tmp_path / "log") as log:
        _, tools, results = run(session, params, calls, "auto", log)
    assert len(tools) > 5
    assert isinstance(results[0], Exception) and "limit" in str(results[0])
    assert not results[1].is_error and "change 0" in text(results[1])
    stderr = (tmp_path / "log").read_text()
    assert stderr.count("mcp message not relayed") == 3  # two junk lines, one oversized answer
    ev = ProfileStore(state).load(Workload.host("noisy")).arguments()
    assert ev.calls["mcp:tools/call:git_show"].calls.count == 2


def test_bad_invocations_are_one_line_errors(tmp_path):
    from enforcer.policy import Policy, dump_policy

    kernel_only = tmp_path / "kernel.yaml"
    kernel_only.write_text(dump_policy(Policy(Workload.host("w"), syscalls=("read",))))
    other = tmp_path / "other.yaml"
    other.write_text(dump_policy(Policy(Workload.host("someone-else"), substrates=("mcp",))))
    for args, needle in ((["mcp", "wrap", "--workload", "w", "--mode", "enforce", "--", "true"], "needs --policy"),
                         (["mcp", "wrap", "--workload", "w", "--policy", str(tmp_path / "none.yaml"), "--", "true"],
                          "cannot read"),
                         (["mcp", "wrap", "--workload", "w", "--policy", str(kernel_only), "--", "true"],
                          "does not include the mcp substrate"),
                         (["mcp", "wrap", "--workload", "w", "--policy", str(other), "--", "true"],
                          "is for workload host/Unit/someone-else/main"),
                         (["mcp", "wrap", "--workload", "w", "--", "/nonexistent/server"], "cannot start"),
                         (["derive", "nobody", "--substrates", "mcp"], "no profile for workload"),
                         (["mcp", "proxy", "--workload", "w", "--listen", "nope", "--upstream", "http://x/mcp"],
                          "HOST:PORT")):
        out = envelope(tmp_path / "state", *args)
        assert out.returncode == 2, (args, out.stderr)
        err = [line for line in out.stderr.splitlines() if line.startswith("envelope: error:")]
        assert len(err) == 1 and needle in err[0], out.stderr
    (tmp_path / "bad.yaml").write_text("apiVersion: envelope.dev/v1alpha1\nkind: McpEnvelope\nspec: []\n")
    out = envelope(tmp_path / "state", "mcp", "wrap", "--workload", "w", "--policy", str(tmp_path / "bad.yaml"),
                   "--", "true")
    assert out.returncode == 2 and "kind: 'McpEnvelope' is not LeastPrivilegePolicy" in out.stderr
    out = envelope(tmp_path / "state", "mcp", "derive", "--workload", "w")  # retired: envelope derive does it
    assert out.returncode == 2 and "invalid choice: 'derive'" in out.stderr


def test_the_server_exit_status_is_passed_through(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([*ENVELOPE, "--state-dir", str(tmp_path), "mcp", "wrap", "--workload", "w", "--",
                          sys.executable, "-c", "import sys; sys.exit(7)"], cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=30)
    assert out.returncode == 7 and out.stdout == b"" and time.monotonic() - t0 < 30
