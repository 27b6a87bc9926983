"""Profile model: recording, exact distinct sessions, rates, caps, merge and serialisation."""

import math

import pytest

from sensor.profile import Profile, SCHEMA_VERSION
from sensor.workload import Workload, net_key, parse_net_key, substrate_of

W = Workload.host("demo")


def record(p: Profile, node: str, session: str, events, start=0.0, close=True):
    c = p.node(node)
    c.open_session(session, start)
    for key, n, ts in events:
        c.observe(session, key, n, ts)
    if close:
        c.close_session(session, max([start] + [e[2] for e in events]) + 1)
    c.touch(start + 100)
    return c


def test_distinct_sessions_are_exact_and_counts_sum():
    p = Profile(W)
    record(p, "n1", "s1", [("syscall:read", 3, 1.0), ("syscall:read", 2, 2.0)])
    record(p, "n1", "s2", [("syscall:read", 1, 5.0), ("exec:/bin/true", 1, 6.0)])
    b = p.behaviours()
    assert b["syscall:read"].count == 6
    assert b["syscall:read"].sessions == 2
    assert b["syscall:read"].first_seen == 1.0 and b["syscall:read"].last_seen == 5.0
    assert b["exec:/bin/true"].sessions == 1


def test_per_session_rate_distribution():
    p = Profile(W)
    record(p, "n1", "s1", [("syscall:read", 4, 1.0)])
    record(p, "n1", "s2", [("syscall:read", 8, 1.0)])
    record(p, "n1", "s3", [("syscall:write", 1, 1.0)])  # read absent: a zero-count session
    mean, std, n = p.rate("syscall:read")
    assert n == 3
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(math.sqrt((0 + 16 + 64) / 3 - 16))


def test_open_session_not_in_rate_until_closed():
    p = Profile(W)
    record(p, "n1", "s1", [("syscall:read", 4, 1.0)], close=False)
    assert p.rate("syscall:read") == (0.0, 0.0, 0)
    p.node("n1").close_session("s1", 9.0)
    assert p.rate("syscall:read")[0] == 4.0


def test_cap_marks_profile_and_keeps_counts():
    p = Profile(W)
    c = p.node("n1")
    c.caps["exec"] = 2
    c.open_session("s", 0.0)
    for i in range(5):
        c.observe("s", f"exec:/bin/x{i}", 1, float(i))
    c.observe("s", "exec:/bin/x4", 1, 9.0)
    assert len([k for k in c.behaviours if k.startswith("exec:")]) == 2
    assert p.capped
    o = p.overflow()["exec"]
    assert o.count == 4 and o.new_keys == 3


def test_merge_is_commutative_idempotent_and_sums_nodes():
    a, b = Profile(W), Profile(W)
    record(a, "n1", "s1", [("syscall:read", 3, 1.0)])
    record(b, "n2", "s2", [("syscall:read", 5, 0.5), ("syscall:openat", 1, 2.0)])
    ab, ba = a.merge(b), b.merge(a)
    assert ab.pack() == ba.pack()
    assert ab.merge(b).pack() == ab.pack()  # reading the same input twice adds nothing
    r = ab.behaviours()["syscall:read"]
    assert (r.count, r.sessions, r.first_seen) == (8, 2, 0.5)


def test_merge_keeps_newer_generation_of_a_node():
    old = Profile(W)
    record(old, "n1", "s1", [("syscall:read", 1, 1.0)])
    new = Profile.unpack(old.pack())
    record(new, "n1", "s2", [("syscall:read", 1, 2.0)])
    assert old.merge(new).behaviours()["syscall:read"].count == 2
    assert new.merge(old).behaviours()["syscall:read"].count == 2


def test_merge_rejects_other_workload():
    with pytest.raises(ValueError):
        Profile(W).merge(Profile(Workload.host("other")))


def test_pack_roundtrip_and_schema_check():
    p = Profile(W)
    record(p, "n1", "s1", [("connect:tcp:127.0.0.1:80", 2, 1.0)])
    p.node("n1").add_fingerprint("image", "sha256:abc", 1.0)
    q = Profile.unpack(p.pack())
    assert q.pack() == p.pack()
    assert q.fingerprints() == {"image": ["sha256:abc"]}
    bad = p.pack() | {"schema": SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="unsupported profile schema"):
        Profile.unpack(bad)


def test_coverage_rate_counts_new_behaviours_in_last_day():
    p = Profile(W)
    day = 86400.0
    record(p, "n1", "s1", [("syscall:read", 1, 0.0), ("syscall:write", 1, 3 * day)])
    record(p, "n1", "s2", [("exec:/bin/a", 1, 3.5 * day)], start=3 * day)
    p.node("n1").updated = 4 * day
    assert p.coverage_rate(24) == {"syscall": 1, "egress": 0, "exec": 1, "file": 0, "http": 0,
                                   "mcp": 0, "iam": 0, "capability": 0}


def test_json_view_has_documented_fields():
    p = Profile(W)
    record(p, "n1", "s1", [("send:udp:[::1]:53", 1, 1.0)])
    j = p.to_json()
    for f in ("workload", "window", "sessions", "behaviours", "loss"):
        assert f in j
    beh = j["behaviours"][0]
    assert beh == {"key": "send:udp:[::1]:53", "substrate": "egress", "count": 1, "sessions": 1,
                   "first_seen": 1.0, "last_seen": 1.0}
    assert j["sessions"]["ids"] == ["s1"]


def test_behaviour_keys():
    assert net_key("connect", "tcp", "::1", 443) == "connect:tcp:[::1]:443"
    n = parse_net_key("send:udp:[fd00::a]:53")
    assert (n.kind, n.proto, str(n.addr), n.port) == ("send", "udp", "fd00::a", 53)
    assert substrate_of("exec:/bin/sh") == "exec"
    with pytest.raises(ValueError):
        parse_net_key("connect:sctp:1.2.3.4:1")


def test_session_sample_is_capped_and_unioned_across_nodes():
    from sensor.profile import SESSION_SAMPLE_CAP
    p = Profile(W)
    for i in range(SESSION_SAMPLE_CAP + 3):
        record(p, "n1", f"s{i}", [("syscall:read", 1, float(i))], start=float(i))
    record(p, "n2", "s0", [("syscall:read", 1, 1.0)])  # same id on another node: another session
    b = p.behaviours()["syscall:read"]
    assert b.sessions == SESSION_SAMPLE_CAP + 4
    assert len(b.session_ids) == SESSION_SAMPLE_CAP + 1
    assert "n2/s0" in b.session_ids and "n1/s0" in b.session_ids
    assert not b.sessions_complete
    assert Profile.unpack(p.pack()).behaviours()["syscall:read"].session_ids == b.session_ids


def test_late_events_of_a_closed_session_add_counts_without_double_counting_it():
    p = Profile(W)
    c = record(p, "n1", "s1", [("syscall:read", 2, 1.0)])
    c.observe("s1", "syscall:read", 3, 5.0)   # drained after the session closed
    c.observe("s1", "exec:/bin/late", 1, 6.0)
    b = p.behaviours()
    assert (b["syscall:read"].count, b["syscall:read"].sessions, b["syscall:read"].last_seen) == (5, 1, 5.0)
    assert (b["exec:/bin/late"].count, b["exec:/bin/late"].sessions) == (1, 1)
    assert p.closed_sessions == 1 and c.open_sessions == {}
