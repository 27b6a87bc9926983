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
