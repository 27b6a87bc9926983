"""The sensor against the real kernel: real BPF, real cgroup v2 directories, real processes.

A small C workload (tests/privileged/workloads/workload.c, compiled here with gcc) makes a
known number of rare syscalls, execs a known binary, connects and sends to local listeners.
Each test runs it in its own fresh cgroup and checks exact counts attributed to that cgroup id.

The sensor as it ships counts syscalls, destinations and exec paths in the kernel and
announces first sightings; the process-lifecycle tests use a second sensor built with
``trace_events`` (one record per exec, fork, exit and connect/send).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sensor import syscalls
from sensor.cgroup import CgroupFS
from sensor.events import (
    ExecEvent, ExecFirstEvent, ExitEvent, ForkEvent, NetEvent, NetFirstEvent, SyscallFirstEvent,
)

WORKLOAD_C = Path(__file__).resolve().parent / "workloads" / "workload.c"
NR_GETCPU = syscalls.number("getcpu")
NR_EXECVE = syscalls.number("execve")
NR_PERSONALITY = syscalls.number("personality")
TRUE = "/usr/bin/true"


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the test workload; run make setup")
    out = tmp_path_factory.mktemp("workload") / "workload"
    subprocess.run([gcc, "-O1", "-Wall", "-o", str(out), str(WORKLOAD_C)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def module_sensor():
    from sensor.probes import Sensor
    s = Sensor()
    s.attach()
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_tracer():
    from sensor.probes import Sensor
    s = Sensor(trace_events=True)
    s.attach()
    yield s
    s.close()


def _emptied(s):
    while s.poll(0):
        pass
    lost = s.loss()
    yield s
    after = s.loss()
    assert after == lost, f"events lost during the test: before {lost}, after {after}"


@pytest.fixture
def sensor(module_sensor):
    """The module's sensor with its ring buffer emptied of what earlier tests left."""
    yield from _emptied(module_sensor)


@pytest.fixture
def tracer(module_tracer):
    """The module's tracing sensor (a record per exec, fork, exit, connect), emptied."""
    yield from _emptied(module_tracer)


@pytest.fixture
def cgroups():
    """Make fresh cgroups under the cgroup2 mount; every one is removed afterwards."""
    fs = CgroupFS()
    made: list[str] = []

    def make() -> tuple[Path, int]:
        rel = f"/envelope-test-{uuid.uuid4().hex[:12]}"
        made.append(rel)
        return fs.make(rel)

    yield make
    for rel in made:
        fs.remove(rel)


def run_in(cgroup: Path | None, argv: list[str]) -> tuple[int, str, int]:
    """Run ``argv`` inside ``cgroup`` (moved there before exec); returns (pid, stdout, rc)."""
    def enter():
        if cgroup is not None:
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write("0")

    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=enter)
    out, _ = p.communicate(timeout=60)
    return p.pid, out, p.returncode


def children(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("child ")]


def drain(sensor, done, max_polls: int = 100) -> list:
    """Poll until ``done(events so far)`` holds (bounded by a poll count, not by time)."""
    got: list = []
    for _ in range(max_polls):
        got += sensor.poll(50)
        if done(got):
            break
    return got


def exit_of(pid):
    return lambda evs: any(isinstance(e, ExitEvent) and e.pid == pid for e in evs)


def drained(sensor) -> list:
    """Everything the ring buffer holds now (the workload has exited: all of it is committed)."""
    got: list = []
    for _ in range(3):
        got += sensor.poll(20)
    while True:
        more = sensor.poll(0)
        if not more:
            return got
        got += more


# ---- syscall counting ---------------------------------------------------------------------------


def test_exact_syscall_counts_per_cgroup(sensor, cgroups, workload):
    a, a_id = cgroups()
    b, b_id = cgroups()
    run_in(a, [workload, "getcpu=37", "personality=11"])
    run_in(b, [workload, "getcpu=5"])
    counts = sensor.syscall_counts()
    assert counts[a_id][NR_GETCPU] == 37
    assert counts[a_id][NR_PERSONALITY] == 11
    assert counts[b_id][NR_GETCPU] == 5
    assert NR_PERSONALITY not in counts[b_id]
    # Cumulative, not drained: a second read gives the same.
    assert sensor.syscall_counts()[a_id] == counts[a_id]


def test_counts_from_the_cgroups_first_exec_leave_out_the_setup_before_it(sensor, cgroups, workload):
    """What a cgroup does before its first exec (a container runtime's setup) is kept apart."""
    import ctypes

    a, a_id = cgroups()

    def setup_then_exec():
        with open(a / "cgroup.procs", "w") as f:
            f.write("0")
        libc = ctypes.CDLL(None)
        for _ in range(3):
            libc.personality(0xffffffff)

    p = subprocess.Popen([workload, "personality=11"], stdout=subprocess.PIPE,
                         preexec_fn=setup_then_exec)
    p.communicate(timeout=60)
    everything = sensor.syscall_counts()[a_id]
    image = sensor.syscall_counts(after_exec={a_id})[a_id]
    assert everything[NR_PERSONALITY] == 14
    assert image[NR_PERSONALITY] == 11
    # the execve that started the image entered the kernel before the exec: setup
    assert NR_EXECVE in everything and NR_EXECVE not in image
    assert all(image[nr] <= everything[nr] for nr in image)


def test_processes_outside_the_cgroup_are_not_attributed(sensor, cgroups, workload):
    a, a_id = cgroups()
    run_in(a, [workload, "getcpu=13"])
    before = sensor.syscall_counts()[a_id]
    run_in(None, [workload, "getcpu=1000", "personality=3"])  # the test's own cgroup
    after = sensor.syscall_counts()[a_id]
    assert after == before
    assert after[NR_GETCPU] == 13


def test_a_process_that_moves_is_counted_in_each_cgroup(sensor, cgroups, workload):
    # The same task (same kernel stack, so the same per-CPU cache key) changes cgroup midway;
    # the cache generation must make the counts follow it.
    a, a_id = cgroups()
    b, b_id = cgroups()
    run_in(a, [workload, "getcpu=21", f"move={b / 'cgroup.procs'}", "getcpu2=8"])
    counts = sensor.syscall_counts()
    assert counts[a_id][NR_GETCPU] == 21
    assert counts[b_id][NR_GETCPU] == 8


def test_first_seen_fires_once_per_syscall_and_cgroup(sensor, cgroups, workload):
    a, a_id = cgroups()
    pid, _, _ = run_in(a, [workload, "getcpu=50", "personality=2"])
    events = drained(sensor)
    firsts = [e for e in events if isinstance(e, SyscallFirstEvent) and e.cgroup_id == a_id]
    per_nr = Counter(e.nr for e in firsts)
    assert per_nr[NR_GETCPU] == 1 and per_nr[NR_PERSONALITY] == 1
    assert set(per_nr.values()) == {1}
    # Every syscall the cgroup made was announced, and nothing else.
    assert set(per_nr) == set(sensor.syscall_counts()[a_id])
    getcpu = next(e for e in firsts if e.nr == NR_GETCPU)
    assert getcpu.name == "getcpu" and getcpu.behaviour_key() == "syscall:getcpu"
    assert getcpu.pid == pid
    # Running again in the same cgroup announces nothing new for these syscalls.
    run_in(a, [workload, "getcpu=5"])
    again = drained(sensor)
    assert not [e for e in again if isinstance(e, SyscallFirstEvent)
                and e.cgroup_id == a_id and e.nr in (NR_GETCPU, NR_PERSONALITY)]
    assert sensor.decoder.errors == {"decode_error": 0, "unknown_version": 0, "unknown_type": 0}


# ---- process lifecycle --------------------------------------------------------------------------


def test_exec_fork_exit_with_parent_from_fork_tracking(tracer, cgroups, workload):
    a, a_id = cgroups()
    pid, out, rc = run_in(a, [workload, f"exec={TRUE}", "exit=7"])
    assert rc == 7
    [child] = children(out)
    events = [e for e in drain(tracer, exit_of(pid)) if getattr(e, "cgroup_id", None) == a_id]

    execs = [e for e in events if isinstance(e, ExecEvent)]
    assert [(e.pid, e.filename) for e in execs] == [(pid, workload), (child, TRUE)]
    assert execs[0].ppid == os.getpid()  # forked by this test process
    assert execs[1].ppid == pid
    assert execs[1].argv == [TRUE, "envelope-arg"]
    assert execs[1].behaviour_key() == f"exec:{TRUE}"

    forks = [e for e in events if isinstance(e, ForkEvent)]
    assert [(e.pid, e.ppid) for e in forks] == [(child, pid)]

    exits = {e.pid: e for e in events if isinstance(e, ExitEvent)}
    assert exits[child].exit_code == 0
    assert exits[pid].exit_code == 7
    order = [e for e in events if isinstance(e, (ExecEvent, ForkEvent, ExitEvent))]
    assert [type(e).__name__ for e in order] == [
        "ExecEvent", "ForkEvent", "ExecEvent", "ExitEvent", "ExitEvent"]


def test_exit_by_signal_has_no_exit_code(tracer, cgroups):
    a, a_id = cgroups()
    pid, _, rc = run_in(a, ["/bin/sh", "-c", "kill -9 $$"])
    assert rc == -9
    events = drain(tracer, exit_of(pid))
    [ex] = [e for e in events if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.cgroup_id == a_id and ex.exit_code is None


def test_thread_exits_do_not_give_a_killed_process_an_exit_code(tracer, cgroups):
    # Threads end with exit(0) (pthread_exit); the process is then killed by a signal.
    a, a_id = cgroups()
    script = ("import os, signal, threading; t = threading.Thread(target=lambda: None); "
              "t.start(); t.join(); os.kill(os.getpid(), signal.SIGKILL)")
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == -9
    [ex] = [e for e in drain(tracer, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.exit_code is None


def test_exit_code_of_a_thread_that_ends_the_process(tracer, cgroups):
    # A second thread ends the process with exit_group(5) while the main thread waits for it;
    # whichever thread is last to go, the status is the group's.
    a, a_id = cgroups()
    script = ("import os, threading, time; threading.Thread(target=lambda: (time.sleep(0.05), "
              "os._exit(5))).start()")
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == 5
    [ex] = [e for e in drain(tracer, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.exit_code == 5


def test_threads_are_not_reported_as_forks(tracer, cgroups):
    a, a_id = cgroups()
    script = "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()"
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == 0
    events = drain(tracer, exit_of(pid))
    assert not [e for e in events if isinstance(e, ForkEvent) and e.cgroup_id == a_id]
    assert [e.pid for e in events if isinstance(e, ExitEvent) and e.cgroup_id == a_id] == [pid]


# ---- network ------------------------------------------------------------------------------------


@pytest.fixture
def listeners():
    """A TCP listener on 127.0.0.1 and on ::1, and UDP receivers on both, on free ports."""
    socks = []
    tcp4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp4.bind(("127.0.0.1", 0))
    tcp4.listen(4096)  # a full accept queue drops SYNs, and a dropped SYN stalls a connect 1 s
    tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp6.bind(("::1", 0))
    tcp6.listen(8)
    udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp4.bind(("127.0.0.1", 0))
    port = udp4.getsockname()[1]
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", port))
    socks += [tcp4, tcp6, udp4, udp6]
    stop = threading.Event()

    def accept():  # so that many connects to tcp4 never wait on a full accept queue
        tcp4.settimeout(0.1)
        while not stop.is_set():
            try:
                tcp4.accept()[0].close()
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield {"tcp": tcp4.getsockname()[1], "tcp6": tcp6.getsockname()[1], "udp": port,
           "udp_socks": (udp4, udp6)}
    stop.set()
    acceptor.join()
    for s in socks:
        s.close()


def test_connect_and_send_destinations(sensor, cgroups, workload, listeners):
    a, a_id = cgroups()
    tcp, tcp6, udp = listeners["tcp"], listeners["tcp6"], listeners["udp"]
    pid, _, rc = run_in(a, [workload, f"tcp={tcp}", f"tcp6={tcp6}", f"udp={udp}"])
    assert rc == 0
    for s in listeners["udp_socks"]:  # the datagrams really went out
        assert s.recv(16) == b"x"
    events = drained(sensor)
    keys = {f"connect:tcp:127.0.0.1:{tcp}", f"connect:tcp:[::1]:{tcp6}",
            f"send:udp:127.0.0.1:{udp}", f"send:udp:[::1]:{udp}"}
    net = [e for e in events if isinstance(e, NetFirstEvent) and e.cgroup_id == a_id]
    assert Counter(e.behaviour_key() for e in net) == Counter({k: 1 for k in keys})
    assert {(e.family, e.proto) for e in net} == {(4, "tcp"), (6, "tcp"), (4, "udp"), (6, "udp")}
    assert all(e.pid == pid for e in net)
    counts = sensor.behaviour_counts()[a_id]
    assert {k: r.count for k, r in counts.items() if k in keys} == {k: 1 for k in keys}
    # Nothing from this process was counted or announced for any other cgroup.
    assert not [e for e in events if isinstance(e, NetFirstEvent) and e.pid == pid
                and e.cgroup_id != a_id]
    # No per-occurrence records unless built with trace_events.
    assert not [e for e in events if isinstance(e, (NetEvent, ExecEvent, ForkEvent, ExitEvent))]


def test_many_connects_to_one_destination_are_one_announcement_and_an_exact_count(
        sensor, cgroups, workload, listeners):
    a, a_id = cgroups()
    tcp, udp = listeners["tcp"], listeners["udp"]
    before = time.time()
    run_in(a, [workload, f"tcp={tcp}", "tcpn=199", f"udp={udp}", "udpn=299"])
    after = time.time()
    events = [e for e in drained(sensor) if getattr(e, "cgroup_id", None) == a_id]
    firsts = Counter(e.behaviour_key() for e in events if isinstance(e, NetFirstEvent))
    tkey, ukey = f"connect:tcp:127.0.0.1:{tcp}", f"send:udp:127.0.0.1:{udp}"
    assert firsts == Counter({tkey: 1, ukey: 1, f"send:udp:[::1]:{udp}": 1})
    counts = sensor.behaviour_counts()[a_id]
    assert counts[tkey].count == 200
    assert counts[ukey].count == 300
    for r in (counts[tkey], counts[ukey]):
        assert before - 0.01 <= r.first_seen < r.last_seen <= after + 0.01
    # Again in the same cgroup: nothing is announced, the counts move by exactly as much.
    run_in(a, [workload, f"tcp={tcp}", "tcpn=49"])
    assert not [e for e in drained(sensor) if getattr(e, "cgroup_id", None) == a_id
                and isinstance(e, (NetFirstEvent, ExecFirstEvent))]
    again = sensor.behaviour_counts()[a_id]
    assert again[tkey].count == 250 and again[ukey].count == 300
    assert again[tkey].first_seen == pytest.approx(counts[tkey].first_seen, abs=1e-3)
    assert again[tkey].last_seen > counts[tkey].last_seen


def test_execs_of_one_path_are_one_announcement_with_parent_and_argv(sensor, cgroups, workload):
    a, a_id = cgroups()
    pid, out, rc = run_in(a, [workload, "forks=40", f"exec={TRUE}"])
    assert rc == 0 and len(children(out)) == 40
    firsts = [e for e in drained(sensor) if isinstance(e, ExecFirstEvent) and e.cgroup_id == a_id]
    assert [(e.filename, e.pid) for e in firsts] == [(workload, pid), (TRUE, children(out)[0])]
    assert firsts[0].ppid == os.getpid()
    assert firsts[1].ppid == pid  # fork tracking still names the parent
    assert firsts[1].argv == [TRUE, "envelope-arg"]
    counts = sensor.behaviour_counts()[a_id]
    assert counts[f"exec:{TRUE}"].count == 40
    assert counts[f"exec:{workload}"].count == 1
    slot = sensor.behaviour_slot(a_id)
    assert (slot["exec_entries"], slot["exec_dropped"]) == (2, 0)


def test_changed_only_readings_leave_out_what_did_not_move(sensor, cgroups, workload, listeners):
    a, a_id = cgroups()
    b, b_id = cgroups()
    run_in(a, [workload, f"tcp={listeners['tcp']}"])
    run_in(b, [workload, f"tcp={listeners['tcp']}"])
    sensor.behaviour_counts(changed_only=True)  # the baseline of what is there now
    run_in(b, [workload, f"tcp={listeners['tcp']}"])
    changed = sensor.behaviour_counts(changed_only=True)
    assert a_id not in changed
    assert changed[b_id][f"connect:tcp:127.0.0.1:{listeners['tcp']}"].count == 2
    assert sensor.behaviour_counts()[a_id][f"connect:tcp:127.0.0.1:{listeners['tcp']}"].count == 1


def test_connect_result_when_built_with_net_result(cgroups, workload, listeners):
    from sensor.probes import Sensor
    a, a_id = cgroups()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()  # bound then closed: nothing listens there
    with Sensor(ringbuf_pages=16, cflags=["-DNET_RESULT=1", f"-DEVENT_CGROUP={a_id}"]) as s:
        pid, _, _ = run_in(a, [workload, f"tcp={listeners['tcp']}", f"udp={listeners['udp']}"])
        pid2, _, _ = run_in(a, [workload, f"tcp={refused}"])
        events = drain(s, exit_of(pid2))
    net = {(e.pid, e.behaviour_key()): e for e in events if isinstance(e, NetEvent)}
    assert net[(pid, f"connect:tcp:127.0.0.1:{listeners['tcp']}")].ret == 0
    assert net[(pid, f"send:udp:127.0.0.1:{listeners['udp']}")].ret == 1  # bytes sent
    assert net[(pid, f"send:udp:[::1]:{listeners['udp']}")].ret == 1
    assert net[(pid2, f"connect:tcp:127.0.0.1:{refused}")].ret == -111  # ECONNREFUSED
    # Only the filtered cgroup's events were emitted.
    assert {e.cgroup_id for e in events if hasattr(e, "cgroup_id")} == {a_id}


# ---- loss ---------------------------------------------------------------------------------------


def test_loss_counter_equals_what_went_missing(cgroups, workload):
    """One page of ring buffer, events from one cgroup only, nobody polling while the workload
    runs: every exec, fork and exit is either received or counted as lost, exactly."""
    from sensor.probes import Sensor
    a, a_id = cgroups()
    forks = 120
    with Sensor(ringbuf_pages=1, cflags=[f"-DEVENT_CGROUP={a_id}"], trace_events=True) as s:
        pid, out, rc = run_in(a, [workload, f"forks={forks}"])
        assert rc == 0 and len(children(out)) == forks
        received: list = []
        while True:
            got = s.poll(0)
            if not got:
                break
            received += got
        loss = s.loss()
    kinds = Counter(type(e).__name__ for e in received)
    generated = {"ExecEvent": 1 + forks, "ForkEvent": forks, "ExitEvent": forks + 1}
    names = {"ExecEvent": "ringbuf_full_exec", "ForkEvent": "ringbuf_full_fork",
             "ExitEvent": "ringbuf_full_exit"}
    for kind, n in generated.items():
        assert loss[names[kind]] == n - kinds[kind], (kind, loss, kinds)
    assert sum(loss[names[k]] for k in generated) > 0  # the buffer really overflowed
    assert sum(kinds[k] for k in generated) > 0
    assert loss["decode_error"] == 0 and loss["unknown_version"] == 0


def test_a_consumer_that_keeps_up_loses_nothing_once_the_ring_has_wrapped(cgroups, workload, listeners):
    """60,000 connect records through a 256 KiB ring (it wraps 16 times), drained as they come:
    every one arrives and no reservation fails. The consumer position is one 8-byte store; when
    it was written with struct.pack_into, which zeroes the field before writing it, producers
    that read the position in between saw a full ring and dropped records (BENCHMARKS.md)."""
    from sensor.probes import Sensor
    a, a_id = cgroups()
    n = 60_000
    with Sensor(ringbuf_pages=64, cflags=[f"-DEVENT_CGROUP={a_id}"], trace_events=True) as s:
        p = subprocess.Popen([workload, f"tcp={listeners['tcp']}", f"tcpn={n - 1}"],
                             preexec_fn=lambda: (a / "cgroup.procs").write_text("0"))
        got = 0
        while p.poll() is None:
            got += sum(1 for e in s.poll(50) if isinstance(e, NetEvent) and e.op == "connect")
        got += sum(1 for e in drained(s) if isinstance(e, NetEvent) and e.op == "connect")
        assert p.returncode == 0
        loss = s.loss()
        assert loss["ringbuf_full_net"] == 0, loss
        assert got == n
        assert s.behaviour_counts()[a_id][f"connect:tcp:127.0.0.1:{listeners['tcp']}"].count == n


def test_a_full_ring_delays_announcements_and_never_changes_a_count(cgroups, workload):
    """One page of ring buffer, nobody polling: of 70 new destinations some announcements do
    not fit. Each is counted as lost once, the counts are exact anyway, and the next send to a
    destination whose announcement was refused announces it."""
    from sensor.probes import Sensor
    a, a_id = cgroups()
    n = 70
    keys = {f"send:udp:127.0.0.1:{20000 + i}" for i in range(n)}
    with Sensor(ringbuf_pages=1, cflags=[f"-DEVENT_CGROUP={a_id}"]) as s:
        run_in(a, [workload, f"spread={n}"])
        first = [e for e in drained(s) if isinstance(e, NetFirstEvent)]
        refused = s.loss()["ringbuf_full_net_first"]
        announced = {e.behaviour_key() for e in first}
        assert len(first) == len(announced) and announced <= keys
        assert refused > 0 and len(announced) + refused == n  # the buffer really overflowed
        run_in(a, [workload, f"spread={n}"])
        second = {e.behaviour_key() for e in drained(s) if isinstance(e, NetFirstEvent)}
        assert second == keys - announced  # the refused ones, announced at their next send
        assert s.loss()["ringbuf_full_net_first"] == refused
        counts = s.behaviour_counts()[a_id]
        assert {k: counts[k].count for k in keys} == {k: 2 for k in keys}


# ---- caps ---------------------------------------------------------------------------------------


def test_a_cgroup_beyond_its_caps_counts_what_it_dropped(cgroups, workload, listeners):
    """Caps of 16 destinations and 2 exec paths per cgroup: the first ones are counted exactly,
    the rest are counted as dropped (with an estimate of how many distinct ones), and another
    cgroup still gets entries of its own."""
    from sensor import sketch
    from sensor.probes import Sensor
    a, a_id = cgroups()
    b, b_id = cgroups()
    with Sensor(ringbuf_pages=16, cflags=["-DNET_CGROUP_CAP=16", "-DEXEC_CGROUP_CAP=2"]) as s:
        assert s.caps == {"egress": 16, "exec": 2}
        run_in(a, [workload, "spread=100"])
        run_in(a, [workload, "spread=100"])  # the same 100 again
        run_in(a, [workload, "forks=3", "exec=/bin/true"])  # the second exec path
        run_in(a, [TRUE])  # a third path, twice: over the cap
        run_in(a, [TRUE])
        run_in(b, [workload, f"tcp={listeners['tcp']}"])
        counts = s.behaviour_counts()
        mine = {k: r.count for k, r in counts[a_id].items() if k.startswith("send:")}
        assert len(mine) == 16 and set(mine.values()) == {2}
        slot = s.behaviour_slot(a_id)
        assert slot["net_entries"] == 16 and slot["net_dropped"] == 2 * 84
        assert 84 * 0.7 <= sketch.estimate(slot["net_sketch"]) <= 84 * 1.3
        assert slot["exec_entries"] == 2 and slot["exec_dropped"] == 2
        assert sketch.estimate(slot["exec_sketch"]) == 1
        assert {k: r.count for k, r in counts[a_id].items() if k.startswith("exec:")} == {
            f"exec:{workload}": 3, "exec:/bin/true": 3}
        dropped = s.dropped_counts()[a_id]
        assert dropped["egress"].count == 168 and dropped["exec"].count == 2
        assert (dropped["egress"].distinct, dropped["exec"].distinct) == (
            sketch.estimate(slot["net_sketch"]), 1)
        assert dropped["egress"].first_seen <= dropped["egress"].last_seen
        assert counts[b_id][f"connect:tcp:127.0.0.1:{listeners['tcp']}"].count == 1
        assert b_id not in s.dropped_counts()


def test_a_million_destinations_from_one_cgroup_stay_bounded(cgroups, workload):
    """One container connects to 1,000,000 distinct destinations: the kernel keeps its cap of
    entries and counts the rest as dropped; the sensor, the pump and the aggregator hold no more
    than the cap either, and the profile says what was dropped."""
    from sensor.aggregate import Aggregator
    from sensor.probes import DEFAULT_NET_CGROUP_CAP, Sensor
    from sensor.pump import Pump, TreeBinding
    from sensor.workload import Workload
    n = 1_000_000
    cap = DEFAULT_NET_CGROUP_CAP
    a, a_id = cgroups()
    w = Workload.host("spray")
    with Sensor(ringbuf_pages=64) as s:
        agg = Aggregator("n1", None, syscalls.name)
        binding = TreeBinding(str(a), w, "s1")
        pump = Pump(s, binding, agg, counts_interval=0.5)
        binding.bind(a_id, agg)
        p = subprocess.Popen([workload, f"spray={n}"], stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: (a / "cgroup.procs").write_text("0"))
        while p.poll() is None:
            pump.step(50)
        out = p.stdout.read()
        pump.finish()
        assert f"sprayed {n} failed 0" in out
        slot = s.behaviour_slot(a_id)
        assert slot["net_entries"] == cap
        assert slot["net_dropped"] == n - cap
        kept = {k: r for k, r in s.behaviour_counts()[a_id].items() if k.startswith("connect:udp:")}
        assert len(kept) == cap and all(r.count == 1 for r in kept.values())
        # Userspace holds per cgroup no more than the kernel's cap of keys.
        assert len(s._count_keys["net_counts"]) <= cap + 64
        assert len(agg._last_key_counts[a_id]) <= cap + 64
        profile = agg.profile(w)
        node = profile.node("n1")
        egress = [k for k in node.behaviours if k.startswith("connect:")]
        assert len(egress) == cap  # the profile's egress cap is the kernel's
        assert sum(node.behaviours[k].count for k in egress) == cap
        assert profile.capped
        o = profile.overflow()["egress"]
        assert o.count == n - cap
        assert 0.75 * (n - cap) <= o.new_keys <= 1.25 * (n - cap)
        assert s.loss()["net_table_full"] == 0  # one cgroup's cap, not the whole table
        pump.release()


# ---- slots --------------------------------------------------------------------------------------


def test_forget_cgroup_frees_the_slot_and_a_reused_slot_starts_at_zero(cgroups, workload):
    from sensor.probes import SLOT_REUSE_GRACE, Sensor
    a, a_id = cgroups()
    with Sensor(ringbuf_pages=16, cflags=[f"-DEVENT_CGROUP={a_id}"]) as s:
        run_in(a, [workload, "getcpu=40"])
        assert s.syscall_counts()[a_id][NR_GETCPU] == 40
        slot = s.cgroup_slots()[a_id]
        reused = False
        # Freed slots are handed out last-in first-out, so the next new cgroup gets a's slot
        # unless some other cgroup on the host makes its first syscall in between: retry then.
        for _ in range(5):
            s.forget_cgroup(a_id)
            assert a_id not in s.syscall_counts() and a_id not in s.cgroup_slots()
            time.sleep(SLOT_REUSE_GRACE * 2)  # let the freed slot out of quarantine
            s.syscall_counts()
            c, c_id = cgroups()
            run_in(c, [workload, "getcpu=6"])
            counts = s.syscall_counts()
            assert counts[c_id][NR_GETCPU] == 6  # a's 40 did not leak into a reused slot
            if s.cgroup_slots()[c_id] == slot:
                reused = True
                break
            a_id, slot = c_id, s.cgroup_slots()[c_id]
        assert reused


def test_syscalls_without_a_free_slot_are_counted_as_unattributed(cgroups, workload):
    from sensor.probes import Sensor
    b, b_id = cgroups()
    # One slot, taken by whichever cgroup makes the first syscall after attach (this test's).
    with Sensor(max_cgroups=1, ringbuf_pages=16, cflags=[f"-DEVENT_CGROUP={b_id}"]) as s:
        before = s.loss()["syscall_unattributed"]
        run_in(b, [workload, "getcpu=9"])
        assert b_id not in s.syscall_counts()
        assert len(s.cgroup_slots()) == 1
        assert s.loss()["syscall_unattributed"] >= before + 9


def test_a_removed_cgroup_is_reported_once_more_then_its_slot_is_freed(sensor, workload):
    fs = CgroupFS()
    rel = f"/envelope-test-{uuid.uuid4().hex[:12]}"
    a, a_id = fs.make(rel)
    try:
        run_in(a, [workload, "getcpu=17"])
        assert a_id in sensor.cgroup_slots()
    finally:
        fs.remove(rel)
    final = sensor.syscall_counts()
    assert final[a_id][NR_GETCPU] == 17  # the last reading still has it
    assert a_id not in sensor.cgroup_slots()  # then its slot was freed
    assert a_id not in sensor.syscall_counts()


def test_forgetting_a_live_cgroup_gives_it_a_fresh_slot(sensor, cgroups, workload):
    a, a_id = cgroups()
    run_in(a, [workload, "getcpu=10"])
    assert sensor.syscall_counts()[a_id][NR_GETCPU] == 10
    sensor.forget_cgroup(a_id)
    run_in(a, [workload, "getcpu=4"])
    assert sensor.syscall_counts()[a_id][NR_GETCPU] == 4


# ---- misc ---------------------------------------------------------------------------------------


def test_wall_time_tracks_the_clock(tracer, cgroups):
    a, _ = cgroups()
    before = time.time()
    pid, _, _ = run_in(a, ["/usr/bin/true"])
    after = time.time()
    [ex] = [e for e in drain(tracer, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    # Ordering, not a duration: the event happened between the two clock reads.
    assert before - 0.01 <= tracer.wall_time(ex.ktime) <= after + 0.01


def test_loss_report_names(sensor):
    assert set(sensor.loss()) == {
        "ringbuf_full_exec", "ringbuf_full_fork", "ringbuf_full_exit", "ringbuf_full_net",
        "ringbuf_full_syscall_first", "ringbuf_full_exec_first", "ringbuf_full_net_first",
        "syscall_unattributed", "cgroup_removed_dropped", "net_unattributed",
        "exec_unattributed", "net_table_full", "exec_table_full", "decode_error",
        "unknown_version", "unknown_type"}


def test_doctor_passes_on_this_machine(capsys):
    import json
    from envelope.cli import main
    rc = main(["doctor", "-o", "json"])
    data = json.loads(capsys.readouterr().out)
    failed = [c for c in data["checks"] if c["required"] and not c["ok"]]
    assert rc == 0 and data["ok"] and not failed, failed
    names = {c["name"] for c in data["checks"]}
    assert {"btf", "raw_tracepoint", "ringbuf", "cgroup_bpf", "tracefs", "cgroup2",
            "kernel_headers", "bpf_permission", "kprobes", "fentry", "lsm"} <= names


def _root_programs(attach_type: int) -> int:
    """How many programs are attached to the cgroup2 root for ``attach_type`` (BPF_PROG_QUERY)."""
    import ctypes
    import struct

    from sensor.cgroup import cgroup2_mount_point
    bpf_prog_query, nr_bpf = 16, 321  # x86_64
    fd = os.open(cgroup2_mount_point(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        attr = ctypes.create_string_buffer(struct.pack("<IIIIQI", fd, attach_type, 0, 0, 0, 0), 128)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(nr_bpf, bpf_prog_query, attr, 128) == 0, os.strerror(ctypes.get_errno())
        return struct.unpack_from("<I", attr.raw, 24)[0]  # prog_cnt
    finally:
        os.close(fd)


def test_close_detaches_the_cgroup_programs():
    from sensor.probes import Sensor
    hooks = (10, 11, 14, 15)  # connect4, connect6, sendmsg4, sendmsg6
    before = [_root_programs(t) for t in hooks]
    s = Sensor(ringbuf_pages=1)
    s.attach()
    try:
        assert [_root_programs(t) for t in hooks] == [n + 1 for n in before]
    finally:
        s.close()
    assert [_root_programs(t) for t in hooks] == before


def test_processes_from_before_attach_get_their_parent_from_proc(cgroups):
    from sensor.probes import Sensor
    a, a_id = cgroups()

    def enter():
        with open(a / "cgroup.procs", "w") as f:
            f.write("0")

    # Started (forked) before the sensor exists; execs after it is attached.
    p = subprocess.Popen(["/bin/sh", "-c", f"read line; exec {TRUE} after-attach"],
                         stdin=subprocess.PIPE, preexec_fn=enter)
    try:
        with Sensor(ringbuf_pages=16, cflags=[f"-DEVENT_CGROUP={a_id}"]) as s:
            p.communicate(b"go\n", timeout=30)
            events = drained(s)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    [ex] = [e for e in events if isinstance(e, ExecFirstEvent) and e.filename == TRUE]
    assert ex.pid == p.pid and ex.ppid == os.getpid()
    assert ex.argv == [TRUE, "after-attach"]


def test_a_failed_load_is_one_actionable_error_and_leaves_nothing_attached():
    from sensor.probes import ProbeAttachError, Sensor
    hooks = (10, 11, 14, 15)
    before = [_root_programs(t) for t in hooks]
    s = Sensor(cflags=["-DSYSCALL_NR_SLOTS_BROKEN=1", "-DMAX_CGROUPS=not_a_number"])
    with pytest.raises(ProbeAttachError) as err:
        s.attach()
    msg = str(err.value)
    assert msg.startswith(f"sensor: compile {Path(__file__).resolve().parents[2] / 'bpf' / 'sensor.c'}:")
    assert "; fix: " in msg and "-DMAX_CGROUPS=not_a_number" in msg
    assert not s.attached
    assert [_root_programs(t) for t in hooks] == before
    with pytest.raises(RuntimeError, match="not attached"):
        s.poll(0)


# ---- loss belongs to the workload that lost it ------------------------------------------------


def _flood(cgroup: Path, workload: str, n: int) -> subprocess.Popen:
    """A noisy neighbour in ``cgroup``: ``n`` UDP connects, each to a new destination (each a
    first sighting for a node-wide sensor, so each wants a ring record)."""
    return subprocess.Popen([workload, f"spray={n}"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"))


def _flooded(p: subprocess.Popen, n: int) -> None:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and f"sprayed {n} failed 0" in out, out  # the neighbour really ran


def test_a_tracked_sensor_leaves_a_noisy_neighbour_out_before_counting(cgroups, workload, listeners):
    """Four pages of ring buffer (room for the workload's own ~150 announcements, not for the
    neighbour's 40,000), nobody polling, a neighbour flooding new destinations while the
    tracked workload runs: the neighbour gets no slot, no count and no ring space, so the
    tracked workload loses nothing and its counts are exact; a cgroup made below the tracked
    one is tracked from its first syscall."""
    from sensor.probes import Sensor
    a, a_id = cgroups()
    b, b_id = cgroups()
    child = a / "inner"
    n = 40_000
    spread = 50  # fits the ring with the workload's syscall announcements
    with Sensor(ringbuf_pages=4, tracked_only=True) as s:
        s.track_cgroup(a_id)
        child.mkdir()
        try:
            from sensor.cgroup import cgroup_id
            child_id = cgroup_id(str(child))
            noisy = _flood(b, workload, n)
            run_in(a, [workload, "getcpu=37", f"spread={spread}", f"udp={listeners['udp']}", "udpn=500"])
            run_in(child, [workload, "getcpu=5"])
            _flooded(noisy, n)
            events = drained(s)
            counts = s.syscall_counts()
            keys = s.behaviour_counts()
            loss = s.loss()
            per_cgroup = s.cgroup_loss()
            slots = s.cgroup_slots()
        finally:
            child.rmdir()
    assert {k: v for k, v in loss.items() if v} == {}, loss  # nothing lost anywhere
    assert per_cgroup == {}
    assert b_id not in slots and b_id not in counts and b_id not in keys
    assert {e.cgroup_id for e in events} <= {a_id, child_id}
    assert counts[a_id][NR_GETCPU] == 37 and counts[child_id][NR_GETCPU] == 5
    sends = {f"send:udp:127.0.0.1:{20000 + i}" for i in range(spread)}
    assert {k: keys[a_id][k].count for k in sends} == {k: 1 for k in sends}
    assert keys[a_id][f"send:udp:127.0.0.1:{listeners['udp']}"].count == 500 + 1
    announced = {e.behaviour_key() for e in events if isinstance(e, NetFirstEvent)}
    assert sends <= announced  # every first sighting of the workload arrived


def test_ring_loss_is_counted_against_the_cgroup_that_lost_it(cgroups, workload):
    """A node-wide sensor with one page of ring buffer and nobody polling: a flooding neighbour
    and a workload each lose first-sighting records. Each cgroup's own loss counter says
    exactly how many of its announcements went missing, and the node's counter holds both."""
    from sensor.probes import Sensor
    a, a_id = cgroups()
    b, b_id = cgroups()
    n, spread = 3000, 200
    with Sensor(ringbuf_pages=1) as s:
        while s.poll(0):
            pass
        before = s.loss()["ringbuf_full_net_first"]
        _flooded(_flood(b, workload, n), n)
        run_in(a, [workload, f"spread={spread}"])
        events = drained(s)
        per_cgroup = s.cgroup_loss()
        node = s.loss()["ringbuf_full_net_first"] - before
    got = Counter(e.cgroup_id for e in events if isinstance(e, NetFirstEvent))
    lost_a = per_cgroup[a_id]["ringbuf_full_net_first"]
    lost_b = per_cgroup[b_id]["ringbuf_full_net_first"]
    assert lost_a > 0 and lost_b > 0  # the ring really overflowed for both
    assert got[a_id] + lost_a == spread and got[b_id] + lost_b == n
    assert node >= lost_a + lost_b  # other cgroups of this shared machine may lose some too
