"""``envelope daemon``: ready line, node-wide attribution by cgroup, flush on SIGTERM."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from sensor.cgroup import CgroupFS, host_unit_name
from sensor.store import ProfileStore

ROOT = Path(__file__).resolve().parents[2]


def wait_for_line(proc, word, timeout=120):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stderr], [], [], 1)
        if r:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if word in line:
                return line
    raise AssertionError(f"no {word!r} line; saw: {''.join(seen)[-2000:]}")


def test_daemon_profiles_a_cgroup_and_flushes_on_sigterm(tmp_path):
    cgfs = CgroupFS()
    rel = f"/envelope.test/daemon-{os.getpid()}"
    path, cid = cgfs.make(rel)
    proc = subprocess.Popen(
        [sys.executable, "-m", "envelope.cli", "--state-dir", str(tmp_path), "--log-json",
         "daemon", "--metrics-port", "0", "--flush-interval", "3600"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc, "ready")
        script = ("import ctypes\nl=ctypes.CDLL(None)\n"
                  "for _ in range(9): l.personality(0xffffffff)\n")
        w = subprocess.Popen(["/usr/bin/python3", "-c", script],
                             preexec_fn=lambda: open(f"{path}/cgroup.procs", "w").write("0"))
        assert w.wait() == 0
        time.sleep(2.5)  # let at least one counter read pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cgfs.remove(rel)
        cgfs.remove_empty_parents(rel)
    store = ProfileStore(tmp_path)
    matches = [w for w in store.workloads() if w.name == host_unit_name(rel).strip("/").replace("/", "_")]
    assert matches, [w.key for w in store.workloads()]
    b = store.load(matches[0]).behaviours()
    assert b["syscall:personality"].count == 9
    assert b["exec:/usr/bin/python3"].count == 1
