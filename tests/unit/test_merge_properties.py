"""Cross-node merge of WorkloadProfile objects: property tests.

Contributions are built through the recording API (sessions opened, behaviours observed, sessions
closed, fingerprints and losses added), published as custom-resource objects, and merged back by
:func:`sensor.workloadprofile.assemble`, the code every reader (CLI or daemon) uses.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.workloadprofile import assemble, contribution_to_crs, profile_to_crs
from sensor.profile import NodeContribution, Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "researcher", "main")

KEYS = st.sampled_from([
    "syscall:read", "syscall:openat", "syscall:connect", "syscall:execve",
    "exec:/usr/bin/git", "exec:/bin/sh", "connect:tcp:10.0.3.7:443", "send:udp:[fd00::a]:53",
])
TIMES = st.integers(min_value=0, max_value=10_000).map(lambda t: 1_700_000_000.0 + t / 4)

event = st.tuples(KEYS, st.integers(min_value=1, max_value=50), TIMES)
session = st.tuples(st.lists(event, min_size=0, max_size=6), st.booleans())


@st.composite
def contributions(draw, node: str | None = None) -> NodeContribution:
    node = node or draw(st.sampled_from(["node-a", "node-b", "node-c"]))
    c = NodeContribution(node)
    for i, (events, closed) in enumerate(draw(st.lists(session, min_size=0, max_size=4))):
        sid = f"{node}/{draw(st.integers(0, 3))}-{i}"
        start = min([e[2] for e in events], default=1_700_000_000.0)
        c.open_session(sid, start, {"pod": f"p{i}"})
        for key, n, ts in events:
            c.observe(sid, key, n, ts)
        if closed:
            c.close_session(sid, max([e[2] for e in events], default=start) + 1)
    for k, v in draw(st.dictionaries(st.sampled_from(["image", "model"]),
                                     st.sampled_from(["sha256:aa", "sha256:bb", "v1", "v2"]), max_size=2)).items():
        c.add_fingerprint(k, v, 1_700_000_100.0)
    c.add_loss("ringbuf", draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(1, 3))):
        c.touch(draw(TIMES))
    return c


def as_profile(*cs: NodeContribution) -> Profile:
    p = Profile(W)
    for c in cs:
        p = p.merge(Profile(W, {c.node: c}))
    return p


def objects_of(*cs: NodeContribution, chunk_size: int = 1_000_000) -> list[dict]:
    return [o for c in cs for o in contribution_to_crs(W, c, chunk_size=chunk_size)]


def merged(objs: list[dict]) -> Profile:
    return assemble(objs).profiles[W]


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.lists(contributions(), min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_merge_is_deterministic_and_order_free(cs, rnd):
    objs = objects_of(*cs)
    shuffled = list(objs)
    rnd.shuffle(shuffled)
    assert merged(objs).pack() == merged(shuffled).pack()
    assert merged(objs).pack() == merged(objs).pack()


@FAST
@given(contributions(), contributions())
def test_merge_is_commutative(a, b):
    pa, pb = as_profile(a), as_profile(b)
    assert pa.merge(pb).pack() == pb.merge(pa).pack()
    assert merged(objects_of(a, b)).pack() == merged(objects_of(b, a)).pack()


@FAST
@given(contributions(), contributions(), contributions())
def test_merge_is_associative(a, b, c):
    pa, pb, pc = as_profile(a), as_profile(b), as_profile(c)
    assert pa.merge(pb).merge(pc).pack() == pa.merge(pb.merge(pc)).pack()


@FAST
@given(st.lists(contributions(), min_size=1, max_size=4))
def test_reading_the_same_input_twice_adds_nothing(cs):
    objs = objects_of(*cs)
    once = merged(objs)
    assert merged(objs + objs).pack() == once.pack()
    assert once.merge(once).pack() == once.pack()
    twice = once.merge(merged(objs))
    assert twice.behaviours() == once.behaviours()
    assert [s.id for s in twice.sessions()] == [s.id for s in once.sessions()]


@FAST
@given(contributions("node-a"), contributions("node-b"), contributions("node-c"))
def test_counts_sum_per_node_sessions_union_first_min_last_max(a, b, c):
    m = merged(objects_of(a, b, c))
    for key, stats in m.behaviours().items():
        parts = [x.behaviours[key] for x in (a, b, c) if key in x.behaviours]
        assert stats.count == sum(p.count for p in parts)
        assert stats.sessions == sum(p.sessions for p in parts)
        assert stats.first_seen == min(p.first_seen for p in parts)
        assert stats.last_seen == max(p.last_seen for p in parts)
    assert {s.id for s in m.sessions()} == set(a.sessions) | set(b.sessions) | set(c.sessions)
    assert m.loss().get("ringbuf", 0) == sum(x.loss.get("ringbuf", 0) for x in (a, b, c))


@FAST
@given(contributions("node-a"), st.integers(1, 5))
def test_newer_generation_of_a_node_replaces_older_not_adds(c, extra):
    old = NodeContribution.unpack(c.pack())
    new = NodeContribution.unpack(c.pack())
    new.open_session("node-a/later", 1_800_000_000.0)
    new.observe("node-a/later", "syscall:read", extra, 1_800_000_000.0)
    new.touch(1_800_000_001.0)
    m = merged(objects_of(old, new))
    assert m.nodes["node-a"].pack(compact=True) == new.pack(compact=True)
    before = c.behaviours["syscall:read"].count if "syscall:read" in c.behaviours else 0
    assert m.behaviours()["syscall:read"].count == before + extra


@FAST
@given(st.lists(contributions(), min_size=1, max_size=3), st.integers(16, 400))
def test_cr_round_trip_chunked_or_not(cs, chunk_size):
    p = as_profile(*cs)
    for size in (1_000_000, chunk_size):
        objs = profile_to_crs(p, chunk_size=size)
        assembly = assemble(objs)
        assert assembly.problems == []
        back = assembly.profiles[W]
        assert sorted(back.nodes) == sorted(p.nodes)
        assert all(back.nodes[n].pack(compact=True) == c.pack(compact=True) for n, c in p.nodes.items())
        assert back.behaviours() == p.behaviours()
        for node, contribution in p.nodes.items():
            heads = [o for o in objs if o["spec"]["node"] == node and o["spec"]["chunk"]["index"] == 0]
            assert len(heads) == 1 and heads[0]["spec"]["generation"] == contribution.generation


def test_summed_behaviours_equal_the_pairwise_merge():
    """Profile.behaviours sums in one pass; it must equal merging the nodes' stats pairwise."""
    from sensor.profile import BehaviourStats, NodeContribution, Profile
    from sensor.workload import Workload

    p = Profile(Workload("agents", "Deployment", "x", "main"))
    for n in range(7):
        c = NodeContribution(f"node-{n}")
        for s in range(3):
            c.open_session(f"s{s}", 100.0 + n + s)
            for k in ("syscall:read", f"exec:/bin/t{n % 3}", "syscall:openat"):
                c.observe(f"s{s}", k, 1 + n * s, 100.0 + n * 3 + s)
            c.close_session(f"s{s}", 200.0 + n)
        p.nodes[c.node] = c
    expected: dict[str, BehaviourStats] = {}
    for name in sorted(p.nodes):
        for key, s in p.nodes[name].behaviours.items():
            mine = BehaviourStats(s.count, s.sessions, s.first_seen, s.last_seen, s.session_sum, s.session_sumsq,
                                  [f"{name}/{i}" for i in s.session_ids])
            expected[key] = mine if key not in expected else expected[key].merged(mine)
    assert p.behaviours() == dict(sorted(expected.items()))
