"""The enforcement session's logic, without root: all or nothing, rollback, adoption, removal,
exceptions, violations and denial watching, on the in-memory kernel of tests/fakes/kernel.py.

The kernel itself (that connects are really denied, that pins survive) is tested in
tests/privileged/test_egress_pinning.py with the real back end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from enforcer import audit, exceptions
from enforcer.desired import desired_path, read_desired
from enforcer.egress import pin_dir_for
from enforcer.policy import EgressRule, Policy
from enforcer.seccomp import EXEC_RULE, profile_for
from enforcer.session import ApplyError, EnforcementSession
from sensor.events import EgressViolationRecord
from sensor.workload import Workload
from tests.fakes.kernel import FakeKernel

W = Workload.host("agent")
POD = Workload("agents", "Deployment", "research-agent", "agent")


def policy(workload=W, cidrs=("10.0.3.0/24",), mode="enforce", syscalls=("read", "write")):
    return Policy(workload, mode=mode, substrates=("syscall", "egress"),
                  syscalls=syscalls, egress=tuple(EgressRule("tcp", c, (443,)) for c in cidrs))


@pytest.fixture
def env(tmp_path):
    cg = tmp_path / "cgroup"
    paths = []
    for name in ("a", "b", "c"):
        (cg / name).mkdir(parents=True)
        paths.append(str(cg / name))
    kernel = FakeKernel()
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    state = tmp_path / "state"

    def session(**kw):
        return EnforcementSession(state, bpffs=bpffs, backend=kernel, **kw)
    return kernel, session, paths, state, bpffs


def test_apply_attaches_swaps_records_desired_state_and_audits(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    results = s.apply(policy(), "enforce", paths[:2], reason="first")
    assert [r.attached for r in results] == [True, True]
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    assert pinned.attached == set(paths[:2]) and pinned.mode == "enforce" and len(pinned.rules) == 1
    [(w, p, mode)] = read_desired(state)
    assert w == W and mode == "enforce" and (p.egress, p.syscalls) == (policy().egress, policy().syscalls)
    [entry] = audit.read(state, action="policy.apply")
    assert entry["workload"] == W.key and entry["details"]["attached"] == paths[:2]


def test_a_failed_attach_leaves_nothing(env):
    kernel, session, paths, state, bpffs = env
    kernel.fail_attach.add(paths[1])
    s = session()
    with pytest.raises(ApplyError) as err:
        s.apply(policy(), "enforce", paths)
    assert "rolled back" in str(err.value) and paths[1] in str(err.value)
    assert [(r.cgroup, r.ok) for r in err.value.results] == [(paths[0], True), (paths[1], False)]
    assert not pin_dir_for(bpffs, W.key).exists()  # created in this call: unpinned again
    assert kernel.pins == {} and kernel.swaps == []
    assert not desired_path(state, W).exists()
    assert audit.read(state) == []
    assert s.enforced == {}


def test_a_failed_swap_keeps_the_previous_rules_and_attachments(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(cidrs=("10.0.3.0/24",)), "alert", paths[:1])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    before = (pinned.rules, pinned.mode, set(pinned.attached))
    kernel.fail_write = True
    with pytest.raises(ApplyError, match="rolled back"):
        s.apply(policy(cidrs=("10.0.3.0/24", "10.0.4.0/24")), "enforce", paths)
    assert (pinned.rules, pinned.mode, set(pinned.attached)) == before  # paths[1:] detached again
    [(_, p, mode)] = read_desired(state)
    assert mode == "alert" and p.egress == policy(cidrs=("10.0.3.0/24",)).egress
    assert [e["action"] for e in audit.read(state)] == ["policy.apply"]


def test_bad_input_touches_nothing(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    with pytest.raises(ApplyError, match="does not exist; nothing applied"):
        s.apply(policy(), "enforce", [paths[0], "/nonexistent/cgroup"])
    many = tuple(f"10.{i // 256}.{i % 256}.0/24" for i in range(20000))
    with pytest.raises(ApplyError, match="exceed the map capacity"):
        s.apply(policy(cidrs=many), "enforce", paths[:1])
    assert kernel.loads == 0 and not (bpffs / "envelope").exists()


def test_a_restarted_session_adopts_what_is_pinned(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(), "enforce", paths[:2])
    other = Workload.host("orphan")
    kernel.load_egress(other.key, pin_dir_for(bpffs, other.key), s.limits)  # no desired state
    s.close()
    loads = kernel.loads
    s2 = session()
    assert s2.adopt_pinned() == [W.key]
    assert kernel.loads == loads  # nothing reloaded or re-attached
    assert s2.enforced[W.key].cgroups == set(paths[:2])
    assert s2.attach_new_cgroup(W, paths[2]).attached
    assert kernel.state_of(pin_dir_for(bpffs, W.key)).attached == set(paths)


def test_remove_detaches_unpins_forgets_and_audits(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(), "enforce", paths[:2])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    assert s.remove(W, reason="decommissioned")
    assert pinned.attached == set() and not pin_dir_for(bpffs, W.key).exists()
    assert not desired_path(state, W).exists()
    assert audit.read(state, action="policy.remove")[0]["reason"] == "decommissioned"
    assert not s.remove(W)


def test_exceptions_reach_the_rules_and_lapse(env):
    kernel, session, paths, state, bpffs = env
    now = [1000.0]
    s = session(clock=lambda: now[0])
    s.apply(policy(), "enforce", paths[:1])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    assert len(pinned.rules) == 1
    exceptions.add(state, W, "connect:tcp:10.9.9.9:8443", "1h", reason="vendor trial", now=now[0])
    assert s.sync() == [W.key]
    assert len(pinned.rules) == 2
    assert s.sync() == []  # nothing changed
    now[0] += 7200
    assert s.sync() == [W.key]
    assert len(pinned.rules) == 1
    assert [e["action"] for e in audit.read(state, action="exceptions.sync")] == ["exceptions.sync"] * 2


def test_violations_come_out_of_one_poll(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(), "enforce", paths[:1])
    prog = s.enforced[W.key].program
    rec = EgressViolationRecord.pack(type=EgressViolationRecord.type, version=EgressViolationRecord.version,
                                     size=EgressViolationRecord.size(), cgroup_id=7, pid=42,
                                     family=2, protocol=6, addr=bytes([127, 0, 1, 66]) + b"\0" * 12,
                                     port=4444, op=0, action=1)
    kernel.emit(prog.events_fd, rec)
    kernel.emit(prog.events_fd, rec)
    kernel.emit(prog.events_fd, b"\x01\x00")  # truncated: counted, not raised
    [v] = s.poll_violations()
    assert (v.workload, v.substrate, v.behaviour, v.action, v.count) == \
        (W.key, "egress", "connect:tcp:127.0.1.66:4444", "denied", 2)
    assert s.decode_errors == 1
    assert s.poll_violations() == []


def test_an_unpinned_session_leaves_nothing_behind(env):
    kernel, session, paths, state, bpffs = env
    s = session(pinned=False)
    s.apply(policy(), "enforce", paths[:1])
    assert kernel.pins == {} and not desired_path(state, W).exists() and audit.read(state) == []
    st = next(iter({id(p.st): p.st for p in [s.enforced[W.key].program]}.values()))
    assert st.attached == {paths[0]}
    s.close()
    assert st.attached == set()  # detached on close: BPF_PROG_ATTACH holds its own reference


def test_no_programs_for_a_policy_without_egress_when_unpinned(env):
    kernel, session, paths, state, bpffs = env
    s = session(pinned=False, denials=True)
    p = Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read",))
    s.apply(p, "enforce", paths[:1], seccomp_target="exec")
    assert kernel.loads == 0 and s.enforced[W.key].program is None
    [probe] = kernel.probes
    [(mode, errno_, allowed)] = probe.watched.values()
    assert mode == "enforce" and errno_ == 1
    # execve: the exec target's completeness; the baseline ends processes
    assert set(allowed) == {"read", "execve", "exit", "exit_group", "rt_sigreturn", "restart_syscall"}


def test_denials_compare_with_the_profile_the_runtime_loads(env):
    kernel, session, paths, state, bpffs = env
    s = session(denials=True, clock=time.time)
    exceptions.add(state, POD, "syscall:ptrace", "1h", reason="debugging")
    s.apply(policy(POD), "enforce", paths[:1])
    [probe] = kernel.probes
    [(_, _, allowed)] = probe.watched.values()
    expected = profile_for(policy(POD), "enforce", target="workload",
                           exceptions=exceptions.syscall_allowances(state, POD))
    assert set(allowed) == set(expected.allowed())
    assert "ptrace" in allowed and "openat" in allowed  # the exception, and runc's completeness
    assert "execve" in allowed and EXEC_RULE not in {e.rule for e in expected.report}


def test_seccomp_denials_are_counted_in_the_kernel_and_named_by_their_first_sighting(env):
    from enforcer.denials import denial_key
    from sensor.events import SeccompDenialRecord
    kernel, session, paths, state, bpffs = env
    s = session(pinned=False, denials=True)
    p = Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read",))
    s.apply(p, "enforce", paths[:1], seccomp_target="exec")
    s.session_of = lambda cid: "exec-9-1"
    [probe] = kernel.probes
    [cid] = probe.watched
    first = SeccompDenialRecord.pack(type=SeccompDenialRecord.type, version=SeccompDenialRecord.version,
                                     size=SeccompDenialRecord.size(), cgroup_id=cid, pid=42, nr=124,
                                     ret=-1, flags=0x1, comm=b"storm")
    key = denial_key(cid, 42, 124, 0, True)
    kernel.emit(probe.events_fd, first)
    probe.totals[key] = 1_000_000  # a storm: the kernel counted them all
    [v] = s.poll_violations(final=True)
    assert (v.behaviour, v.action, v.count) == ("syscall:getsid", "denied", 1_000_000)
    assert v.detail["comm"] == "storm" and v.detail["session"] == "exec-9-1" and v.detail["pid"] == 42
    probe.totals[key] += 5
    [v] = s.poll_violations(final=True)
    assert v.count == 5  # deltas, never the total twice
    assert s.poll_violations(final=True) == []
def test_tampering_with_the_pinned_state_is_repaired_audited_and_reported(env):
    kernel, session, paths, state, bpffs = env
    s = session(verify_interval=0)
    s.apply(policy(), "enforce", paths[:2])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    assert s.sync() == [] and s.poll_violations() == []  # intact: nothing to do
    rules = pinned.rules
    pinned.mode = "observe"  # what a root process with the pinned config map could write
    pinned.rules = ()
    pinned.attached.discard(paths[1])
    assert s.sync() == [W.key]
    assert pinned.mode == "enforce" and len(pinned.rules) == len(rules) and paths[1] in pinned.attached
    assert s.sync() == []  # intact again (the swap wrote the other generation)
    [v] = s.poll_violations()
    assert s.poll_violations() == []
    assert (v.substrate, v.action, v.detail["repaired"]) == ("integrity", "alerted", True)
    assert {p.split(",")[0] for p in v.detail["problems"]} >= {"mode is observe", "rules differ"}
    [entry] = audit.read(state, action="policy.tamper")
    assert entry["workload"] == W.key and "programs detached from 1 cgroups" in entry["details"]["problems"]


def test_io_uring_operations_are_judged_against_the_cgroups_profile(env):
    from sensor.events import IoUringOpRecord
    kernel, session, paths, state, bpffs = env
    s = session(denials=True, clock=time.time)
    s.apply(policy(POD), "enforce", paths[:1])
    [probe] = kernel.probes
    [cid] = probe.watched
    allowed = probe.watched[cid][2]
    # connect is left to the egress programs (egress-mediated), which judge a ring's connect too
    assert "openat" in allowed and "connect" in allowed and "unlinkat" not in allowed

    def op(name, opcode):
        return IoUringOpRecord.pack(type=IoUringOpRecord.type, version=1,
                                    size=IoUringOpRecord.size(), cgroup_id=cid, pid=7,
                                    opcode=opcode, op=name.encode())
    kernel.rings[probe.events_fd] += [op("UNLINKAT", 36), op("CONNECT", 16), op("OPENAT", 18), op("NOP", 0)]
    [v] = s.poll_violations()
    assert (v.workload, v.behaviour, v.action) == (POD.key, "syscall:unlinkat", "alerted")
    assert (v.detail["via"], v.detail["op"], v.detail["cgroup_id"]) == ("io_uring", "UNLINKAT", cid)


def escape_record(src, dst, pid=70, path="/escape"):
    from sensor.events import CgroupEscapeRecord
    return CgroupEscapeRecord.pack(type=CgroupEscapeRecord.type, version=1,
                                   size=CgroupEscapeRecord.size(), src_cgroup_id=src,
                                   dst_cgroup_id=dst, pid=pid, by_pid=pid, dst_path=path.encode())


def test_a_task_moved_out_of_its_cgroup_is_moved_back_audited_and_reported(env):
    kernel, session, paths, state, bpffs = env
    s = session(denials=True)
    s.apply(policy(), "enforce", paths[:2])
    [probe] = kernel.probes
    a, b = (Path(p).stat().st_ino for p in paths[:2])
    assert set(probe.watched) == {a, b}
    kernel.rings[probe.events_fd] += [
        escape_record(a, b),                    # into the same workload's other cgroup: fine
        escape_record(a, 1, pid=71, path="/"),  # to the root: an escape
    ]
    [v] = s.poll_violations()
    assert kernel.moved == [(71, paths[0])]
    assert (v.workload, v.substrate, v.behaviour, v.action) == (W.key, "integrity", "cgroup:migration", "denied")
    assert (v.detail["from"], v.detail["moved_back"], v.detail["pid"]) == (paths[0], True, 71)
    [entry] = [e for e in audit.read(state) if e["action"] == "policy.escape"]
    assert entry["workload"] == W.key and entry["reason"] == "moved back"
    # a task that is gone by then cannot be moved back: still reported, as alerted
    kernel.gone_pids.add(72)
    kernel.rings[probe.events_fd].append(escape_record(b, 1, pid=72, path="/"))
    [v] = s.poll_violations()
    assert (v.action, v.detail["moved_back"]) == ("alerted", False) and "error" in v.detail
    assert kernel.killed == []
    # a move the kernel refuses (the daemon's cgroup namespace): killed in enforce mode
    kernel.unmovable_pids.add(73)
    kernel.rings[probe.events_fd].append(escape_record(b, 1, pid=73, path="/"))
    [v] = s.poll_violations()
    assert kernel.killed == [73] and (v.action, v.detail["killed"]) == ("denied", True)
    assert audit.read(state, action="policy.escape")[-1]["reason"] == "killed"


def test_cgroups_of_a_policy_without_syscalls_are_watched_for_migrations_only(env):
    kernel, session, paths, state, bpffs = env
    s = session(denials=True)
    s.apply(Policy(workload=W, mode="enforce", substrates=("egress",),
                   egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),)), "enforce", paths[:1])
    [probe] = kernel.probes
    assert [m for m, _, _ in probe.watched.values()] == ["watch"]


# ---- any legal name, and the audit entry as part of the change ----------------------------------


LONG = Workload("agents", "Deployment", "a" * 230, "main")
SLASHED = Workload.parse("host/Unit//system.slice/agent.service/main")


@pytest.mark.parametrize("w", [LONG, SLASHED], ids=["230-character name", "name with slashes"])
def test_enforce_and_remove_work_for_any_legal_name(env, w):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(w), "enforce", paths[:2])
    assert len(pin_dir_for(bpffs, w.key).name) < 100
    pinned = kernel.state_of(pin_dir_for(bpffs, w.key))
    [(dw, _p, _m)] = read_desired(state)
    assert dw == w
    s.close()
    s2 = session()
    assert s2.adopt_pinned() == [w.key]  # paired by its pin directory, not by the truncated meta
    s2.close()
    s3 = session()
    assert s3.remove(w.key, reason="decommissioned")  # by key, as `enforce --remove` gives it
    assert pinned.attached == set()
    assert not pin_dir_for(bpffs, w.key).exists() and read_desired(state) == []
    assert [e["action"] for e in audit.read(state)] == ["policy.apply", "policy.remove"]
    assert audit.verify(state).ok


def _break_audit(state):
    with open(audit.log_path(state), "ab") as f:
        f.write(b'{"seq": 99')  # a torn line: appends are refused


def test_an_apply_whose_audit_entry_cannot_be_written_is_undone(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(cidrs=("10.0.3.0/24",)), "alert", paths[:1])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    before = (pinned.rules, pinned.mode, set(pinned.attached), desired_path(state, W).read_bytes())
    _break_audit(state)
    with pytest.raises(ApplyError, match="partial line"):
        s.apply(policy(cidrs=("10.0.3.0/24", "10.0.4.0/24")), "enforce", paths)
    assert (pinned.rules, pinned.mode, set(pinned.attached), desired_path(state, W).read_bytes()) == before
    assert kernel.swaps[-1][1] == "reverted"


def test_a_first_apply_whose_audit_entry_cannot_be_written_leaves_nothing(env):
    kernel, session, paths, state, bpffs = env
    audit.append(state, "setup", reason="x")
    _break_audit(state)
    s = session()
    with pytest.raises(ApplyError):
        s.apply(policy(), "enforce", paths[:2])
    assert kernel.pins == {} and not pin_dir_for(bpffs, W.key).exists()
    assert not desired_path(state, W).exists() and s.enforced == {}


def test_a_remove_whose_audit_entry_cannot_be_written_keeps_enforcing(env):
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(), "enforce", paths[:2])
    pinned = kernel.state_of(pin_dir_for(bpffs, W.key))
    _break_audit(state)
    with pytest.raises(ApplyError, match="still enforced"):
        s.remove(W, reason="decommissioned")
    assert pinned.attached == set(paths[:2]) and pin_dir_for(bpffs, W.key).is_dir()
    assert [w for w, _p, _m in read_desired(state)] == [W]
    assert W.key in s.enforced


def test_pin_directories_are_0700_whatever_the_umask(env):
    import os
    import stat
    kernel, session, paths, state, bpffs = env
    old = os.umask(0)
    try:
        session().apply(policy(), "enforce", paths[:1])
    finally:
        os.umask(old)
    pin = pin_dir_for(bpffs, W.key)
    assert stat.S_IMODE(os.stat(pin).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pin.parent).st_mode) == 0o700


def test_a_pinned_set_others_could_change_is_not_adopted(env):
    import os
    kernel, session, paths, state, bpffs = env
    s = session()
    s.apply(policy(), "enforce", paths[:1])
    s.close()
    os.chmod(pin_dir_for(bpffs, W.key), 0o777)
    assert session().adopt_pinned() == []


def test_a_set_pinned_under_the_earlier_name_is_adopted_not_doubled(env):
    import hashlib
    import re

    from enforcer.egress import pin_root
    kernel, session, paths, state, bpffs = env
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", W.key.replace("/", "_"))[:80]
    legacy = pin_root(bpffs) / f"{slug}-{hashlib.sha256(W.key.encode()).hexdigest()[:10]}"
    kernel.load_egress(W.key, legacy, session().limits)  # what an earlier version pinned
    s = session()
    s.apply(policy(), "enforce", paths[:1])
    assert kernel.loads == 1 and set(kernel.pins) == {legacy}  # adopted: no second set
    s.close()
    s2 = session()
    assert s2.adopt_pinned() == [W.key]
    assert s2.remove(W, reason="done") and not legacy.exists()


def test_landlock_refusals_are_watched_in_enforce_mode_and_judged_against_the_policy(env, tmp_path):
    """exec and file entries are enforced by Landlock only in enforce mode; an -EACCES report of
    a watched cgroup becomes a denied violation unless the policy allows the access (then it was
    an ordinary permission check)."""
    import os

    from sensor.events import FileDenialRecord
    kernel, session, paths, state, bpffs = env
    p = Policy(W, mode="enforce", substrates=("exec", "file"), execs=("/usr/bin/python3",),
               files=("file:read:/etc/hosts",))
    s = session(pinned=False, file_denials=True)
    s.apply(p, "alert", [paths[0]])
    assert kernel.file_probes == []  # alert mode: no Landlock, nothing to watch
    s.apply(p, "enforce", [paths[0]])
    [probe] = kernel.file_probes
    cid = os.stat(paths[0]).st_ino
    assert probe.watched == {cid}

    def record(access, path, nr=257, pid=os.getpid()):
        return FileDenialRecord.pack(type=33, version=1, size=FileDenialRecord.size(), ktime=1, cgroup_id=cid,
                                     pid=pid, tid=pid, access=access, dirfd=0, nr=nr, ret=-13,
                                     path_len=len(path), path=path.encode())

    kernel.emit(probe.events_fd, record(0x1, "/root/.aws/credentials"))
    kernel.emit(probe.events_fd, record(0x1, "/etc/hosts"))  # allowed: a mode-bits EACCES, not reported
    kernel.emit(probe.events_fd, record(0x1000, "/bin/sh", nr=59))
    got = {(v.substrate, v.behaviour, v.action) for v in s.poll_violations()}
    assert got == {("file", "file:read:/root/.aws/credentials", "denied"), ("exec", "exec:/bin/sh", "denied")}
    s.remove(W)
    assert probe.watched == set()


def test_landlock_refusals_of_policies_without_exec_or_file_are_not_watched(env):
    kernel, session, paths, state, bpffs = env
    s = session(pinned=False, file_denials=True)
    s.apply(policy(), "enforce", [paths[0]])
    assert kernel.file_probes == []
