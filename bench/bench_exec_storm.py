"""``envelope exec`` under a denial storm: its memory, and counts that are exact.

``bench/progs/denied_storm.c`` retries a denied getsid(2) as fast as it can in 2 processes for
the run's length, under ``envelope exec --mode enforce`` with a policy that allows every syscall
but getsid and execve. The exec process's memory (``/proc/<pid>/status``, the process itself;
its guard is a forked copy that only waits) is sampled every 0.5 s: VmRSS, and RssAnon, its own
heap and stacks, which is where one object per denial would show (the ring buffers' mmapped
pages count in VmRSS as the kernel writes them, up to their size: the sensor's 8 MiB ring,
mapped twice, fills with the whole machine's events). At the end the denials in the
violations store are summed and compared with the EPERMs the storm processes counted themselves:
the kernel counts every denial, so the two must be equal. A run whose storm made no calls, or
whose counts differ, fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ROOT, build_programs, progress

TITLE = "exec under a denial storm: memory and exact counts"
TARGETS = {"anonymous RSS growth MiB": "<= 16", "store total / storm's own count": "== 1"}


def params(quick: bool) -> dict:
    return {"seconds": 8 if quick else 30, "procs": 2}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"`denied_storm {p['seconds']} {p['procs']}` under `envelope exec --mode enforce` (policy: every syscall "
            f"but getsid and execve); exec's VmRSS sampled every 0.5 s; the store's getsid denials summed "
            f"after the run and compared with the storm processes' own EPERM counts.")


def _rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB: all resident memory, and the process's own heap and stacks (what
    one object per denial would grow; the BPF maps' mmapped pages count in VmRSS, not here)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def run(quick: bool = False) -> dict:
    from enforcer.policy import Policy, dump_policy
    from enforcer.violations import ViolationStore
    from sensor import syscalls
    from sensor.workload import Workload
    p = params(quick)
    progs = build_programs(["denied_storm"])
    work = Path(tempfile.mkdtemp(prefix="envelope-bench-storm-"))
    state = work / "state"
    policy = work / "policy.yaml"
    storm = progs["denied_storm"]  # exec'd once, by the launch: Landlock runs it, the filter admits no other execve
    launch = {"entry": f"exec:{storm}", "substrate": "exec", "rule": "exact", "admitted": "threshold",
              "evidence": {"behaviours": [f"exec:{storm}"], "count": 1, "sessions": 1}}
    policy.write_text(dump_policy(Policy(
        workload=Workload.host(f"bench-storm-{os.getpid()}"), mode="enforce",
        syscalls=tuple(n for n in syscalls.NUMBERS if n not in ("getsid", "execve", "execveat")),
        execs=(storm,), provenance=(launch,))))
    proc = subprocess.Popen([sys.executable, "-m", "envelope.cli", "--state-dir", str(state), "exec", "--policy",
                             str(policy), "--", progs["denied_storm"], str(p["seconds"]), str(p["procs"])],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, tuple[int, int]]] = []
    t0 = time.monotonic()
    running_at = None  # when the store first showed denials: the storm runs, start-up is over
    store = ViolationStore(state)
    while proc.poll() is None:
        rss = _rss_kib(proc.pid)
        if rss is not None:
            samples.append((time.monotonic() - t0, rss))
        if running_at is None and store.path.exists() and store.list(substrate="syscall"):
            running_at = time.monotonic() - t0
        time.sleep(0.5)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"envelope exec exited {proc.returncode}: {err.strip()[-500:]}")
    own = sum(int(line.split("eperm=")[1]) for line in out.splitlines() if "eperm=" in line)
    calls = sum(int(line.split("calls=")[1].split()[0]) for line in out.splitlines() if "calls=" in line)
    stored = sum(v.count for v in ViolationStore(state).list(substrate="syscall")
                 if v.behaviour == "syscall:getsid" and v.action == "denied")
    if not calls or not own:
        raise RuntimeError(f"the storm made no denied calls: {out.strip()}")
    if running_at is None:
        raise RuntimeError("the store never showed denials while the storm ran")
    steady = [r for t, r in samples if t > running_at]
    if len(steady) < 4:
        raise RuntimeError(f"only {len(steady)} RSS samples while the storm ran")
    growth = (max(r for r, _ in steady) - steady[0][0]) / 1024
    anon_growth = (max(a for _, a in steady) - steady[0][1]) / 1024
    progress(f"storm: {own:,} denials counted by the storm, {stored:,} in the store; RSS growth {growth:.1f} MiB, "
             f"anonymous {anon_growth:.1f} MiB")
    row = {"case": f"{p['procs']} processes, {p['seconds']} s", "storm seconds sampled": round(
               samples[-1][0] - running_at, 1), "denied calls (storm's count)": own,
           "denials in the store": stored, "denials per second": round(own / p["seconds"]),
           "exec RSS MiB, storm start": round(steady[0][0] / 1024, 1),
           "exec RSS MiB, max": round(max(r for r, _ in steady) / 1024, 1),
           "RSS growth MiB": round(growth, 1),
           "anonymous RSS MiB, storm start": round(steady[0][1] / 1024, 1),
           "anonymous RSS growth MiB": round(anon_growth, 1),
           "store lines": len(ViolationStore(state).list())}
    return {"title": TITLE, "method": method(quick), "rows": [row],
            "ratios": {"anonymous RSS growth MiB": row["anonymous RSS growth MiB"],
                       "RSS growth MiB": row["RSS growth MiB"],
                       "store total / storm's own count": stored / own},
            "targets": TARGETS}
