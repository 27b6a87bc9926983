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

from . import (Checks, build_programs, kill_process_group, parse_kv, progress, quartiles, ratio,
               summarize)

TITLE = "Per-syscall cost (getppid loop)"
TARGETS = {"sensor_added / floor_added": "<= 1.10", "sensor_added / bpftrace_added": "<= 0.333",
           "sensor+files_added / floor_added": "<= 1.10"}
CASES = ["bare", "floor", "floor+sys_exit_openat", "floor+raw_sys_exit", "sensor", "sensor untracked",
         "sensor+files", "bpftrace", "strace"]
FLOOR_C = "RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }"
#: Empty programs on a syscall's exit, added to the floor: (hook, C, (function, kind, target)).
#: A perf tracepoint on one syscall's exit is the cheapest way to see a call's result here; the
#: raw sys_exit tracepoint is the other (there is no tracepoint on opening a file: see method).
EXIT_HOOKS = {
    "tracepoint": ("sys_exit_openat", "int envelope_exit_openat(void *ctx) { return 0; }",
                   (b"envelope_exit_openat", "perf", b"syscalls:sys_exit_openat")),
    "raw": ("sys_exit", "RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }",
            (b"raw_tracepoint__sys_exit", "raw", b"sys_exit")),
}
CHECK_CALLS = 10_000  # getppid calls of the run check (programs_ran)
CHECK_OPENS = 100
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
        f"**floor**: a BCC program with an empty `RAW_TRACEPOINT_PROBE(sys_enter)`; "
        f"**floor+sys_exit_openat**: the floor and an empty program on the perf tracepoint "
        f"`syscalls:sys_exit_openat`, which getppid never triggers: the least any design that sees "
        f"each open's result from a syscall's exit adds (the kernel's syscall-exit hook runs for "
        f"every syscall once one sys_exit_* event is on; no tracepoint of this kernel fires on "
        f"opening a file); **floor+raw_sys_exit**: the floor and an empty raw `sys_exit` program; "
        f"**sensor**: `sensor.probes.Sensor(ringbuf_pages=256, max_cgroups=1024)` attached, its "
        f"ring buffer polled by a thread as the daemon does, observing every cgroup (the loop's "
        f"too: its calls are counted); **sensor untracked**: the same with `tracked_only` and no "
        f"cgroup tracked (`envelope record`/`exec` on a node's other cgroups: the loop's calls "
        f"are seen and skipped); **sensor+files**: the sensor with the file substrate's "
        f"extension (`sensor.file_observer.FileObserver`, programs on the file syscalls' exits only); **bpftrace** `{BPFTRACE_PROG}` (measured once it "
        f"prints \"Attaching\"); **strace** `-f -c`. Each repeat sets up every case once, in a "
        f"shuffled order; each case's slot first runs the loop bare, then with the case attached, "
        f"{p['runs']}× each (N = {p['n']:,}; {p['n_strace']:,} under strace), keeping the fastest "
        f"run of each (a neighbour on this shared machine only adds time); {p['repeats']} repeats. "
        f"*added* = case − the bare run of the same slot; tables give the median over repeats and "
        f"the min–max range; ratios of added costs are ratios of medians, their spread the IQR of "
        f"the per-repeat ratios. An exit hook's slot also runs the floor alone, before or after "
        f"the floor with the hook (alternately), and its *same slot* ratio is the median over repeats of "
        f"(floor+hook − bare) / (floor − bare), all three measured seconds apart (IQR as spread). "
        f"Every run must have measured what it claims, or its case fails and "
        f"no ratio on it is met: the loop's clock reads succeeded and its N getppid calls all "
        f"returned the parent; the floor's raw tracepoint link is on sys_enter (its fdinfo); after "
        f"each empty-program slot, and the untracked sensor's, the kernel's run counts "
        f"(`BPF_ENABLE_STATS`, on only for this check) show each program ran on each of "
        f"{CHECK_CALLS:,} getppid calls (sys_enter, sys_exit) or {CHECK_OPENS} opens "
        f"(sys_exit_openat); each counting observer's own count of getppid calls covers the "
        f"loop's (the untracked sensor's is 0), so a probe that did not attach cannot pass as "
        f"cheap."
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
            kv = parse_kv(line)
            if kv.get("calls") != n or kv.get("failed") != 0:
                raise RuntimeError(f"{' '.join(cmd)}: {int(kv.get('failed', -1))} of "
                                   f"{int(kv.get('calls', 0))} getppid calls failed (N = {n})")
            return kv[metric]
    raise RuntimeError(f"{' '.join(cmd)} printed no ns_per_call: {proc.stdout[-300:]!r}")


def best_of_runs(loop: str, n: int, runs: int, metric: str = "ns_per_call") -> float:
    """The fastest of ``runs`` loop runs: a neighbour on this shared machine only ever adds time."""
    return min(loop_ns(loop, n, metric=metric) for _ in range(runs))


# --------------------------------------------------------------------------- the observers


class Floor:
    """An empty raw tracepoint on sys_enter, compiled once and attached only during its slot;
    with ``exit``, also an empty program on a syscall's exit (:data:`EXIT_HOOKS`): the least a
    substrate that needs each call's result adds to the floor."""

    def __init__(self, exit: str | None = None):
        from bcc import BPF
        self.exit = exit
        self.bpf = BPF(text=FLOOR_C + "\n" + (EXIT_HOOKS[exit][1] if exit else ""))
        # BCC attached the RAW_TRACEPOINT_PROBEs as it loaded them: attach only in the slot
        for tp in list(self.bpf.raw_tracepoint_fds):
            self.bpf.detach_raw_tracepoint(tp=tp)
        self.programs = {"sys_enter": (b"raw_tracepoint__sys_enter", "raw", b"sys_enter")}
        self.slots = 0
        self.floor_alone: float | None = None
        if exit:
            self.programs[EXIT_HOOKS[exit][0]] = EXIT_HOOKS[exit][2]

    def _attach(self, only: str | None = None) -> None:
        for name, (fn, kind, target) in self.programs.items():
            if only is not None and name != only:
                continue
            if kind == "raw":
                self.bpf.attach_raw_tracepoint(tp=target, fn_name=fn)
            else:
                self.bpf.attach_tracepoint(tp=target, fn_name=fn)

    def _detach(self, only: str | None = None) -> None:
        targets = {t for name, (_, _, t) in self.programs.items() if only in (None, name)}
        for tp in list(self.bpf.raw_tracepoint_fds):
            if tp in targets:
                self.bpf.detach_raw_tracepoint(tp=tp)
        for tp in list(self.bpf.tracepoint_fds):
            if tp in targets:
                self.bpf.detach_tracepoint(tp)

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        """ns/call with everything attached; with an exit hook, ``floor_alone`` is also set: the
        floor alone, measured just before in the same slot, so the hook's own cost is read
        against the floor of the same moment (paired, far steadier than two slots' medians)."""
        self._attach(only="sys_enter" if self.exit else None)
        try:
            fd = self.bpf.raw_tracepoint_fds[b"sys_enter"]
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
            if "raw_tracepoint" not in info or "sys_enter" not in info:
                raise RuntimeError(f"the floor's link is not a raw tracepoint on sys_enter: {info!r}")
            if self.exit:
                # alternate which comes first, so a drift within the slot cancels over repeats
                self.slots += 1
                hook = EXIT_HOOKS[self.exit][0]
                if self.slots % 2:
                    self.floor_alone = best_of_runs(loop, n, runs)
                    self._attach(only=hook)
                    value = best_of_runs(loop, n, runs)
                else:
                    self._attach(only=hook)
                    value = best_of_runs(loop, n, runs)
                    self._detach(only=hook)
                    self.floor_alone = best_of_runs(loop, n, runs)
                    self._attach(only=hook)  # attached again for the run check
            else:
                value = best_of_runs(loop, n, runs)
            ran = programs_ran(loop, {name: self.bpf.funcs[fn].fd
                                      for name, (fn, _, _) in self.programs.items()})
            return value, "empty programs linked (fdinfo) and run: " + ran
        finally:
            self._detach()

    def close(self) -> None:
        self.bpf.cleanup()


def programs_ran(loop: str, prog_fds: dict[str, int]) -> str:
    """After a slot's timed runs: each program in ``prog_fds`` (its hook -> program fd) must run
    on each call of a short getppid loop (``sys_enter``, ``sys_exit``) or of a few opens
    (``sys_exit_openat``), counted by the kernel's run-time statistics, which are on only for
    this check (they time every program run on the node)."""
    from sensor import kernel
    with kernel.run_stats():
        before = {name: kernel.prog_run_count(fd) for name, fd in prog_fds.items()}
        loop_ns(loop, CHECK_CALLS)
        for _ in range(CHECK_OPENS):
            os.close(os.open("/proc/self/stat", os.O_RDONLY))  # openat(2)
        ran = {name: kernel.prog_run_count(fd) - before[name] for name, fd in prog_fds.items()}
    out = []
    for name, count in ran.items():
        least = CHECK_OPENS if name == "sys_exit_openat" else CHECK_CALLS
        if count < least:
            raise RuntimeError(f"the program on {name} ran {count} times, expected >= {least} "
                               f"({CHECK_CALLS:,} getppid calls, {CHECK_OPENS} opens)")
        out.append(f"{name} {count:,}")
    return ", ".join(out) + f" runs for {CHECK_CALLS:,} getppid + {CHECK_OPENS} opens"


class SensorCase:
    """Envelope's sensor, attached for the slot and polled by a thread like the daemon polls it;
    with ``files``, also the file substrate's programs (``bpf/files.c`` on the file syscalls'
    exits), which getppid never triggers: what they add here is their cost to every syscall."""

    def __init__(self, files: bool = False, untracked: bool = False):
        from sensor.probes import Sensor  # ImportError: the sensor is not built; reported as unavailable
        self.Sensor = Sensor
        self.files = files
        self.untracked = untracked

    def measure(self, loop: str, n: int, runs: int) -> tuple[float, str]:
        from sensor.file_observer import FileObserver
        sensor = self.Sensor(ringbuf_pages=256, max_cgroups=1024, tracked_only=self.untracked,
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
            if self.files and not any(k.startswith("file:") for per in sensor.behaviour_counts().values()
                                      for k in per):
                raise RuntimeError("the file programs counted no file access on the whole node")
            if self.untracked:
                # nothing is tracked: the loop's cgroup must have been seen and skipped
                if before is None or after is None or after != 0:
                    raise RuntimeError(f"the sensor with no cgroup tracked counted {after} getppid calls")
                from sensor import kernel
                prog_fd = kernel.prog_fd_by_id(kernel.link_prog_id(
                    sensor.attachment("raw_tracepoint__sys_enter")))
                try:
                    check += "; no cgroup tracked, 0 getppid counted; " + programs_ran(loop, {"sys_enter": prog_fd})
                finally:
                    os.close(prog_fd)
            elif before is not None and after is not None:
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
    checks = Checks()
    try:
        cases["bare"] = None
        for name, make in (("floor", Floor), ("floor+sys_exit_openat", lambda: Floor(exit="tracepoint")),
                           ("floor+raw_sys_exit", lambda: Floor(exit="raw")),
                           ("sensor", SensorCase), ("sensor untracked", lambda: SensorCase(untracked=True)),
                           ("sensor+files", lambda: SensorCase(files=True)),
                           ("bpftrace", _bpftrace),
                           ("strace", lambda: _strace(p["n_strace"]))):
            try:
                cases[name] = make()
            except Exception as e:
                unavailable[name] = f"{type(e).__name__}: {e}"
                progress(f"{name}: unavailable ({unavailable[name]})")

        values: dict[str, list[float]] = {c: [] for c in CASES}
        added: dict[str, list[float]] = {c: [] for c in CASES}
        paired: dict[str, list[float]] = {c: [] for c in CASES}  # exit hooks: / the same slot's floor
        rng = random.Random(20261126)
        for rep in range(p["repeats"]):
            order = [c for c in CASES if c != "bare" and c in cases]
            rng.shuffle(order)
            for name in order:
                progress(f"repeat {rep + 1}/{p['repeats']}: bare, then {name}")
                try:
                    metric = getattr(cases[name], "metric", "ns_per_call")
                    bare = best_of_runs(loop, p["n"], p["runs"], metric)
                except Exception as e:
                    checks.require("bare", False, f"{type(e).__name__}: {e}")
                    progress(f"bare: measured nothing ({e})")
                    continue
                try:
                    value, check = cases[name].measure(loop, p["n"], p["runs"])
                except Exception as e:
                    checks.require(name, False, f"{type(e).__name__}: {e}")
                    progress(f"{name}: measured nothing, dropped from the run ({e})")
                    cases.pop(name).close()
                    continue
                if rep == 0:
                    checks.require(name, True, check)
                if metric == "ns_per_call":
                    values["bare"].append(bare)
                else:
                    bare_wall.append(bare)
                values[name].append(value)
                added[name].append(value - bare)
                floor_alone = getattr(cases[name], "floor_alone", None)
                if floor_alone is not None and floor_alone > bare:
                    paired[name].append((value - bare) / (floor_alone - bare))
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
    if stats["bare"]["n"]:
        checks.require("bare", True, f"{stats['bare']['n']} bare runs of {p['n']:,} getppid calls, "
                                     f"every call returned the parent")
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
            "check": checks.summary(c),
        })

    def added_ratio(num: str, den: str) -> dict | None:
        value = ratio(add[num]["median"], add[den]["median"])
        if value is None:
            return None
        # A ratio of two noisy differences swings widely in a single repeat: show its middle half.
        per_repeat = [ratio(x, y) for x, y in zip(added[num], added[den]) if y]
        return checks.ratio(value, num, den, "bare", range=quartiles(per_repeat), range_kind="IQR")

    ratios = {
        "sensor_added / floor_added": added_ratio("sensor", "floor"),
        "sensor_added / bpftrace_added": added_ratio("sensor", "bpftrace"),
        "sensor+files_added / floor_added": added_ratio("sensor+files", "floor"),
        "sensor+files_added / sensor_added": added_ratio("sensor+files", "sensor"),
        "floor+sys_exit_openat_added / floor_added": added_ratio("floor+sys_exit_openat", "floor"),
        "floor+raw_sys_exit_added / floor_added": added_ratio("floor+raw_sys_exit", "floor"),
        "sensor untracked_added / floor_added": added_ratio("sensor untracked", "floor"),
        **{f"{c}_added / floor_added, same slot": checks.ratio(
            summarize(paired[c])["median"], c, "bare", range=quartiles(paired[c]), range_kind="IQR")
           for c in ("floor+sys_exit_openat", "floor+raw_sys_exit")},
        "floor_added ns": checks.ratio(add["floor"]["median"], "floor", "bare"),
        "bpftrace_added / floor_added": added_ratio("bpftrace", "floor"),
        "strace / bare (wall)": checks.ratio(ratio(stats["strace"]["median"], bare_wall_median),
                                             "strace", "bare"),
    }
    for c, reason in unavailable.items():
        notes.append(f"{c}: {reason}")
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes, "params": p, **checks.fields()}


def _bpftrace() -> Bpftrace:
    if shutil.which("bpftrace") is None:
        raise RuntimeError("bpftrace not installed (make setup)")
    return Bpftrace()


def _strace(n: int) -> Strace:
    if shutil.which("strace") is None:
        raise RuntimeError("strace not installed (make setup)")
    return Strace(n)
