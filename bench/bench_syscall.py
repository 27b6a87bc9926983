"""Per-syscall cost of watching syscalls: Envelope's sensor against the floor and its peers.

A C loop (``bench/progs/getppid_loop.c``) makes N ``getppid()`` calls and prints the nanoseconds
per call. It runs with nothing attached (bare), with an empty raw tracepoint on ``sys_enter`` (the
floor: the least any sys_enter observer can cost), with Envelope's sensor attached and polled, with
bpftrace counting by (cgroup, syscall id), and under ``strace -f -c``. The cost a tool adds is its
ns/call minus bare's in the same repeat.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import build_programs, kill_process_group, parse_kv, progress, quartiles, ratio, summarize

TITLE = "Per-syscall cost (getppid loop)"
TARGETS = {"sensor_added / floor_added": "<= 1.25", "sensor_added / bpftrace_added": "<= 0.333",
           "sensor+files_added / floor_added": "<= 1.10"}
CASES = ["bare", "floor", "sensor", "sensor+files", "bpftrace", "strace"]
FLOOR_C = "RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }"
BPFTRACE_PROG = "tracepoint:raw_syscalls:sys_enter { @[cgroup, args->id] = count(); }"
NR_GETPPID = 110  # x86_64


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"`bench/progs/getppid_loop.c` makes N raw `getppid()` calls (after N/10 warm-up calls), "
        f"pinned to the last CPU, and reports ns per call in the loop thread's own CPU time "
        f"(CLOCK_THREAD_CPUTIME_ID: user + kernel time, BPF programs on its sys_enter included, "
        f"time preempted by neighbours excluded); strace is timed in wall time, since its cost is "
        f"mostly spent stopped in ptrace, and compared with a wall-timed bare run. Cases: **bare** (nothing attached); "
        f"**floor**: a BCC program with an empty `RAW_TRACEPOINT_PROBE(sys_enter)`; **sensor**: "
        f"`sensor.probes.Sensor(ringbuf_pages=256, max_cgroups=1024)` attached, its ring buffer "
        f"polled by a thread as the daemon does; **sensor+files**: the same with the file substrate's "
        f"extension (`sensor.file_observer.FileObserver`, programs on the file syscalls' exits only); **bpftrace** `{BPFTRACE_PROG}` (measured once it "
        f"prints \"Attaching\"); **strace** `-f -c`. Each repeat sets up every case once, in a "
        f"shuffled order; each case's slot first runs the loop bare, then with the case attached, "
        f"{p['runs']}× each (N = {p['n']:,}; {p['n_strace']:,} under strace), keeping the fastest "
        f"run of each (a neighbour on this shared machine only adds time); {p['repeats']} repeats. "
        f"*added* = case − the bare run of the same slot; tables give the median over repeats and "
        f"the min–max range; ratios of added costs are ratios of medians, their spread the IQR of "
        f"the per-repeat ratios. Each probe's own count of getppid calls is checked against the loop's, "
        f"so a probe that did not "
        f"attach cannot pass as cheap."
    )


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 1_000_000, "n_strace": 10_000}
    return {"repeats": 11, "runs": 5, "n": 1_000_000, "n_strace": 30_000}


# --------------------------------------------------------------------------- the loop


def _pin_last_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})


def loop_ns(loop: str, n: int, prefix: list[str] | None = None, metric: str = "ns_per_call") -> float:
    """Run the getppid loop once (optionally under ``prefix``, e.g. strace) and return ns/call.

    ``ns_per_call`` is the loop thread's CPU time per call (steady on a busy machine);
    ``wall_ns_per_call`` is wall time, which is what strace's cost is mostly made of.
    """
    cmd = (prefix or []) + [loop, str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_pin_last_cpu, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("ns_per_call="):
            return parse_kv(line)[metric]
    raise RuntimeError(f"{' '.join(cmd)} printed no ns_per_call: {proc.stdout[-300:]!r}")


def best_of_runs(loop: str, n: int, runs: int, metric: str = "ns_per_call") -> float:
    """The fastest of ``runs`` loop runs: a neighbour on this shared machine only ever adds time."""
    return min(loop_ns(loop, n, metric=metric) for _ in range(runs))


# --------------------------------------------------------------------------- the observers


class Floor:
    """An empty raw tracepoint on sys_enter, compiled once and attached only during its slot."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(text=FLOOR_C)  # auto-attaches raw_tracepoint__sys_enter
        self.bpf.detach_raw_tracepoint(tp=b"sys_enter")

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        self.bpf.attach_raw_tracepoint(tp=b"sys_enter", fn_name=b"raw_tracepoint__sys_enter")
        try:
            return best_of_runs(loop, n, runs), "empty program attached"
        finally:
            self.bpf.detach_raw_tracepoint(tp=b"sys_enter")

    def close(self) -> None:
        self.bpf.cleanup()


class SensorCase:
    """Envelope's sensor, attached for the slot and polled by a thread like the daemon polls it;
    with ``files``, also the file substrate's programs (``bpf/files.c`` on the file syscalls'
    exits), which getppid never triggers: what they add here is their cost to every syscall."""

    def __init__(self, files: bool = False):
        from sensor.probes import Sensor  # ImportError: the sensor is not built; reported as unavailable
        self.Sensor = Sensor
        self.files = files

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        from sensor.file_observer import FileObserver
        sensor = self.Sensor(ringbuf_pages=256, max_cgroups=1024,
                             extensions=[FileObserver()] if self.files else [])
        stop = threading.Event()
        polls = [0]
        errors: list[BaseException] = []

        def poll_loop():
            try:
                while not stop.is_set():
                    sensor.poll(100)
                    polls[0] += 1
            except BaseException as e:  # surfaced after the slot
                errors.append(e)

        try:
            sensor.attach()
            before = _getppid_total(sensor)
            thread = threading.Thread(target=poll_loop, name="sensor-poll", daemon=True)
            thread.start()
            try:
                value = best_of_runs(loop, n, runs)
            finally:
                stop.set()
                thread.join(timeout=10)
            if errors:
                raise RuntimeError(f"sensor poll failed: {errors[0]!r}")
            after = _getppid_total(sensor)
            check = "polled in a thread" + (", file programs on" if self.files else "")
            if self.files and not sensor.behaviour_counts():
                raise RuntimeError("the file programs counted no file access on the whole node")
            if before is not None and after is not None:
                counted = after - before
                if counted < n * runs:
                    raise RuntimeError(f"sensor counted {counted} getppid calls, expected >= {n * runs}")
                check += f"; counted {counted:,} getppid"
            return value, check
        finally:
            sensor.close()

    def close(self) -> None:
        pass


def _getppid_total(sensor) -> int | None:
    """Sum of the sensor's cumulative getppid counters over all cgroups.

    ``syscall_counts()`` returns ``{cgroup_id: {nr: cumulative count}}``; None if it cannot be read.
    """
    try:
        counts = sensor.syscall_counts()
        return sum(int(per_nr.get(NR_GETPPID, 0)) for per_nr in counts.values())
    except Exception:
        return None


class Bpftrace:
    """bpftrace counting by (cgroup, syscall id); started per slot, measured after "Attaching"."""

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        proc = subprocess.Popen(["bpftrace", "-e", BPFTRACE_PROG], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            seen = []
            while True:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"bpftrace exited before attaching: {''.join(seen)[-500:]}")
                seen.append(line)
                if "Attaching" in line:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("bpftrace did not print 'Attaching' within 60 s")
            time.sleep(1.0)  # "Attaching N probes..." is printed just before the attach itself
            value = best_of_runs(loop, n, runs)
            proc.send_signal(2)  # SIGINT: bpftrace prints its map and exits
            out, _ = proc.communicate(timeout=30)
            counts = [int(c) for c in re.findall(rf"@\[\d+, {NR_GETPPID}\]: (\d+)", out)]
            if not counts or max(counts) < n * runs:
                raise RuntimeError(f"bpftrace counted {max(counts, default=0)} getppid calls, expected >= {n * runs}")
            return value, f"counted {max(counts):,} getppid"
        finally:
            kill_process_group(proc)

    def close(self) -> None:
        pass


class Strace:
    """The loop run under ``strace -f -c`` (fewer iterations: ptrace makes each call slow).

    Measured in wall time: most of strace's cost is spent stopped in ptrace and in the tracer,
    which the traced thread's CPU time does not see.
    """

    metric = "wall_ns_per_call"

    def __init__(self, n_strace: int):
        self.n = n_strace

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        with tempfile.NamedTemporaryFile(prefix="envelope-bench-strace-", suffix=".txt") as summary:
            value = loop_ns(loop, self.n, prefix=["strace", "-f", "-c", "-o", summary.name],
                            metric=self.metric)
            text = Path(summary.name).read_text()
        m = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?getppid\s*$", text, re.M)
        if not m or int(m.group(1)) < self.n:
            raise RuntimeError(f"strace summary shows no {self.n} getppid calls: {text[-400:]!r}")
        return value, f"counted {int(m.group(1)):,} getppid"

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the run


def run(quick: bool = False) -> dict:
    p = params(quick)
    progs = build_programs(["getppid_loop"])
    loop = progs["getppid_loop"]
    cases: dict[str, object] = {}
    unavailable: dict[str, str] = {}
    bare_wall: list[float] = []
    notes: list[str] = []
    try:
        cases["bare"] = None
        for name, make in (("floor", Floor), ("sensor", SensorCase), ("sensor+files", lambda: SensorCase(files=True)),
                           ("bpftrace", _bpftrace),
                           ("strace", lambda: _strace(p["n_strace"]))):
            try:
                cases[name] = make()
            except Exception as e:
                unavailable[name] = f"{type(e).__name__}: {e}"
                progress(f"{name}: unavailable ({unavailable[name]})")

        values: dict[str, list[float]] = {c: [] for c in CASES}
        added: dict[str, list[float]] = {c: [] for c in CASES}
        checks: dict[str, str] = {}
        rng = random.Random(20261126)
        for rep in range(p["repeats"]):
            order = [c for c in CASES if c != "bare" and c in cases]
            rng.shuffle(order)
            for name in order:
                progress(f"repeat {rep + 1}/{p['repeats']}: bare, then {name}")
                try:
                    metric = getattr(cases[name], "metric", "ns_per_call")
                    bare = best_of_runs(loop, p["n"], p["runs"], metric)
                    value, checks[name] = cases[name].measure(loop, p["n"], p["runs"])
                except Exception as e:
                    unavailable[name] = f"{type(e).__name__}: {e}"
                    progress(f"{name}: failed, dropped from the run ({unavailable[name]})")
                    cases.pop(name).close()
                    continue
                if metric == "ns_per_call":
                    values["bare"].append(bare)
                else:
                    bare_wall.append(bare)
                values[name].append(value)
                added[name].append(value - bare)
    finally:
        for c in cases.values():
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        progs.cleanup()

    stats = {c: summarize(values[c]) for c in CASES}
    add = {c: summarize(added[c]) for c in CASES}
    bare = stats["bare"]["median"]
    bare_wall_median = summarize(bare_wall)["median"]
    rows = []
    for c in CASES:
        s, a = stats[c], add[c]
        if c in unavailable and c not in cases:
            rows.append({"case": c, "ns/call": None, "range": None, "added ns": None, "added range": None,
                         "× bare": None, "repeats": s["n"], "check": f"unavailable: {unavailable[c]}"})
            continue
        rows.append({
            "case": c,
            "ns/call": s["median"],
            "range": [s["min"], s["max"]] if s["n"] else None,
            "added ns": a["median"] if c != "bare" else 0.0,
            "added range": [a["min"], a["max"]] if c != "bare" and a["n"] else None,
            "× bare": ratio(s["median"], bare_wall_median if c == "strace" else bare),
            "clock": "wall" if c == "strace" else "thread CPU",
            "repeats": s["n"],
            "check": checks.get(c, ""),
        })

    def added_ratio(num: str, den: str) -> dict | None:
        value = ratio(add[num]["median"], add[den]["median"])
        if value is None:
            return None
        # A ratio of two noisy differences swings widely in a single repeat: show its middle half.
        per_repeat = [ratio(x, y) for x, y in zip(added[num], added[den]) if y]
        return {"value": value, "range": quartiles(per_repeat), "range_kind": "IQR"}

    ratios = {
        "sensor_added / floor_added": added_ratio("sensor", "floor"),
        "sensor_added / bpftrace_added": added_ratio("sensor", "bpftrace"),
        "sensor+files_added / floor_added": added_ratio("sensor+files", "floor"),
        "sensor+files_added / sensor_added": added_ratio("sensor+files", "sensor"),
        "floor_added ns": add["floor"]["median"],
        "bpftrace_added / floor_added": added_ratio("bpftrace", "floor"),
        "strace / bare (wall)": ratio(stats["strace"]["median"], bare_wall_median),
    }
    for c, reason in unavailable.items():
        notes.append(f"{c}: {reason}")
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes, "params": p}


def _bpftrace() -> Bpftrace:
    if shutil.which("bpftrace") is None:
        raise RuntimeError("bpftrace not installed (make setup)")
    return Bpftrace()


def _strace(n: int) -> Strace:
    if shutil.which("strace") is None:
        raise RuntimeError("strace not installed (make setup)")
    return Strace(n)
