"""Per-syscall cost of a derived seccomp filter against no filter and the default container profile.

The getppid loop (``bench/progs/getppid_loop.c``, compiled at run time) runs three ways: with no
filter (bare); under a derived-style filter (``enforcer.seccomp.build_filter`` on a policy whose
allowed set is a realistic derived set plus what the loop itself needs, built with libseccomp as
a binary tree, enforce mode); and under the default container profile
(``/usr/share/containers/seccomp.json``, translated OCI JSON -> libseccomp by
``enforcer.seccomp.filter_from_oci`` with a default container's capabilities). Both filters are
built in the parent and loaded in the child just before ``execve``, as ``envelope exec`` does.

Allowed syscalls without argument checks are answered by the kernel's seccomp action cache
(Linux 5.11+) without running the filter, so both filters are expected to add little to an
allowed getppid; the target is that the derived filter costs no more than the default profile.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from . import build_programs, parse_kv, progress, ratio, summarize, unavailable

TITLE = "Seccomp filter cost (getppid loop)"
TARGETS = {"derived_added / default_profile_added": "<= 1.0"}
CASES = ["bare", "derived", "default-profile"]
DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "golden" / "compiled" / "policies" / "research-agent.yaml"
# What the getppid loop does from execve to exit (glibc, dynamically linked), by strace.
LOOP_SYSCALLS = ("access", "arch_prctl", "brk", "close", "execve", "exit_group", "fstat", "getppid",
                 "getrandom", "mmap", "mprotect", "munmap", "newfstatat", "openat", "pread64",
                 "prlimit64", "read", "rseq", "set_robust_list", "set_tid_address", "write")


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 1_000_000}
    return {"repeats": 9, "runs": 3, "n": 2_000_000}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"`bench/progs/getppid_loop.c` makes N raw `getppid()` calls (after N/10 warm-up), timed "
        f"with CLOCK_MONOTONIC, pinned to the last CPU. **bare**: no filter. **derived**: "
        f"`enforcer.seccomp.build_filter` (enforce mode, default ERRNO(EPERM), libseccomp binary "
        f"tree) on the research-agent fixture policy's syscalls plus the loop's own "
        f"({len(LOOP_SYSCALLS)} names). **default-profile**: `{DEFAULT_PROFILE}` translated to "
        f"libseccomp (`filter_from_oci`, default container capabilities). Filters are built in the "
        f"parent and loaded in the child before execve; each run's `/proc/PID/status` must show "
        f"`Seccomp: 2` with one filter (none for bare) or the run fails. {p['repeats']} repeats in "
        f"shuffled order, {p['runs']} runs per case per repeat (median kept), N = {p['n']:,}. "
        f"*added* = case - bare of the same repeat; medians over repeats, min-max ranges."
    )


def _pin_last_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})


def _seccomp_status(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kv = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return int(kv.get("Seccomp", "0").strip()), int(kv.get("Seccomp_filters", "0").strip())


def loop_ns(loop: str, n: int, flt) -> float:
    """One run of the loop under ``flt`` (None: no filter); returns ns/call."""
    def pre() -> None:
        _pin_last_cpu()
        if flt is not None:
            flt.load()

    proc = subprocess.Popen([loop, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=pre)
    status = _seccomp_status(proc.pid)  # Popen returns once execve has succeeded
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{loop} exited {proc.returncode}: {err.strip()[-300:]}")
    want = (0, 0) if flt is None else (2, 1)
    if status is not None and status != want:
        raise RuntimeError(f"{loop}: /proc status Seccomp/filters {status}, expected {want}")
    for line in out.splitlines():
        if line.startswith("ns_per_call="):
            return parse_kv(line)["ns_per_call"]
    raise RuntimeError(f"{loop} printed no ns_per_call: {out[-300:]!r}")


def build_filters() -> dict:
    from enforcer import seccomp
    from enforcer.policy import load_policy

    policy = load_policy(FIXTURE)
    policy.syscalls = tuple(sorted(set(policy.syscalls) | set(LOOP_SYSCALLS)))
    skipped: list = []
    derived = seccomp.build_filter(seccomp.compile_oci(policy, "enforce"), skipped=skipped)
    if skipped:
        raise RuntimeError(f"derived filter skipped {skipped}")
    default = seccomp.filter_from_oci(json.loads(DEFAULT_PROFILE.read_text()))
    return {"bare": None, "derived": derived, "default-profile": default,
            "_derived_rules": len(policy.syscalls)}


def run(quick: bool = False) -> dict:
    p = params(quick)
    try:
        import seccomp  # noqa: F401
    except ImportError:
        return unavailable(TITLE, method(quick), "python3-seccomp not installed (make setup)", TARGETS)
    if not DEFAULT_PROFILE.exists():
        return unavailable(TITLE, method(quick), f"{DEFAULT_PROFILE} missing "
                           f"(golang-github-containers-common)", TARGETS)
    progs = build_programs(["getppid_loop"])
    try:
        loop = progs["getppid_loop"]
        filters = build_filters()
        values: dict[str, list[float]] = {c: [] for c in CASES}
        added: dict[str, list[float]] = {c: [] for c in CASES}
        rng = random.Random(20261126)
        for rep in range(p["repeats"]):
            order = list(CASES)
            rng.shuffle(order)
            this = {}
            for name in order:
                progress(f"repeat {rep + 1}/{p['repeats']}: {name}")
                runs = sorted(loop_ns(loop, p["n"], filters[name]) for _ in range(p["runs"]))
                this[name] = runs[len(runs) // 2]
            for name, v in this.items():
                values[name].append(v)
                added[name].append(v - this["bare"])
    finally:
        progs.cleanup()

    stats = {c: summarize(values[c]) for c in CASES}
    add = {c: summarize(added[c]) for c in CASES}
    bare = stats["bare"]["median"]
    rows = []
    for c in CASES:
        s, a = stats[c], add[c]
        rows.append({
            "case": c,
            "ns/call": s["median"],
            "range": [s["min"], s["max"]],
            "added ns": a["median"] if c != "bare" else 0.0,
            "added range": [a["min"], a["max"]] if c != "bare" else None,
            "× bare": ratio(s["median"], bare),
            "repeats": s["n"],
        })
    d, dp = add["derived"]["median"], add["default-profile"]["median"]
    ratios = {
        "derived / bare": ratio(stats["derived"]["median"], bare),
        "default_profile / bare": ratio(stats["default-profile"]["median"], bare),
        "derived_added ns": d,
        "default_profile_added ns": dp,
        # added costs are a few ns and can be at or below zero in noise; the ratio is only
        # meaningful when the default profile's added cost is clearly positive
        "derived_added / default_profile_added": ratio(d, dp) if dp and dp > 1.0 else None,
        "derived_added - default_profile_added ns": d - dp,
    }
    notes = [f"derived filter: {filters['_derived_rules']} allowed syscalls, no argument checks",
             f"measured at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios,
            "targets": TARGETS, "notes": notes, "params": p}


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
