"""Real programs under policies derived from their own recorded sessions (see real_programs.py).

For each of seven programs: six varied sessions are recorded with ``envelope record``, a policy
is derived with the defaults (``--force``: the sessions span seconds, not a day), and then under
``envelope exec --mode enforce``

* each of four held-out legitimate variations must do its work with nothing denied;
* each abuse must fail (EPERM from seccomp or the egress programs, EACCES from Landlock) and be
  reported as a denial. A shell spawned by a program whose policy lets execve through (it
  legitimately execs helpers) is denied by Landlock's execute rights; where this kernel has no
  Landlock that can restrict exec, ``envelope exec`` can only report it, and the test then
  asserts that report.

The measured rates are bench/bench_real_programs.py's (BENCHMARKS.md).
"""

from __future__ import annotations

import os

import pytest

from tests.privileged import real_programs as rp


def landlock_restricts_exec() -> bool:
    """Can ``envelope exec --mode enforce`` restrict exec paths here (Landlock's execute right)?"""
    from enforcer import landlock
    from enforcer.landlock_rules import EXEC_HANDLED
    try:
        return set(EXEC_HANDLED) <= landlock.probe().fs
    except landlock.LandlockUnavailable:
        return False


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    work = tmp_path_factory.mktemp("real-programs")
    s = rp.Suite(work, rp.build_injected(work))
    s.listener = rp.Listener()
    s.prepared = {}
    s.outcomes = {}
    yield s
    s.listener.close()


def prepared(suite, name: str):
    """Program ``name`` recorded over its sessions and derived (once per module)."""
    if name not in suite.prepared:
        prog = rp.build_program(name, suite.work / name, suite.listener.port)
        recorded = [suite.record(name, run, f"s{i}-{run.name}") for i, run in enumerate(prog.sessions)]
        policy = suite.derive(name)
        suite.prepared[name] = (prog, policy, recorded)
    return suite.prepared[name]


def abuse_outcome(suite, name: str, run: rp.Run) -> rp.Outcome:
    key = (name, run.name)
    if key not in suite.outcomes:
        _, policy, _ = prepared(suite, name)
        suite.outcomes[key] = suite.enforce(name, policy, run)
    return suite.outcomes[key]


@pytest.mark.parametrize("name", list(rp.PROGRAMS))
def test_sessions_are_recorded_doing_real_work(suite, name):
    from enforcer.policy import load_policy
    prog, policy_file, recorded = prepared(suite, name)
    for run, out in zip(prog.sessions, recorded):
        assert out.problem == "", f"{name} session {run.name}: {out.problem}\n{out.stderr[-2000:]}"
        assert out.violations == []  # recording enforces nothing
    policy = load_policy(policy_file)
    assert policy.syscalls and policy.low_confidence  # forced: a window of seconds
    assert policy.review_action("syscall") == "alert" and policy.review_action("egress") == "deny"
    assert "process_vm_readv" not in policy.syscalls and "ptrace" not in policy.syscalls
    assert not any(e.endswith("/*") for e in policy.execs if e.startswith(("/usr/bin", "/bin")))


@pytest.mark.parametrize("name,index", [(n, i) for n in rp.PROGRAMS for i in range(rp.HOLDOUTS)])
def test_held_out_variation_passes_under_enforce(suite, name, index):
    prog, policy, _ = prepared(suite, name)
    run = prog.holdouts[index]
    out = suite.enforce(name, policy, run)
    assert out.problem == "", f"{name} {run.name} did not do its work: {out.problem}\n{out.stderr[-2000:]}"
    assert out.denied == [], f"{name} {run.name}: false denial {[(v['behaviour'], v['detail']) for v in out.denied]}"
    assert "when one recurs under enforce mode" in out.stderr or "no behaviours in review" in out.stderr


def ruleset_lets_run(policy, path: str) -> bool:
    """Whether the Landlock ruleset ``envelope exec`` builds for ``policy`` grants execute on
    ``path`` (an exec entry, or the interpreter or loader an allowed exec needs)."""
    from enforcer.exec_needs import resolve
    from enforcer.landlock_rules import compile_policy
    real = os.path.realpath(path)
    compiled = compile_policy(policy, exec_needs=resolve(policy.execs))
    for r in compiled.rules:
        if "execute" not in r.rights:
            continue
        base = os.path.realpath(r.path)
        if (r.object == "file" and base == real) or (r.object == "tree" and real.startswith(base + "/")) \
                or (r.object == "children" and os.path.dirname(real) == base):
            return True
    return False


@pytest.mark.parametrize("name,abuse", [(n, a) for n, abuses in rp.ABUSES.items() for a in abuses])
def test_abuse_is_denied_and_reported(suite, name, abuse):
    from enforcer.policy import load_policy
    from enforcer.seccomp import needs_exec
    prog, policy_file, _ = prepared(suite, name)
    run, check = prog.abuse(abuse)
    out = abuse_outcome(suite, name, run)
    verdict, detail = rp.abuse_verdict(out, check)
    launched = {run.argv[0], os.path.realpath(run.argv[0])}
    policy = load_policy(policy_file)
    if check.reported is not None and needs_exec(policy, launched) \
            and (not landlock_restricts_exec() or ruleset_lets_run(policy, "/bin/sh")):
        # the program execs helpers, so execve is let through, and exec paths are not enforced
        # (no Landlock), or the ruleset must let the shell run (the interpreter of an allowed
        # script: Landlock's execute right cannot say "only as an interpreter"): the spawn
        # must be reported
        assert verdict == "reported", f"{name} {abuse}: {verdict}: {detail}"
    else:
        assert verdict == "denied", f"{name} {abuse}: {verdict}: {detail}\n{out.stderr[-2000:]}"
    assert suite.listener.accepted == 0, "a connection got through to the abuse listener"
