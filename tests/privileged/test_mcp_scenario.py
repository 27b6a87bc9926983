"""Scenario: an agent's MCP tool calls recorded, derived and enforced together with its kernel
behaviour. ``envelope record`` observes the agent (real BPF, a real cgroup) while its MCP server
(mcp-server-git on a repository the test makes) runs behind ``envelope mcp wrap``; ``envelope
derive --substrates syscall,egress,exec,mcp`` makes one policy; ``envelope exec --mode enforce``
runs the agent again under its seccomp filter and egress programs while the gateway, in the
workload's mode, refuses a ``git_log`` on another repository in-band. The gateway and the server
run inside the enforced cgroup under the derived seccomp filter: what they need was recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sensor.store import ProfileStore
from sensor.workload import Workload

pytest.importorskip("mcp_server_git")

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tests" / "privileged" / "workloads" / "mcp_agent.py"
SESSIONS = 3


def envelope(state, *args, **kw):
    return subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, **kw)


def make_repo(path: Path) -> Path:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    path.mkdir(parents=True)
    for cmd in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "start"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)
    return path


def config(state: Path, workload: str, policy: Path | None) -> Path:
    args = ["-m", "envelope.cli", "--state-dir", str(state), "mcp", "wrap", "--workload", workload]
    args += ["--policy", str(policy)] if policy else []
    args += ["--", sys.executable, "-m", "mcp_server_git"]
    path = state.parent / ("enforced.json" if policy else "mcp.json")
    path.write_text(json.dumps({"mcpServers": {"git": {"command": sys.executable, "args": args}}}))
    return path


def test_mcp_and_kernel_behaviour_recorded_derived_and_enforced_together(tmp_path):
    state = tmp_path / "state"
    w = f"mcp-scenario-{os.getpid()}"
    repo, other = make_repo(tmp_path / "notes"), make_repo(tmp_path / "keys")
    agent = ["/usr/bin/python3", str(AGENT), "--repo", str(repo)]
    cfg = config(state, w, None)
    for task in range(SESSIONS):
        out = envelope(state, "record", "--workload", w, "--", *agent, "--task", str(task), "--mcp-config", str(cfg))
        assert out.returncode == 0, out.stderr
        assert "mcp tools offered: 12" in out.stdout and "REFUSED" not in out.stdout
    profile = ProfileStore(state).load(Workload.host(w))
    stats = profile.behaviours()
    assert (stats["mcp:tools/call:git_log"].count, stats["mcp:tools/call:git_log"].sessions) == (SESSIONS, SESSIONS)
    assert "exec:/usr/bin/git" in stats and any(k.startswith("syscall:") for k in stats)
    policy = tmp_path / "policy.yaml"
    out = envelope(state, "derive", w, "--substrates", "syscall,egress,exec,mcp", "--force", "--min-count", "3",
                   "--out", str(policy))
    assert out.returncode == 0, out.stderr
    assert envelope(state, "mode", w, "enforce", "--reason", "scenario").returncode == 0
    enforced = config(state, w, policy)
    out = envelope(state, "exec", "--policy", str(policy), "--mode", "enforce", "--", *agent, "--task", "1",
                   "--mcp-config", str(enforced))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mcp tools offered: 2" in out.stdout and "REFUSED" not in out.stdout
    out = envelope(state, "exec", "--policy", str(policy), "--mode", "enforce", "--", *agent, "--task", "1",
                   "--mcp-config", str(enforced), "--other-repo", str(other))
    assert out.returncode == 3, out.stdout + out.stderr
    refused = [line for line in out.stdout.splitlines() if "another repository" in line]
    assert refused and "REFUSED" in refused[0] and "outside the envelope" in refused[0]
    listed = json.loads(envelope(state, "violations", "--workload", w, "-o", "json").stdout)
    mcp = [v for v in listed if v["substrate"] == "mcp"]
    assert [(v["behaviour"], v["action"], v["detail"]["entry"]) for v in mcp] == [
        ("mcp:tools/call:git_log", "denied", "mcp:tools/call:git_log#repo_path")]
    # The kernel denies only what the policy left in review: behaviours seen in too few sessions
    # (GitPython, inside the MCP server, kills its helper processes when the garbage collector
    # runs, so kill(2) shows up in some sessions and not others).
    from enforcer.policy import load_policy

    watched = set(load_policy(policy).watch)
    kernel = [v for v in listed if v["substrate"] != "mcp"]
    if not profile.loss():  # events lost while recording (a loaded machine) leave behaviours unseen
        assert all(v["substrate"] in ("syscall", "watch") and v["behaviour"] in watched for v in kernel), listed
    assert envelope(state, "audit", "verify").returncode == 0
