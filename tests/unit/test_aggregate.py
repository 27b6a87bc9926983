"""Aggregator: counter deltas, bindings, sessions and flushing, fed with real event objects."""

from dataclasses import dataclass

from sensor.aggregate import Aggregator
from sensor.store import ProfileStore
from sensor.workload import Workload

W = Workload.host("agg")
NAMES = {0: "read", 1: "write", 39: "getpid"}


@dataclass
class FakeClock:
    t: float = 100.0

    def __call__(self):
        return self.t


@dataclass
class ExecLike:
    cgroup_id: int
    path: str

    def behaviour_key(self):
        return f"exec:{self.path}"


def make(tmp_path):
    clock = FakeClock()
    return Aggregator("node-a", ProfileStore(tmp_path), NAMES.__getitem__, clock=clock), clock


def test_cumulative_counters_become_deltas(tmp_path):
    agg, clock = make(tmp_path)
    agg.bind(7, W, "run-1")
    agg.on_counts({7: {0: 10, 39: 1}, 8: {0: 99}}, 101.0)  # cgroup 8 is not bound: ignored
    agg.on_counts({7: {0: 15, 39: 1}}, 102.0)
    b = agg.profile(W).behaviours()
    assert b["syscall:read"].count == 15
    assert b["syscall:getpid"].count == 1
    assert b["syscall:read"].sessions == 1


def test_events_and_session_close(tmp_path):
    agg, clock = make(tmp_path)
    agg.bind(7, W, "run-1")
    agg.bind(9, W, "run-1")  # a child cgroup of the same session
    agg.on_event(ExecLike(7, "/bin/true"), 101.0)
    agg.on_event(ExecLike(9, "/bin/true"), 102.0)
    agg.unbind(9)
    assert agg.profile(W).node("node-a").sessions["run-1"].end is None
    agg.unbind(7, end=110.0)
    rec = agg.profile(W).node("node-a").sessions["run-1"]
    assert rec.end == 110.0
    b = agg.profile(W).behaviours()["exec:/bin/true"]
    assert (b.count, b.sessions, b.session_sum) == (2, 1, 2.0)


def test_flush_persists_and_resumes(tmp_path):
    agg, clock = make(tmp_path)
    agg.bind(7, W, "run-1")
    agg.on_counts({7: {1: 3}}, 101.0)
    agg.close_session(W, "run-1")
    assert agg.flush() == [W]
    assert agg.flush() == []
    agg2, _ = make(tmp_path)
    agg2.bind(5, W, "run-2")
    agg2.on_counts({5: {1: 2}}, 201.0)
    agg2.close_session(W, "run-2")
    agg2.flush()
    b = ProfileStore(tmp_path).load(W).behaviours()["syscall:write"]
    assert (b.count, b.sessions) == (5, 2)


def test_loss_is_recorded_only_on_the_profiles_named(tmp_path):
    agg, _ = make(tmp_path)
    other = Workload.host("neighbour")
    agg.bind(7, W, "run-1")
    agg.bind(8, other, "run-2")
    agg.add_loss({"ringbuf_full_exec": 4}, [W])
    assert agg.profile(W).loss() == {"ringbuf_full_exec": 4}
    assert agg.profile(other).loss() == {}


def test_restart_window_starts_a_new_profile_and_keeps_running_sessions(tmp_path):
    agg, clock = make(tmp_path)
    agg.bind(7, W, "run-1")
    agg.on_counts({7: {0: 10}}, 101.0)
    agg.flush()
    ProfileStore(tmp_path).path_for(W).unlink()  # what a re-baseline does: archive the file
    clock.t = 200.0
    agg.restart_window(W)
    agg.on_counts({7: {0: 13}}, 201.0)  # cumulative: only the 3 new calls count
    p = agg.profile(W)
    assert p.behaviours()["syscall:read"].count == 3
    assert p.window()[0] == 200.0
    assert [s.id for s in p.sessions()] == ["run-1"]


def test_kernel_counted_behaviours_add_deltas_with_their_times():
    from sensor.aggregate import Aggregator, KeyReading
    from sensor.workload import Workload
    w = Workload.host("agent")
    agg = Aggregator("n1", None, str)
    agg.bind(7, w, "s1", start=100.0)
    key = "connect:tcp:10.0.3.7:443"
    agg.on_key_counts({7: {key: KeyReading(5, 101.0, 104.0)}, 99: {key: KeyReading(3, 1.0, 2.0)}})
    agg.on_key_counts({7: {key: KeyReading(5, 101.0, 104.0)}})  # nothing new
    agg.on_key_counts({7: {key: KeyReading(8, 101.0, 109.5)}})
    s = agg.profile(w).behaviours()[key]
    assert (s.count, s.sessions, s.first_seen, s.last_seen) == (8, 1, 101.0, 109.5)


# ---- kernel-counted behaviours: first sightings and readings ----------------------------------


def _first(cg, port=443):
    from sensor.events import NetFirstEvent
    return NetFirstEvent(ktime=1, pid=10, cgroup_id=cg, op="connect", proto="tcp", family=4,
                         addr="10.0.3.7", port=port)


def test_a_first_sighting_then_readings_count_each_occurrence_once():
    from sensor.aggregate import KeyReading
    w = Workload.host("agent")
    agg = Aggregator("n1", None, str)
    heard = []
    agg.listeners.append(lambda _w, _s, key, n, _ts: heard.append((key, n)))
    agg.bind(7, w, "s1", start=100.0)
    key = "connect:tcp:10.0.3.7:443"
    agg.on_event(_first(7), 101.0)  # announced at once: listeners hear of it now
    assert heard == [(key, 1)]
    agg.on_key_counts({7: {key: KeyReading(1, 101.0, 101.0)}})  # the reading holds that one
    agg.on_key_counts({7: {key: KeyReading(6, 101.0, 103.0)}})
    s = agg.profile(w).behaviours()[key]
    assert (s.count, s.first_seen, s.last_seen) == (6, 101.0, 103.0)
    assert heard == [(key, 1), (key, 5)]
    assert agg.totals[w].connects == 6


def test_a_reading_before_the_first_sighting_is_not_counted_twice():
    from sensor.aggregate import KeyReading
    w = Workload.host("agent")
    agg = Aggregator("n1", None, str)
    agg.bind(7, w, "s1", start=100.0)
    key = "connect:tcp:10.0.3.7:443"
    agg.on_key_counts({7: {key: KeyReading(4, 101.0, 102.0)}})
    agg.on_event(_first(7), 101.0)  # drained after the reading (or retried after a full ring)
    assert agg.profile(w).behaviours()[key].count == 4
    agg.on_key_counts({7: {key: KeyReading(5, 101.0, 104.0)}})
    assert agg.profile(w).behaviours()[key].count == 5


def test_per_occurrence_records_of_kernel_counted_behaviours_add_nothing():
    from sensor.events import ExecEvent
    agg = Aggregator("n1", None, str)
    agg.bind(7, W, "s1", start=100.0)
    agg.on_event(ExecEvent(ktime=1, pid=3, ppid=2, cgroup_id=7, filename="/bin/true"), 101.0)
    assert agg.profile(W).behaviours() == {}
    agg.on_event(ExecLike(7, "/bin/true"), 101.0)  # an event without kernel counting: one each
    assert agg.profile(W).behaviours()["exec:/bin/true"].count == 1


def test_drops_beyond_the_kernels_caps_mark_the_profile_capped_with_what_was_dropped():
    from sensor.aggregate import DropReading
    agg = Aggregator("n1", None, str)
    agg.bind(7, W, "s1", start=100.0)
    agg.bind(8, W, "s2", start=100.0)
    agg.on_dropped({7: {"egress": DropReading(10, 8, 101.0, 102.0)}})
    agg.on_dropped({7: {"egress": DropReading(10, 8, 101.0, 102.0)},  # nothing new
                    8: {"exec": DropReading(3, 1, 105.0, 106.0)},
                    99: {"egress": DropReading(50, 50, 1.0, 2.0)}})  # not bound: ignored
    agg.on_dropped({7: {"egress": DropReading(25, 19, 101.0, 109.0)}})
    p = agg.profile(W)
    assert p.capped
    o = p.overflow()
    assert (o["egress"].count, o["egress"].new_keys) == (25, 19)
    assert (o["egress"].first_seen, o["egress"].last_seen) == (101.0, 109.0)
    assert (o["exec"].count, o["exec"].new_keys) == (3, 1)
