"""Violations: model, JSONL store, record conversion, watch list and detection judgement."""

from __future__ import annotations

import ipaddress
import json

import pytest

from enforcer.policy import EgressRule, Policy
from enforcer.violations import (Judge, Violation, ViolationStore, ViolationStoreError, fold,
                                 from_record, workload_matches)
from sensor.events import (EV_EGRESS_VIOLATION, EV_SECCOMP_DENIAL, DecodeError, EgressViolationRecord,
                           SeccompDenialRecord)
from sensor.workload import Workload

WL = "host/Unit/agent/main"


def v(behaviour="connect:tcp:127.0.0.1:9", action="denied", substrate="egress", t=1.0, workload=WL,
      detail=None, count=1):
    return Violation(t, workload, substrate, behaviour, action, detail or {"pid": 1}, count)


def test_violation_validates_substrate_action_and_count():
    with pytest.raises(ValueError):
        v(substrate="network")
    with pytest.raises(ValueError):
        v(action="blocked")
    with pytest.raises(ValueError):
        v(count=0)


def test_roundtrip_and_store_filters(tmp_path):
    store = ViolationStore(tmp_path)
    assert store.list() == []
    items = [v(t=1.0), v("syscall:ptrace", substrate="syscall", t=2.0),
             v("connect:tcp:[::1]:80", action="alerted", t=3.0, workload="host/Unit/other/main")]
    assert store.append(items) == 3
    assert store.append([]) == 0
    got = store.list()
    assert [x.to_dict() for x in got] == [x.to_dict() for x in items]
    assert [x.behaviour for x in store.list(workload="agent")] == ["connect:tcp:127.0.0.1:9", "syscall:ptrace"]
    assert [x.behaviour for x in store.list(workload="host/Unit/other/main")] == ["connect:tcp:[::1]:80"]
    assert [x.substrate for x in store.list(substrate="syscall")] == ["syscall"]
    assert [x.action for x in store.list(action="alerted")] == ["alerted"]
    assert [x.time for x in store.list(since=2.0)] == [2.0, 3.0]
    # one JSON object per line, appended
    lines = (tmp_path / "violations.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["behaviour"] == "connect:tcp:127.0.0.1:9"


def test_corrupt_store_line_names_file_and_line(tmp_path):
    store = ViolationStore(tmp_path)
    store.append([v()])
    with open(store.path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ViolationStoreError, match=r"violations.jsonl:2"):
        store.list()


def test_fold_sums_identical_records_and_keeps_first_time():
    a, b = v(t=5.0), v(t=4.0)
    c = v(t=6.0, detail={"pid": 2})
    out = fold([a, b, c, v("syscall:x", substrate="syscall", t=7.0)])
    assert [(x.time, x.count, x.detail) for x in out][:2] == [(4.0, 2, {"pid": 1}), (6.0, 1, {"pid": 2})]
    assert len(out) == 3


def test_workload_matches_full_key_or_name():
    assert workload_matches(WL, WL)
    assert workload_matches(WL, "agent")
    assert not workload_matches(WL, "age")


def egress_record(addr: str, port: int, proto=6, op=0, action=1, cgroup_id=77, pid=9) -> bytes:
    ip = ipaddress.ip_address(addr)
    return EgressViolationRecord.pack(type=EV_EGRESS_VIOLATION, version=EgressViolationRecord.version,
                                      size=EgressViolationRecord.size(),
                                      ktime=1, cgroup_id=cgroup_id, pid=pid,
                                      family=2 if ip.version == 4 else 10, protocol=proto,
                                      addr=ip.packed.ljust(16, b"\0"), port=port, op=op, action=action,
                                      tid=pid + 1, comm=b"nginx")


def test_from_record_egress_keys_and_actions():
    r = from_record(egress_record("10.0.3.7", 443), lambda cid: WL if cid == 77 else None, 10.0,
                    session_of=lambda cid: "exec-1-1" if cid == 77 else None)
    assert (r.substrate, r.behaviour, r.action, r.workload) == ("egress", "connect:tcp:10.0.3.7:443", "denied", WL)
    assert r.detail == {"pid": 9, "comm": "nginx", "session": "exec-1-1", "cgroup_id": 77}
    r = from_record(egress_record("::1", 53, proto=17, op=1, action=0), lambda cid: WL, 10.0)
    assert (r.behaviour, r.action) == ("send:udp:[::1]:53", "alerted")
    r = from_record(egress_record("127.0.0.1", 0, proto=1), lambda cid: None, 10.0)
    assert (r.behaviour, r.workload) == ("connect:icmp:127.0.0.1:0", "unknown")


def test_from_record_seccomp_denial_and_alert():
    raw = SeccompDenialRecord.pack(type=EV_SECCOMP_DENIAL, version=SeccompDenialRecord.version,
                                   size=SeccompDenialRecord.size(), ktime=1, cgroup_id=5, pid=3, nr=124,
                                   ret=-1, comm=b"redis-server")
    r = from_record(raw, lambda cid: WL, 1.0)
    assert (r.substrate, r.behaviour, r.action, r.detail["errno"]) == ("syscall", "syscall:getsid", "denied", 1)
    assert r.detail["comm"] == "redis-server" and r.detail["pid"] == 3
    raw = SeccompDenialRecord.pack(type=EV_SECCOMP_DENIAL, version=SeccompDenialRecord.version,
                                   size=SeccompDenialRecord.size(), ktime=1, cgroup_id=5, pid=3, nr=124, ret=0)
    assert from_record(raw, lambda cid: WL, 1.0).action == "alerted"
    # a denied connect names the destination it asked for
    raw = SeccompDenialRecord.pack(type=EV_SECCOMP_DENIAL, version=SeccompDenialRecord.version,
                                   size=SeccompDenialRecord.size(), ktime=1, cgroup_id=5, pid=3, nr=42,
                                   ret=-1, flags=0x2, family=2, port=4444,
                                   addr=bytes([203, 0, 113, 5]) + b"\0" * 12)
    assert from_record(raw, lambda cid: WL, 1.0).detail["destination"] == "203.0.113.5:4444"


def test_fold_holds_bounded_memory_whatever_the_rate():
    from enforcer.violations import ViolationFold
    f = ViolationFold(cap=3)
    for i in range(100_000):
        f.add(v("syscall:getsid", substrate="syscall", detail={"pid": i % 5}))
    assert len(f) == 4  # three held keys and one overflow record
    out = f.take()
    assert sum(x.count for x in out) == 100_000 == f.total
    [over] = [x for x in out if x.detail.get("overflow")]
    assert over.behaviour == "syscall:overflow" and over.detail["distinct"] == 40_000
    assert f.take() == [] and len(f) == 0


def test_a_socket_stopped_by_its_arguments_names_the_socket():
    raw = SeccompDenialRecord.pack(type=EV_SECCOMP_DENIAL, version=SeccompDenialRecord.version,
                                   size=SeccompDenialRecord.size(), ktime=1, cgroup_id=5, pid=3, nr=41, ret=-1,
                                   args0=17, args1=3 | 0x80000, args2=0x0300)
    r = from_record(raw, lambda cid: WL, 1.0, lambda cid: {"socket", "read"})
    assert r.behaviour == "syscall:socket"
    assert r.detail["socket"] == {"family": "AF_PACKET", "type": "SOCK_RAW", "protocol": "768"}
    assert "NET_RAW" in r.detail["why"]
    # a profile without socket at all: denied by name, and the socket it asked for is said too
    plain = from_record(raw, lambda cid: WL, 1.0, lambda cid: {"read"}).detail
    assert plain["socket"]["family"] == "AF_PACKET" and "why" not in plain


def test_from_record_counts_bad_records_instead_of_raising():
    assert isinstance(from_record(b"\x06\x00", lambda c: WL, 1.0), DecodeError)
    truncated = egress_record("10.0.0.1", 1)[:-8]
    assert isinstance(from_record(truncated, lambda c: WL, 1.0), DecodeError)


def policy(**kw):
    base = dict(workload=Workload.host("agent"), mode="enforce", syscalls=("read",),
                egress=(EgressRule("tcp", "10.0.0.0/8", (443,)),))
    base.update(kw)
    return Policy(**base)


def test_watch_list_alerts_once_per_session_even_when_allowed():
    p = policy(watch=("connect:tcp:10.1.1.1:443", "syscall:ptrace"))
    j = Judge(p)
    out = j.observe("s1", "connect:tcp:10.1.1.1:443", now=1.0)
    assert [(x.substrate, x.behaviour, x.action, x.detail["allowed"]) for x in out] == [
        ("watch", "connect:tcp:10.1.1.1:443", "alerted", True)]
    assert j.observe("s1", "connect:tcp:10.1.1.1:443", now=2.0) == []  # same session: once
    assert j.observe("s1", "syscall:read", now=2.0) == []  # not watched
    out = j.observe("s1", "syscall:ptrace")
    assert out[0].detail == {"session": "s1", "substrate": "syscall", "allowed": False}
    assert len(j.observe("s2", "connect:tcp:10.1.1.1:443")) == 1  # a new session recurs
    j.close_session("s1")
    assert len(j.observe("s1", "syscall:ptrace")) == 1


def test_detection_rules_judge_live_session_counts():
    rule = {"key": "connect:tcp:10.0.0.1:443", "mean": 4.0, "std": 1.0, "k": 2.0, "sessions": 5}
    j = Judge(policy(detection=(rule,)))
    for i in range(6):  # up to the threshold 4 + 2*1 = 6: inside the band
        assert j.observe("s", rule["key"]) == []
    out = j.observe("s", rule["key"], now=3.0)
    assert [(x.substrate, x.action, x.detail["count"], x.detail["bound"]) for x in out] == [
        ("detection", "alerted", 7, "above")]
    assert j.observe("s", rule["key"]) == []  # reported once per session
    assert j.close_session("s") == []  # already reported
    # a session that ends below mean - k*std (4 - 2 = 2) is a soft violation too
    j.observe("t", rule["key"])
    out = j.close_session("t", now=9.0)
    assert [(x.detail["count"], x.detail["bound"]) for x in out] == [(1, "below")]
    # inside the band at close: nothing
    for _ in range(4):
        j.observe("u", rule["key"])
    assert j.close_session("u") == []


def test_judge_reports_execs_outside_the_policy_only_when_asked():
    from enforcer.policy import Policy
    from enforcer.violations import Judge
    from sensor.workload import Workload

    pol = Policy(Workload.host("j"), substrates=("exec",), execs=("/usr/bin/python3",))
    j = Judge(pol, report_execs=True)
    assert j.observe("s", "exec:/usr/bin/python3", 1, 1.0) == []
    [v] = j.observe("s", "exec:/usr/bin/curl", 2, 2.0)
    assert (v.substrate, v.behaviour, v.action, v.count) == ("exec", "exec:/usr/bin/curl", "alerted", 2)
    assert Judge(pol).observe("s", "exec:/usr/bin/curl", 1, 3.0) == []
    # a policy that leaves exec out allows every exec
    assert Judge(Policy(Workload.host("j"), substrates=("syscall",)), report_execs=True).observe(
        "s", "exec:/usr/bin/curl", 1, 4.0) == []


def test_judge_reports_capabilities_outside_the_policy_once_per_session():
    from enforcer.policy import Policy
    from enforcer.violations import SUBSTRATES, Judge, Violation
    from sensor.workload import Workload

    assert "capability" in SUBSTRATES  # violations take every substrate
    Violation(1.0, "host/Unit/j/main", "capability", "capability:SYS_ADMIN", "denied", {})
    pol = Policy(Workload.host("j"), substrates=("capability",), capabilities=("CHOWN",))
    j = Judge(pol, report_capabilities=True)
    assert j.observe("s", "capability:CHOWN", 3, 1.0) == []
    [v] = j.observe("s", "capability:SYS_ADMIN", 2, 2.0)
    assert (v.substrate, v.behaviour, v.action, v.count, v.detail["enforced"]) == \
        ("capability", "capability:SYS_ADMIN", "alerted", 2, False)
    assert j.observe("s", "capability:SYS_ADMIN", 1, 3.0) == []  # once per session
    j.close_session("s", 4.0)
    assert len(j.observe("s2", "capability:SYS_ADMIN", 1, 5.0)) == 1
    assert Judge(pol).observe("s", "capability:SYS_ADMIN", 1, 3.0) == []
    assert Judge(Policy(Workload.host("j"), substrates=("syscall",)), report_capabilities=True).observe(
        "s", "capability:SYS_ADMIN", 1, 4.0) == []


def test_judge_reports_file_accesses_outside_the_policy_and_says_whether_landlock_enforced():
    from enforcer.policy import Policy
    from enforcer.violations import Judge
    from sensor.workload import Workload

    pol = Policy(Workload.host("j"), substrates=("exec", "file"), execs=("/usr/bin/python3",),
                 files=("file:read:/etc/*",))
    j = Judge(pol, report_execs=True, report_files=True, enforced={"exec"})
    assert j.observe("s", "file:read:/etc/hosts", 3, 1.0) == []
    [v] = j.observe("s", "file:write:/etc/hosts", 1, 2.0)  # a read never admits a write
    assert (v.substrate, v.behaviour, v.action, v.detail) == (
        "file", "file:write:/etc/hosts", "alerted", {"session": "s", "enforced": False})
    [v] = j.observe("s", "exec:/bin/sh", 1, 3.0)
    assert v.detail["enforced"] is True
    # a refusal seen again is judged against the watch list only, never re-reported as alerted
    assert j.observe("s", "exec:/bin/sh", 1, 4.0, denied=True) == []
    # the daemon cannot see the launcher: it does not claim either way
    [v] = Judge(pol, report_files=True).observe("s", "file:read:/root/x", 1, 5.0)
    assert "enforced" not in v.detail


def test_file_denials_become_violations_with_path_access_and_process():
    from enforcer.violations import from_file_denial
    from sensor.events import FileDenialEvent

    ev = FileDenialEvent(ktime=1, cgroup_id=7, pid=42, tid=43, access=0x1 | 0x4, path="creds", dirfd=-100,
                         nr=257, syscall="openat", ret=-13, comm="agent")
    allows = {"file:write:/home/a/creds"}.__contains__
    [v] = from_file_denial(ev, "w", 9.0, "/home/a/creds", allows)
    assert (v.substrate, v.behaviour, v.action) == ("file", "file:read:/home/a/creds", "denied")
    assert v.detail == {"pid": 42, "tid": 43, "comm": "agent", "cgroup_id": 7, "syscall": "openat", "path": "creds",
                        "access": ["read", "write"], "errno": "EACCES", "enforcer": "landlock"}
    # a relative path no longer resolvable is reported as given, never dropped
    got = from_file_denial(ev, "w", 9.0, None, allows)
    assert [v.behaviour for v in got] == ["file:read:creds", "file:write:creds"]
    assert all(v.detail["unresolved"] for v in got)
