"""Per-capability-check cost of the capability probe, against nothing attached and the floor.

A C loop (``bench/progs/capable_loop.c``) makes N calls of a cheap syscall that asks the kernel for
a capability on every call: ``setpriority`` lowering the nice value from 19 to 18 and back
(CAP_SYS_NICE on the lowering, the common path: one hash update), ``sethostname`` in a new UTS
namespace (CAP_SYS_ADMIN: the path that also finds the check's caller, to leave overcommit
accounting's checks out) and a one-page private mapping made, touched and unmapped (overcommit
accounting's CAP_SYS_ADMIN question, which the probe finds and leaves out: the hottest check on a
node, asked at every private writable mmap, brk and fork). It runs with nothing attached
(bare), with an empty program on the same raw tracepoint ``cap_capable`` (the floor: the least
any observer of capability checks can cost), and with the capability family of
``bpf/capabilities.c`` loaded as the sensor loads it. The capability family's own counter of the
checks must reach the loop's call count, so the benchmark shows the kernel really checked a
capability on every call, and that the probe counted each.
"""

from __future__ import annotations

import os
import random
import types

from . import build_programs, parse_kv, progress, quartiles, ratio, summarize
from . import unavailable as unavailable_result

TITLE = "Per-capability-check cost (setpriority and sethostname loops)"
TARGETS = {"capabilities_added / floor_added (CAP_SYS_NICE)": "<= 2.0",
           "capabilities_added / floor_added (overcommit, mmap)": "<= 3.0"}
#: loop mode -> the capability it checks, and the counter of the capability family that must grow
MODES = {"nice": "SYS_NICE", "uts": "SYS_ADMIN", "mmap": "SYS_ADMIN (overcommit)"}
#: loop mode -> fraction of N it makes (a mapping costs ten times a sethostname)
SCALE = {"nice": 1, "uts": 1, "mmap": 10}
CASES = ["bare", "floor", "capabilities"]
FLOOR_C = "RAW_TRACEPOINT_PROBE(cap_capable) { return 0; }"


def method(quick: bool) -> str:
    p = params(quick)
    return (
        "`bench/progs/capable_loop.c` makes N calls (after N/10 warm-up calls), pinned to the last CPU, and "
        "reports ns per call in the loop thread's own CPU time (CLOCK_THREAD_CPUTIME_ID), as the per-syscall "
        "benchmark does. Two loops: **nice**, at nice 19, `setpriority` to 18 and back to 19 per call, one "
        "`capable(CAP_SYS_NICE)` per call (lowering past RLIMIT_NICE, which is 0; raising asks nothing), "
        "seen with bpftrace to check exactly once per pair; **uts**, `sethostname` in a "
        "new UTS namespace, one `ns_capable(CAP_SYS_ADMIN)` per call, for which the probe also finds the "
        "check's caller (a read of 32 stack words at the layout learnt from the first kernel stack walk); "
        "**mmap**, a one-page private writable mapping made, touched and unmapped per call, whose overcommit "
        "accounting asks `cap_capable(CAP_SYS_ADMIN)` directly: the probe finds that caller and leaves the "
        "check out (counted apart). Cases: "
        "**bare** (nothing attached); **floor**: a BCC program with an empty `RAW_TRACEPOINT_PROBE(cap_capable)`; "
        "**capabilities**: the capability family (`sensor.capability_observer`, raw tracepoint `cap_capable` "
        "and `sched_process_exec`) loaded through the loader child as the sensor loads it. Each repeat runs "
        "every case of both loops once, in a shuffled order, each right after a bare run of the same loop, "
        f"{p['runs']}× each (N = {p['n']:,}, a tenth of it for mmap), keeping the fastest run; {p['repeats']} repeats. *added* = case "
        "− the bare run of the same slot; medians over repeats with the min–max range, ratios of medians with "
        "the IQR of per-repeat ratios. The family's count of the loop's capability (summed over cgroups; for "
        "mmap its count of overcommit checks left out) must reach the calls made, or the case fails; the "
        "number of kernel stack walks the family made per check is shown beside it.")


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 300_000}
    return {"repeats": 11, "runs": 5, "n": 1_000_000}


def _pin_last_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})


def loop_ns(loop: str, mode: str, n: int) -> float:
    import subprocess

    proc = subprocess.run([loop, mode, str(n)], capture_output=True, text=True, preexec_fn=_pin_last_cpu,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{loop} {mode} {n} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    kv = parse_kv(proc.stdout.strip().splitlines()[-1])
    if kv.get("failed"):
        raise RuntimeError(f"{loop} {mode}: {int(kv['failed'])} of {n} calls failed")
    return kv["ns_per_call"]


def best_of_runs(loop: str, mode: str, n: int, runs: int) -> float:
    return min(loop_ns(loop, mode, n) for _ in range(runs))


class Floor:
    """An empty program on raw tracepoint cap_capable, attached only during its slot."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(text=FLOOR_C)
        self.bpf.detach_raw_tracepoint(tp=b"cap_capable")

    def measure(self, loop: str, mode: str, n: int, runs: int) -> tuple[float, str]:
        self.bpf.attach_raw_tracepoint(tp=b"cap_capable", fn_name=b"raw_tracepoint__cap_capable")
        try:
            return best_of_runs(loop, mode, n, runs), "empty program attached"
        finally:
            self.bpf.detach_raw_tracepoint(tp=b"cap_capable")

    def close(self) -> None:
        self.bpf.cleanup()


class Capabilities:
    """The capability family of bpf/capabilities.c, loaded for the slot through the loader child."""

    def __init__(self, how: str):
        self.how = how

    def measure(self, loop: str, mode: str, n: int, runs: int) -> tuple[float, str]:
        from sensor import kernel
        from sensor.capability_observer import CapabilityObserver

        obs = CapabilityObserver(how=self.how)
        loaded = kernel.load(obs.family([]))
        try:
            obs.attached(loaded, types.SimpleNamespace(wall_time=lambda ns: ns / 1e9))
            key = "overcommit" if mode == "mmap" else f"capability:{MODES[mode]}"
            before, walks = _total(obs, key), obs.stats()["stack_walks"]
            value = best_of_runs(loop, mode, n, runs)
            counted = _total(obs, key) - before
            walks = obs.stats()["stack_walks"] - walks
            want = (n + n // 10) * runs
            if counted < want:
                raise RuntimeError(f"the capability family counted {counted:,} {key} checks, expected >= {want:,}")
            if mode == "mmap" and _total(obs, "capability:SYS_ADMIN") > 0:
                raise RuntimeError("overcommit checks were counted as CAP_SYS_ADMIN behaviour")
            loss = obs.loss()
            if any(loss.values()):
                raise RuntimeError(f"the capability family lost checks: {loss}")
            return value, f"counted {counted:,} {key}; {walks:,} stack walks"
        finally:
            obs.close()
            loaded.close()

    def close(self) -> None:
        pass


def _total(obs, key: str) -> int:
    if key == "overcommit":
        return obs.stats()["overcommit"]
    return sum(per.get(key).count for per in obs.behaviour_counts().values() if per.get(key))


def run(quick: bool = False) -> dict:
    from sensor import capability_observer

    how, detail = capability_observer.available()
    if how is None:
        return unavailable_result(TITLE, method(quick), detail, TARGETS)
    p = params(quick)
    progs = build_programs(["capable_loop"])
    loop = progs["capable_loop"]
    cases: dict[str, object] = {}
    notes: list[str] = [f"capability probe: {detail}"]
    failed: dict[str, str] = {}
    values = {(m, c): [] for m in MODES for c in CASES}
    added = {(m, c): [] for m in MODES for c in CASES}
    checks: dict[tuple[str, str], str] = {}
    try:
        cases["floor"] = Floor()
        cases["capabilities"] = Capabilities(how)
        rng = random.Random(20261201)
        for rep in range(p["repeats"]):
            order = [(m, c) for m in MODES for c in cases]
            rng.shuffle(order)
            for mode, name in order:
                if (mode, name) in failed:
                    continue
                progress(f"repeat {rep + 1}/{p['repeats']}: {mode} bare, then {name}")
                n = p["n"] // SCALE[mode]
                try:
                    bare = best_of_runs(loop, mode, n, p["runs"])
                    value, checks[(mode, name)] = cases[name].measure(loop, mode, n, p["runs"])
                except Exception as e:
                    failed[(mode, name)] = f"{type(e).__name__}: {e}"
                    progress(f"{mode} {name}: failed ({failed[(mode, name)]})")
                    continue
                values[(mode, "bare")].append(bare)
                values[(mode, name)].append(value)
                added[(mode, name)].append(value - bare)
    finally:
        for c in cases.values():
            try:
                c.close()
            except Exception:
                pass
        progs.cleanup()

    rows = []
    for mode, cap in MODES.items():
        bare = summarize(values[(mode, "bare")])["median"]
        for c in CASES:
            s, a = summarize(values[(mode, c)]), summarize(added[(mode, c)])
            if (mode, c) in failed:
                rows.append({"case": f"{mode} ({cap}): {c}", "ns/call": None, "check": f"failed: {failed[(mode, c)]}"})
                continue
            rows.append({
                "case": f"{mode} ({cap}): {c}",
                "ns/call": s["median"],
                "range": [s["min"], s["max"]] if s["n"] else None,
                "added ns": a["median"] if c != "bare" else 0.0,
                "added range": [a["min"], a["max"]] if c != "bare" and a["n"] else None,
                "× bare": ratio(s["median"], bare),
                "repeats": s["n"],
                "check": checks.get((mode, c), ""),
            })

    def added_ratio(mode: str) -> dict | None:
        num, den = summarize(added[(mode, "capabilities")])["median"], summarize(added[(mode, "floor")])["median"]
        value = ratio(num, den)
        if value is None:
            return None
        per = [ratio(x, y) for x, y in zip(added[(mode, "capabilities")], added[(mode, "floor")]) if y]
        return {"value": value, "range": quartiles(per), "range_kind": "IQR"}

    ratios = {
        "capabilities_added / floor_added (CAP_SYS_NICE)": added_ratio("nice"),
        "capabilities_added / floor_added (CAP_SYS_ADMIN)": added_ratio("uts"),
        "capabilities_added / floor_added (overcommit, mmap)": added_ratio("mmap"),
        "floor_added ns (CAP_SYS_NICE)": summarize(added[("nice", "floor")])["median"],
        "capabilities_added ns (CAP_SYS_NICE)": summarize(added[("nice", "capabilities")])["median"],
        "capabilities_added ns (CAP_SYS_ADMIN)": summarize(added[("uts", "capabilities")])["median"],
        "capabilities_added ns (overcommit, mmap)": summarize(added[("mmap", "capabilities")])["median"],
    }
    out = {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
           "notes": notes, "params": p}
    if failed:
        out["errors"] = [f"{m} {c}: {why}" for (m, c), why in sorted(failed.items())]
    return out
