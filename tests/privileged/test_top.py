"""``envelope top``: live per-workload rates from the real sensor, scriptable as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

from sensor.cgroup import CgroupFS, host_unit_name

ROOT = Path(__file__).resolve().parents[2]


def json_documents(text: str) -> list[dict]:
    dec, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    return docs


def test_top_shows_a_busy_workload_with_its_rates(tmp_path):
    cgfs = CgroupFS()
    rel = f"/envelope.test/top-{os.getpid()}"
    path, _ = cgfs.make(rel)
    busy = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         "import ctypes, socket, subprocess, time\nl = ctypes.CDLL(None)\nend = time.time() + 60\n"
         "while time.time() < end:\n"
         "    for _ in range(2000): l.personality(0xffffffff)\n"
         "    subprocess.run(['/bin/true'])\n    time.sleep(0.05)\n"],
        preexec_fn=lambda: open(f"{path}/cgroup.procs", "w").write("0"))
    try:
        r = subprocess.run([sys.executable, "-m", "envelope.cli", "--state-dir", str(tmp_path), "top",
                            "-n", "3", "--interval", "1", "-o", "json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        busy.kill()
        busy.wait()
        cgfs.remove(rel)
        cgfs.remove_empty_parents(rel)
    assert r.returncode == 0, r.stderr
    snaps = json_documents(r.stdout)
    assert len(snaps) == 3
    name = "host/Unit/" + host_unit_name(rel).strip("/").replace("/", "_") + "/main"
    rows = [w for s in snaps[1:] for w in s["workloads"] if w["workload"] == name]
    assert rows, [w["workload"] for s in snaps for w in s["workloads"]]
    assert max(w["syscalls_per_s"] for w in rows) > 1000
    assert max(w["execs_per_s"] for w in rows) > 0
    assert all("lost" in s and "lost_total" in s for s in snaps)
