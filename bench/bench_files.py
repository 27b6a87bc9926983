"""Cost per openat() with the file substrate's observation on, against the syscall floor.

``bench/progs/openat_loop.c`` opens and closes one file N times (thread CPU time per open+close
pair), in a cgroup of its own, with: nothing attached (**bare**); an empty raw ``sys_enter``
program (**floor**, the least any syscall observer costs); Envelope's sensor (**sensor**); and the
sensor with the file substrate's extension (**sensor+files**: ``bpf/files.c`` on the file
syscalls' exit tracepoints, counting each open in a hash map keyed by cgroup, access and path).
The sensor+files case checks that the kernel counted every open of the file for the loop's cgroup,
so a program that did not attach cannot pass as cheap. Cases are interleaved over repeats; each
slot measures bare first; added = case - bare of the same slot.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from . import Cgroup, build_programs, parse_kv, progress, quartiles, ratio, summarize

TITLE = "File observation: openat() cost against the syscall floor"
TARGETS = {"sensor+files_added / floor_added (openat)": "report"}
CASES = ["bare", "floor", "sensor", "sensor+files"]


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 200_000}
    return {"repeats": 9, "runs": 5, "n": 1_000_000}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"`bench/progs/openat_loop.c` opens and closes one file N = {p['n']:,} times (after N/10 warm-up "
            f"opens), in its own cgroup, reporting thread CPU ns per open+close. Cases: **bare**; **floor** (an "
            f"empty `RAW_TRACEPOINT_PROBE(sys_enter)`); **sensor** (`sensor.probes.Sensor`, polled by a thread); "
            f"**sensor+files** (the same with `sensor.file_observer.FileObserver`; the kernel's count of "
            f"`file:read:<the file>` for the loop's cgroup must cover every open). Best of {p['runs']} runs per "
            f"slot, {p['repeats']} repeats, cases shuffled; added = case - the bare run of the same slot.")


def _loop(prog: str, target: str, n: int, cg: Cgroup) -> float:
    out = subprocess.run([prog, target, target, str(n)], capture_output=True, text=True, timeout=600,
                         preexec_fn=lambda: cg.add(0))
    if out.returncode != 0:
        raise RuntimeError(f"openat_loop exited {out.returncode}: {out.stderr.strip()[-300:]}")
    kv = parse_kv(out.stdout)
    if kv.get("opens") != n or kv.get("failed"):
        raise RuntimeError(f"openat_loop: {out.stdout.strip()} (want {n} successful opens)")
    return kv["ns_per_open"]


def _best(prog, target, n, runs, cg) -> float:
    return min(_loop(prog, target, n, cg) for _ in range(runs))


class SensorCase:
    def __init__(self, files: bool):
        self.files = files

    def measure(self, prog: str, target: str, n: int, runs: int, cg: Cgroup) -> tuple[float, str]:
        from sensor.file_observer import FileObserver
        from sensor.probes import Sensor
        sensor = Sensor(ringbuf_pages=256, extensions=[FileObserver()] if self.files else [])
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                sensor.poll(100)

        sensor.attach()
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            value = _best(prog, target, n, runs, cg)
        finally:
            stop.set()
            thread.join(10)
        try:
            if not self.files:
                return value, "polled in a thread"
            counted = sensor.behaviour_counts().get(cg.id, {}).get(f"file:read:{target}")
            opens = runs * (n + n // 10) + runs  # the loop's opens, its warm-up and the last one
            if counted is None or counted.count < opens:
                raise RuntimeError(f"the file programs counted {counted.count if counted else 0} opens of "
                                   f"{target}, expected {opens}")
            return value, f"counted {counted.count:,} opens of the file"
        finally:
            sensor.close()


class FloorCase:
    def __init__(self):
        from .bench_syscall import Floor
        self.floor = Floor()

    def measure(self, prog, target, n, runs, cg) -> tuple[float, str]:
        self.floor.bpf.attach_raw_tracepoint(tp=b"sys_enter", fn_name=b"raw_tracepoint__sys_enter")
        try:
            return _best(prog, target, n, runs, cg), "empty program attached"
        finally:
            self.floor.bpf.detach_raw_tracepoint(tp=b"sys_enter")

    def close(self) -> None:
        self.floor.close()


def run(quick: bool = False) -> dict:
    p = params(quick)
    progs = build_programs(["openat_loop"])
    work = Path(tempfile.mkdtemp(prefix="envelope-bench-files-"))
    target = work / "target"
    target.write_text("x\n")
    cases: dict[str, object] = {"floor": FloorCase(), "sensor": SensorCase(False), "sensor+files": SensorCase(True)}
    values = {c: [] for c in CASES}
    added = {c: [] for c in CASES}
    checks: dict[str, str] = {}
    try:
        rng = random.Random(20261201)
        for rep in range(p["repeats"]):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                progress(f"repeat {rep + 1}/{p['repeats']}: bare, then {name}")
                with Cgroup(f"files-{name.replace('+', '-')}-{rep}") as cg:
                    bare = _best(progs["openat_loop"], str(target), p["n"], p["runs"], cg)
                    value, checks[name] = cases[name].measure(progs["openat_loop"], str(target), p["n"], p["runs"], cg)
                values["bare"].append(bare)
                values[name].append(value)
                added[name].append(value - bare)
    finally:
        cases["floor"].close()
        progs.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    stats = {c: summarize(values[c]) for c in CASES}
    add = {c: summarize(added[c]) for c in CASES}
    rows = [{"case": c, "ns/open": stats[c]["median"], "range": [stats[c]["min"], stats[c]["max"]],
             "added ns": add[c]["median"] if c != "bare" else 0.0,
             "added range": [add[c]["min"], add[c]["max"]] if c != "bare" else None,
             "× bare": ratio(stats[c]["median"], stats["bare"]["median"]), "repeats": stats[c]["n"],
             "check": checks.get(c, "")} for c in CASES]

    def added_ratio(a: str, b: str) -> dict | None:
        value = ratio(add[a]["median"], add[b]["median"])
        per = [ratio(x, y) for x, y in zip(added[a], added[b]) if y]
        return None if value is None else {"value": value, "range": quartiles(per), "range_kind": "IQR"}

    ratios = {
        "sensor+files_added / floor_added (openat)": added_ratio("sensor+files", "floor"),
        "files added ns per open (sensor+files - sensor)": (
            None if add["sensor+files"]["median"] is None else add["sensor+files"]["median"] - add["sensor"]["median"]),
        "sensor+files / bare (openat)": ratio(stats["sensor+files"]["median"], stats["bare"]["median"]),
    }
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": ["each open+close pair is two syscalls; close passes the syscall-exit hook too"], "params": p}


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
