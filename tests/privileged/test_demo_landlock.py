"""``make demo`` end to end (``python -m envelope.demo``): the demo agent is recorded, a policy of
every kernel substrate (syscall, egress, exec, file) is derived, and under ``envelope exec
--mode enforce`` the legitimate variation runs clean while the prompt-injected one has its
connect, syscall, shell and credentials read denied and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_passes_under_its_derived_policy_with_landlock_on(tmp_path):
    state = tmp_path / "demo"
    env = dict(os.environ, ENVELOPE_DEMO_STATE=str(state))  # the demo picks free ports itself
    p = subprocess.run([sys.executable, "-m", "envelope.demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    policy = (state / "policy.yaml").read_text()
    assert "- file" in policy and "- exec" in policy  # granularity: the file substrate is derived
    violations = [json.loads(line) for line in (state / "violations.jsonl").read_text().splitlines()]
    def shown(v):  # the credentials file sits in a fresh directory under /run
        b = v["behaviour"]
        return "file:read:<credentials>" if b.endswith("/.aws/credentials") else b
    denied = sorted((v["substrate"], shown(v)) for v in violations if v["action"] == "denied")
    assert denied == [("egress", "connect:tcp:127.0.1.66:4444"), ("exec", "exec:/bin/sh"),
                      ("file", "file:read:<credentials>"), ("mcp", "mcp:tools/call:git_log"),
                      ("syscall", "syscall:ptrace")], violations
    # what got through the ruleset and is outside the policy (the MCP gateway, inside the agent's
    # cgroup here, reads the policy and writes the audit log in the demo's state dir under /tmp,
    # which the agent's /tmp/* entries open as a Landlock hierarchy) is reported, as alerted
    alerted = [v for v in violations if v["action"] == "alerted" and v["substrate"] == "file"]
    assert all(v["detail"]["enforced"] is True for v in alerted)
    cred = next(v for v in violations if v["substrate"] == "file" and v["action"] == "denied")
    assert cred["behaviour"].startswith("file:read:/run/envelope-demo-") and cred["detail"]["syscall"] == "openat"
    out = p.stdout
    assert "spawn /bin/sh: EACCES" in out and "read credentials: EACCES" in out
