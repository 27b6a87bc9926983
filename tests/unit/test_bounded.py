"""A daemon that keeps running under any input: the pump's drain is bounded per step (records and
time) so counter reads and flushes come round under an endless flood, and a profile's memory and
file size stay bounded when one container sends to a million destinations."""

from __future__ import annotations

import tracemalloc

import msgpack

from sensor import profile as prof
from sensor.aggregate import Aggregator
from sensor.events import NetEvent
from sensor.profile import Profile
from sensor.pump import CHUNK, Pump, TreeBinding
from sensor.store import encode_profile
from sensor.workload import Workload

W = Workload.host("flood")


class EndlessRing:
    """A sensor whose ring is never empty: every poll returns as many events as it may."""

    def __init__(self, clock, cgroup_id: int, per_event: float = 1e-5):
        self.clock = clock
        self.cgroup_id = cgroup_id
        self.per_event = per_event
        self.polled = 0
        self.counter_reads = 0
        self.n = 0

    def poll(self, timeout_ms, limit):
        out = []
        for _ in range(limit):
            self.n += 1
            out.append(NetEvent(ktime=self.n, pid=1, cgroup_id=self.cgroup_id, op="send", proto="udp",
                                family=4, addr=f"10.{(self.n >> 16) & 255}.{(self.n >> 8) & 255}.{self.n & 255}",
                                port=self.n % 65536))
        self.polled += len(out)
        self.clock.now += self.per_event * len(out)  # draining takes time
        return out

    def wall_time(self, ktime):
        return 1.8e9 + ktime * 1e-6

    def loss(self):
        return {}

    def cgroup_slots(self):
        return {self.cgroup_id: 0}

    def syscall_counts(self, after_exec=()):
        self.counter_reads += 1
        return {}

    def behaviour_counts(self, after_exec=()):
        return {}

    def refused_counts(self, after_exec=()):
        return {}

    def observed_substrates(self):
        return ()

    def forget_cgroup(self, cg):
        pass


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _pump(tmp_path, clock, per_event=1e-5, batch=65536, budget=0.25):
    cg = tmp_path / "cg"
    cg.mkdir()
    import os
    cid = os.stat(cg).st_ino
    sensor = EndlessRing(clock, cid, per_event)
    agg = Aggregator("n", None, str)
    binding = TreeBinding(str(cg), W, "s1")
    pump = Pump(sensor, binding, agg, counts_interval=1.0, batch=batch, budget=budget, clock=clock)
    binding.bind(cid, agg)
    return pump, sensor, agg


def test_a_step_returns_within_its_budget_under_an_endless_flood(tmp_path):
    clock = Clock()
    pump, sensor, _agg = _pump(tmp_path, clock)
    for _ in range(20):
        start = clock.now
        st = pump.step(0)
        assert st.events <= pump.batch
        # at most one chunk past the budget: the clock is looked at between chunks
        assert clock.now - start <= pump.budget + CHUNK * sensor.per_event + 1e-9
    assert sensor.counter_reads >= 2  # 20 steps of 0.25 s with counters due every second


def test_a_step_returns_after_batch_records_when_draining_is_free(tmp_path):
    clock = Clock()
    pump, sensor, _agg = _pump(tmp_path, clock, per_event=0.0, batch=10_000)
    st = pump.step(0)
    assert st.events == 10_000 == sensor.polled


def test_a_million_destinations_keep_memory_and_file_size_bounded():
    """One container sending to 1M distinct destinations: the caps hold the keys, and nothing
    else grows with the number of refused keys (the issue measured 51 -> 308 MB and a 28.9 MB
    profile rewritten on every flush)."""
    p = Profile(W)
    c = p.node("n")
    c.caps["egress"] = 4096
    c.open_session("s1", 1.0)
    tracemalloc.start()
    for i in range(100_000):
        c.observe("s1", f"send:udp:10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{i % 65536}", 1, 2.0 + i)
    mid, _ = tracemalloc.get_traced_memory()
    for i in range(100_000, 400_000):
        c.observe("s1", f"send:udp:10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{i % 65536}", 1, 2.0 + i)
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for i in range(400_000, 1_000_000):  # the rest of the million, untraced (faster)
        c.observe("s1", f"send:udp:10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{i % 65536}", 1, 2.0 + i)
    assert len(c.behaviours) == 4096 and c.capped
    assert c.overflow["egress"].count == 1_000_000 - 4096
    assert len(c.open_sessions["s1"]) == 4096  # refused keys are not kept per session
    assert len(c._refused) <= prof.REFUSED_SAMPLE
    assert end - mid < 2_000_000  # 300,000 more refused keys: no more memory
    size = len(encode_profile(p))
    assert size < 1_500_000, size  # the 4,096 kept behaviours, not a million
    c.close_session("s1", 3.0)
    assert c.open_sessions == {} and c._refused == set()


def test_long_keys_and_big_metadata_are_bounded():
    p = Profile(W)
    c = p.node("n")
    c.open_session("s1", 1.0, meta={"argv": ["x" * 5000] * 1000, "cgroup": "/a"})
    c.observe("s1", "exec:/" + "a" * 5000, 1, 2.0)
    assert c.behaviours == {} and c.overflow["exec"].count == 1
    meta = c.sessions["s1"].meta
    assert len(meta["argv"]) == prof.MAX_META_ITEMS + 1 and len(meta["argv"][0]) == prof.MAX_META_LEN
    for i in range(500):
        c.add_fingerprint("image", f"sha256:{i:064x}", float(i))
    assert len(c.fingerprints["image"]) == prof.MAX_FINGERPRINT_VALUES
    assert f"sha256:{499:064x}" in c.fingerprints["image"]  # the most recent ones stay
    assert len(msgpack.packb(c.pack())) < 200_000


def test_session_records_are_bounded_and_the_dropped_ones_counted(monkeypatch):
    monkeypatch.setattr(prof, "MAX_SESSIONS", 50)
    p = Profile(W)
    c = p.node("n")
    for i in range(200):
        c.open_session(f"s{i}", float(i), meta={"i": i})
        c.observe(f"s{i}", "syscall:read", 1, float(i))
        c.close_session(f"s{i}", float(i) + 0.5)
    assert len(c.sessions) == 50 and c.sessions_dropped == 150
    assert p.session_count == 200 and c.behaviours["syscall:read"].sessions == 200
    assert set(c.sessions) == {f"s{i}" for i in range(150, 200)}  # the oldest went
    back = Profile.unpack(p.pack())
    assert back.node("n").sessions_dropped == 150


def test_open_sessions_are_never_dropped(monkeypatch):
    monkeypatch.setattr(prof, "MAX_SESSIONS", 10)
    c = Profile(W).node("n")
    for i in range(30):
        c.open_session(f"s{i}", float(i))
    assert len(c.sessions) == 30 and c.sessions_dropped == 0
