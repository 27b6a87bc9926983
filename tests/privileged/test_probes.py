"""The sensor against the real kernel: real BPF, real cgroup v2 directories, real processes.

A small C workload (tests/privileged/workloads/workload.c, compiled here with gcc) makes a
known number of rare syscalls, execs a known binary, connects and sends to local listeners.
Each test runs it in its own fresh cgroup and checks exact counts attributed to that cgroup id.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sensor import syscalls
from sensor.cgroup import CgroupFS
from sensor.events import ExecEvent, ExitEvent, ForkEvent, NetEvent, SyscallFirstEvent

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


@pytest.fixture
def sensor(module_sensor):
    """The module's sensor with its ring buffer emptied of what earlier tests left."""
    while module_sensor.poll(0):
        pass
    lost = module_sensor.loss()
    yield module_sensor
    after = module_sensor.loss()
    assert after == lost, f"events lost during the test: before {lost}, after {after}"


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
    events = drain(sensor, exit_of(pid))
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
    pid2, _, _ = run_in(a, [workload, "getcpu=5"])
    again = drain(sensor, exit_of(pid2))
    assert not [e for e in again if isinstance(e, SyscallFirstEvent)
                and e.cgroup_id == a_id and e.nr in (NR_GETCPU, NR_PERSONALITY)]
    assert sensor.decoder.errors == {"decode_error": 0, "unknown_version": 0, "unknown_type": 0}


# ---- process lifecycle --------------------------------------------------------------------------


def test_exec_fork_exit_with_parent_from_fork_tracking(sensor, cgroups, workload):
    a, a_id = cgroups()
    pid, out, rc = run_in(a, [workload, f"exec={TRUE}", "exit=7"])
    assert rc == 7
    [child] = children(out)
    events = [e for e in drain(sensor, exit_of(pid)) if getattr(e, "cgroup_id", None) == a_id]

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


def test_exit_by_signal_has_no_exit_code(sensor, cgroups):
    a, a_id = cgroups()
    pid, _, rc = run_in(a, ["/bin/sh", "-c", "kill -9 $$"])
    assert rc == -9
    events = drain(sensor, exit_of(pid))
    [ex] = [e for e in events if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.cgroup_id == a_id and ex.exit_code is None


def test_thread_exits_do_not_give_a_killed_process_an_exit_code(sensor, cgroups):
    # Threads end with exit(0) (pthread_exit); the process is then killed by a signal.
    a, a_id = cgroups()
    script = ("import os, signal, threading; t = threading.Thread(target=lambda: None); "
              "t.start(); t.join(); os.kill(os.getpid(), signal.SIGKILL)")
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == -9
    [ex] = [e for e in drain(sensor, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.exit_code is None


def test_exit_code_of_a_thread_that_ends_the_process(sensor, cgroups):
    # A second thread ends the process with exit_group(5) while the main thread waits for it;
    # whichever thread is last to go, the status is the group's.
    a, a_id = cgroups()
    script = ("import os, threading, time; threading.Thread(target=lambda: (time.sleep(0.05), "
              "os._exit(5))).start()")
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == 5
    [ex] = [e for e in drain(sensor, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    assert ex.exit_code == 5


def test_threads_are_not_reported_as_forks(sensor, cgroups):
    a, a_id = cgroups()
    script = "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()"
    pid, _, rc = run_in(a, ["/usr/bin/python3", "-c", script])
    assert rc == 0
    events = drain(sensor, exit_of(pid))
    assert not [e for e in events if isinstance(e, ForkEvent) and e.cgroup_id == a_id]
    assert [e.pid for e in events if isinstance(e, ExitEvent) and e.cgroup_id == a_id] == [pid]


# ---- network ------------------------------------------------------------------------------------


@pytest.fixture
def listeners():
    """A TCP listener on 127.0.0.1 and on ::1, and UDP receivers on both, on free ports."""
    socks = []
    tcp4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp4.bind(("127.0.0.1", 0))
    tcp4.listen(8)
    tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp6.bind(("::1", 0))
    tcp6.listen(8)
    udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp4.bind(("127.0.0.1", 0))
    port = udp4.getsockname()[1]
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", port))
    socks += [tcp4, tcp6, udp4, udp6]
    yield {"tcp": tcp4.getsockname()[1], "tcp6": tcp6.getsockname()[1], "udp": port,
           "udp_socks": (udp4, udp6)}
    for s in socks:
        s.close()


def test_connect_and_send_destinations(sensor, cgroups, workload, listeners):
    a, a_id = cgroups()
    tcp, tcp6, udp = listeners["tcp"], listeners["tcp6"], listeners["udp"]
    pid, _, rc = run_in(a, [workload, f"tcp={tcp}", f"tcp6={tcp6}", f"udp={udp}"])
    assert rc == 0
    for s in listeners["udp_socks"]:  # the datagrams really went out
        assert s.recv(16) == b"x"
    events = drain(sensor, exit_of(pid))
    net = [e for e in events if isinstance(e, NetEvent) and e.cgroup_id == a_id]
    assert Counter(e.behaviour_key() for e in net) == Counter({
        f"connect:tcp:127.0.0.1:{tcp}": 1,
        f"connect:tcp:[::1]:{tcp6}": 1,
        f"send:udp:127.0.0.1:{udp}": 1,
        f"send:udp:[::1]:{udp}": 1,
    })
    assert {(e.family, e.proto) for e in net} == {(4, "tcp"), (6, "tcp"), (4, "udp"), (6, "udp")}
    assert all(e.pid == pid and e.ret is None for e in net)
    # Nothing from this cgroup went anywhere else.
    assert not [e for e in events if isinstance(e, NetEvent) and e.pid == pid
                and e.cgroup_id != a_id]


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
    with Sensor(ringbuf_pages=1, cflags=[f"-DEVENT_CGROUP={a_id}"]) as s:
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


def test_wall_time_tracks_the_clock(sensor, cgroups):
    a, _ = cgroups()
    before = time.time()
    pid, _, _ = run_in(a, ["/usr/bin/true"])
    after = time.time()
    [ex] = [e for e in drain(sensor, exit_of(pid)) if isinstance(e, ExitEvent) and e.pid == pid]
    # Ordering, not a duration: the event happened between the two clock reads.
    assert before - 0.01 <= sensor.wall_time(ex.ktime) <= after + 0.01


def test_loss_report_names(sensor):
    assert set(sensor.loss()) == {
        "ringbuf_full_exec", "ringbuf_full_fork", "ringbuf_full_exit", "ringbuf_full_net",
        "ringbuf_full_syscall_first", "syscall_unattributed", "cgroup_removed_dropped",
        "decode_error",
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
            events = drain(s, exit_of(p.pid))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    [ex] = [e for e in events if isinstance(e, ExecEvent) and e.filename == TRUE]
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
