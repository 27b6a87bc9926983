"""Scenario: a small Python agent is recorded over five sessions (file and exec behaviours, with
strace standing in for the kernel's file observation), a policy is derived (exec closure from
:mod:`enforcer.derive` with ``--substrates exec,file``), compiled to a Landlock
ruleset with what its execs need, and enforced on new runs: the legitimate run does all its work
(reads its data, runs the /usr/bin/sort helper, writes its result into a new directory), while a
prompt-injected run's /bin/sh and its read of a credentials file outside the envelope are refused
and reported through Landlock's audit records, with path, access and process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from enforcer import kernel_audit, landlock
from enforcer.derive import DeriveOptions, derive
from enforcer.exec_needs import resolve
from enforcer.landlock_denials import DenialAssembler
from enforcer.landlock_rules import compile_policy
from sensor.profile import Profile
from sensor.workload import Workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strace_files import record  # noqa: E402

AGENT = Path(__file__).resolve().parent / "workloads" / "landlock_agent.py"
PYTHON = "/usr/bin/python3"
ENV = {"LANG": "C", "PATH": "/usr/bin:/bin"}
W = Workload("host", "Unit", "landlock-agent", "main")
SESSIONS = 5
T0 = 1_767_225_600.0


def argv(root: Path, session: str, *extra: str) -> list[str]:
    return [PYTHON, "-S", "-B", str(AGENT), str(root), session, *extra]


@pytest.fixture(scope="module")
def envelope(tmp_path_factory):
    root = tmp_path_factory.mktemp("landlock-agent")
    for d in ("data", "out", "secrets"):
        (root / d).mkdir()
    (root / "data/words.txt").write_text("pear\napple\nfig\n")
    for n in ("notes.md", "plan.md", "refs.md", "todo.md"):
        (root / "data" / n).write_text(f"# {n}\n")
    (root / "secrets/credentials").write_text("[default]\naws_secret_access_key = not-a-real-key\n")

    profile = Profile(W)
    node = profile.node("n1")
    for i in range(SESSIONS):
        sid = f"s{i}"
        keys, proc = record(argv(root, sid), str(root / f"trace-{i}"), env=ENV)
        assert proc.returncode == 0, proc.stderr
        start = T0 + i * 3600
        node.open_session(sid, start)
        for k, c in sorted(keys.items()):
            node.observe(sid, k, c, start + 1)
        node.close_session(sid, start + 60)
    node.touch(T0 + SESSIONS * 3600 + 2 * 86400)
    three = {s: 3 for s in ("syscall", "egress", "exec", "file")}
    policy = derive(profile, DeriveOptions(substrates=("exec", "file"), min_count=three, min_sessions=three,
                                           mode="enforce"))
    derived = policy
    compiled = compile_policy(policy, exec_needs=resolve(policy.execs))
    return root, policy, derived, compiled


def test_derived_envelope_is_what_the_agent_did(envelope):
    root, policy, derived, compiled = envelope
    assert policy.execs == ("/usr/bin/python3", "/usr/bin/sort")
    rules = {p["entry"]: p["rule"] for p in derived.provenance}
    assert rules[f"file:read:{root}/data/*"] == "directory-children"
    assert rules[f"file:create:{root}/out/**"] == "directory-tree"  # a new run-N directory per session
    assert rules[f"file:mkdir:{root}/out/*"] == "directory-children"
    assert not any("secrets" in e for e in rules)
    assert {e for e in rules if e.startswith("exec:")} == {"exec:/usr/bin/python3", "exec:/usr/bin/sort"}
    objects = {(r.path, r.object) for r in compiled.rules}
    assert ("/usr/bin/sort", "file") in objects and ("/lib64/ld-linux-x86-64.so.2", "file") in objects
    assert compiled.abi == 5 and "execute" in compiled.handled_fs


def test_legitimate_run_passes_under_the_ruleset(envelope):
    root, _, _, compiled = envelope
    with landlock.Ruleset.build(compiled) as rs:
        assert not rs.gaps
        p = subprocess.run(argv(root, "enforced"), capture_output=True, text=True, env=ENV, timeout=60,
                           preexec_fn=landlock.preexec(rs))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["sorted"] == ["apple", "fig", "pear"] and report["sort_rc"] == 0
    assert set(report["sizes"]) == {"words.txt", "notes.md", "plan.md", "refs.md", "todo.md"}
    assert json.loads((root / "out/run-enforced/result.json").read_text())["session"] == "enforced"


def test_injected_shell_and_credentials_read_are_refused_and_reported(envelope):
    root, _, _, compiled = envelope
    with kernel_audit.AuditLease(), kernel_audit.AuditReader() as reader:
        with landlock.Ruleset.build(compiled) as rs:
            p = subprocess.Popen(argv(root, "injected", "--inject"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=ENV, preexec_fn=landlock.preexec(rs))
            out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        report = json.loads(out)
        assert report["sh"] == "EACCES" and report["credentials"] == "EACCES"
        assert report["sorted"] == ["apple", "fig", "pear"]  # the legitimate part still worked
        assembler, denials = DenialAssembler(), []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len([d for d in denials if d.pid == p.pid or d.ppid == p.pid]) < 2:
            for t, text in reader.read():
                denials += assembler.feed(t, text)
            time.sleep(0.05)
        denials += assembler.flush()
    mine = [d for d in denials if d.pid == p.pid or d.ppid == p.pid]
    by_path = {d.path: d for d in mine}
    cred = by_path[str(root / "secrets/credentials")]
    assert cred.behaviours() == (f"file:read:{root}/secrets/credentials",) and cred.pid == p.pid
    assert cred.comm == "python3" and cred.syscall == "openat"
    sh = by_path[os.path.realpath("/bin/sh")]
    assert sh.blockers == ("fs.execute", "fs.read_file") and sh.ppid == p.pid and sh.syscall == "execve"
    # nothing else the agent did was refused
    assert Counter(d.path for d in mine) == Counter({str(root / "secrets/credentials"): 1,
                                                     os.path.realpath("/bin/sh"): 1})
