"""``envelope record`` end to end: real BPF, a real cgroup, real processes."""

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sensor.store import ProfileStore
from sensor.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
PERSONALITY_CALLS = 7

# A small known workload: a rare syscall N times, one exec, one TCP connect, one UDP send.
WORKLOAD_SRC = r"""
import ctypes, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
for _ in range({n}):
    libc.personality(0xffffffff)
subprocess.run(["/bin/true"], check=True)
s = socket.create_connection(("127.0.0.1", {port}))
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"x", ("127.0.0.1", {uport}))
sys.exit({code})
"""


def envelope(state, *args, **kw):
    return subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), *args],
                          cwd=ROOT, capture_output=True, text=True, **kw)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], udp.getsockname()[1]
    stop.set()
    t.join()
    srv.close()
    udp.close()


def test_record_builds_profile_with_exact_counts_and_passes_exit_code(tmp_path, listener):
    port, uport = listener
    src = WORKLOAD_SRC.format(n=PERSONALITY_CALLS, port=port, uport=uport, code=7)
    r = envelope(tmp_path, "record", "--workload", "known", "--session", "s1",
                 "--fingerprint", "model=m1", "--", "/usr/bin/python3", "-c", src)
    assert r.returncode == 7, r.stderr
    p = ProfileStore(tmp_path).load(Workload.host("known"))
    b = p.behaviours()
    assert b["syscall:personality"].count == PERSONALITY_CALLS
    assert b["syscall:personality"].sessions == 1
    assert b["exec:/usr/bin/python3"].count == 1
    assert b["exec:/bin/true"].count == 1
    assert b[f"connect:tcp:127.0.0.1:{port}"].count == 1
    assert b[f"send:udp:127.0.0.1:{uport}"].count == 1
    assert [s.id for s in p.sessions()] == ["s1"]
    assert p.sessions()[0].meta["exit_code"] == 7
    assert p.fingerprints() == {"model": ["m1"]}
    assert p.loss() == {}

    show = envelope(tmp_path, "profile", "show", "known", "-o", "json")
    data = json.loads(show.stdout)
    keys = {x["key"]: x for x in data["behaviours"]}
    assert keys["syscall:personality"]["count"] == PERSONALITY_CALLS
    assert data["sessions"]["ids"] == ["s1"]


def test_sessions_accumulate_and_outside_processes_are_not_attributed(tmp_path, listener):
    port, uport = listener
    src = WORKLOAD_SRC.format(n=2, port=port, uport=uport, code=0)
    # A process outside the recorded cgroup doing the same rare syscall, concurrently.
    outside = subprocess.Popen(["/usr/bin/python3", "-c",
                                "import ctypes,time\nl=ctypes.CDLL(None)\n"
                                "for _ in range(400):\n l.personality(0xffffffff); time.sleep(0.01)"])
    try:
        for s in ("a", "b"):
            r = envelope(tmp_path, "record", "--workload", "acc", "--session", s, "--",
                         "/usr/bin/python3", "-c", src)
            assert r.returncode == 0, r.stderr
    finally:
        outside.kill()
        outside.wait()
    b = ProfileStore(tmp_path).load(Workload.host("acc")).behaviours()
    assert b["syscall:personality"].count == 4
    assert b["syscall:personality"].sessions == 2
    assert b["exec:/bin/true"].sessions == 2


def test_child_cgroups_belong_to_the_session(tmp_path):
    # The command makes a child cgroup of its own, moves a child process there, and that
    # process's syscalls still count for the session.
    script = r"""
import ctypes, os, sys
cg = open("/proc/self/cgroup").read().split("0::", 1)[1].split()[0]
mnt = [l.split()[4] for l in open("/proc/self/mountinfo") if " - cgroup2 " in l][0]
child = os.path.join(mnt + cg, "inner")
os.mkdir(child)
pid = os.fork()
if pid == 0:
    open(os.path.join(child, "cgroup.procs"), "w").write("0")
    libc = ctypes.CDLL(None)
    for _ in range(5):
        libc.personality(0xffffffff)
    os._exit(0)
os.waitpid(pid, 0)
"""
    r = envelope(tmp_path, "record", "--workload", "nested", "--", "/usr/bin/python3", "-c", script)
    assert r.returncode == 0, r.stderr
    b = ProfileStore(tmp_path).load(Workload.host("nested")).behaviours()
    assert b["syscall:personality"].count == 5


def test_missing_command_is_a_clear_error(tmp_path):
    r = envelope(tmp_path, "record", "--workload", "x", "--", "/nonexistent/binary")
    assert r.returncode == 2
    assert "cannot run" in r.stderr and "Traceback" not in r.stderr


# A noisy neighbour: UDP connects to new destinations as fast as Python goes (each a first
# sighting, so each wants a ring record from a sensor that observes the node), until killed.
# Every 2,000 destinations it moves to a new cgroup of its own tree, so the per-cgroup cap of
# the kernel's destination table (4,096) never stops its announcements.
FLOOD_SRC = r"""
import os, socket, sys
root = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
i = 0
while True:
    if i % 2000 == 0:
        d = os.path.join(root, "hop-%d" % (i // 2000))
        os.mkdir(d)
        open(os.path.join(d, "cgroup.procs"), "w").write("0")
    i += 1
    s.connect(("127.%d.%d.%d" % ((i >> 16) & 255, (i >> 8) & 255, i & 255 or 1), 9))
"""

# The recorded workload: UDP sends to N new destinations in a burst, and a rare syscall.
BURST_SRC = r"""
import ctypes, socket
libc = ctypes.CDLL(None)
for _ in range(7):
    libc.personality(0xffffffff)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({n}):
    u.sendto(b"x", ("127.0.0.1", 21000 + i))
"""


@pytest.fixture
def neighbour():
    """A flooding process in a cgroup of its own, running for the whole test."""
    import os
    import uuid
    from sensor.cgroup import CgroupFS
    fs = CgroupFS()
    rel = f"/envelope-neighbour-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path, cid = fs.make(rel)
    p = subprocess.Popen(["/usr/bin/python3", "-c", FLOOD_SRC, str(path)])
    yield cid
    p.kill()
    p.wait()
    for hop in sorted(path.glob("hop-*")):
        hop.rmdir()
    fs.remove(rel)


def test_a_noisy_neighbour_costs_a_recording_no_events(tmp_path, neighbour):
    """record's own sensor observes only the recorded cgroup: a neighbour flooding new
    destinations beside it fills nothing of its ring, so the recording loses nothing, its counts
    are exact, and the sensor's own counters report no node-wide loss either (the extensions'
    programs, such as the file observation's, observe the node: their rings are not its)."""
    from envelope.config import Config
    from envelope.recording import record
    from sensor.probes import LOSS_NAMES
    import time
    time.sleep(0.3)  # the flood is under way
    cfg = Config(state_dir=tmp_path, ringbuf_pages=8, poll_interval=0.2)
    n = 300
    res = record(cfg, Workload.host("quiet"), ["/usr/bin/python3", "-c", BURST_SRC.format(n=n)])
    assert res.exit_code == 0
    sensors_own = set(LOSS_NAMES.values()) | {"decode_error", "unknown_version", "unknown_type"}
    node_loss = {k: v for k, v in res.node_loss.items() if k in sensors_own}
    assert res.loss == {} and node_loss == {}, (res.loss, res.node_loss)
    p = ProfileStore(tmp_path).load(Workload.host("quiet"))
    b = p.behaviours()
    sends = {f"send:udp:127.0.0.1:{21000 + i}" for i in range(n)}
    assert {k: b[k].count for k in sends} == {k: 1 for k in sends}
    assert b["syscall:personality"].count == 7
    assert not any(k.startswith("connect:udp:127.") for k in b)  # nothing of the neighbour's
    assert p.loss() == {}


def test_attributed_loss_is_charged_to_the_recording_and_the_neighbours_is_not(tmp_path, neighbour):
    """A shared node-wide sensor with one page of ring buffer, kept full by the neighbour: the
    recording's first sightings (its start-up syscalls, its burst) do not all fit, and neither
    do the neighbour's. The recording's profile is charged with the loss the kernel
    counted against its cgroup, exactly what the recording reports; the neighbour's loss is
    reported as node-wide and charged to no profile; the counts are exact anyway."""
    from envelope.config import Config
    from envelope.recording import record
    from sensor.probes import Sensor
    import time
    n = 1000
    cfg = Config(state_dir=tmp_path, ringbuf_pages=1, poll_interval=0.2)
    with Sensor(ringbuf_pages=1) as s:
        time.sleep(0.3)  # the flood is under way
        res = record(cfg, Workload.host("burst"), ["/usr/bin/python3", "-c", BURST_SRC.format(n=n)],
                     sensor=s)
    assert res.exit_code == 0
    # The ring really overflowed, for the recording (its first sightings) and for the neighbour.
    assert sum(v for k, v in res.loss.items() if k.startswith("ringbuf_full_")) > 0, res.loss
    assert sum(res.node_loss.values()) > 0, res.node_loss  # lost, and not the recording's
    p = ProfileStore(tmp_path).load(Workload.host("burst"))
    assert p.loss() == res.loss  # only what the kernel counted against the recorded cgroup
    b = p.behaviours()
    sends = {f"send:udp:127.0.0.1:{21000 + i}" for i in range(n)}
    # Each send counted once, or counted as dropped when the neighbour's destinations had
    # filled the node's table (which a recording's own sensor never lets happen, see above).
    kept = {k: b[k].count for k in sends if k in b}
    assert set(kept.values()) <= {1}
    dropped = p.overflow().get("egress")
    assert len(kept) + (dropped.count if dropped else 0) == n
    assert not any(k.startswith("connect:udp:127.") for k in b)
