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

Each run must have measured what it claims, or its case fails (and no ratio on it is met): the
loop's clock reads succeeded (the loop exits with an error otherwise; its thread CPU clock is a
real ``clock_gettime`` syscall that a filter can deny), all N getppid calls returned the parent,
``/proc/PID/status`` showed the filter in force, and under the derived filter a syscall it does
not allow (``personality``) failed with EPERM.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from . import Checks, build_programs, parse_kv, progress, ratio, summarize, unavailable

TITLE = "Seccomp filter cost (getppid loop)"
TARGETS = {"derived_added / default_profile_added": "<= 1.0"}
CASES = ["bare", "derived", "default-profile"]
DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "golden" / "compiled" / "policies" / "research-agent.yaml"
# What the getppid loop does from execve to exit (glibc, dynamically linked), by strace: its
# thread CPU clock reads are clock_gettime syscalls (the vDSO serves only the wall clocks).
LOOP_SYSCALLS = ("access", "arch_prctl", "brk", "clock_gettime", "close", "execve", "exit_group",
                 "fstat", "getppid", "getrandom", "mmap", "mprotect", "munmap", "newfstatat",
                 "openat", "pread64", "prlimit64", "read", "rseq", "set_robust_list",
                 "set_tid_address", "write")
PROBE = "personality"  # getppid_loop's probe: must fail with EPERM under the derived filter
EPERM = 1


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 1_000_000}
    return {"repeats": 9, "runs": 3, "n": 2_000_000}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"`bench/progs/getppid_loop.c` makes N raw `getppid()` calls (after N/10 warm-up), timed "
        f"in the loop thread's CPU time (CLOCK_THREAD_CPUTIME_ID, a clock_gettime syscall), pinned "
        f"to the last CPU. **bare**: no filter. **derived**: "
        f"`enforcer.seccomp.build_filter` (enforce mode, default ERRNO(EPERM), libseccomp binary "
        f"tree) on the research-agent fixture policy's syscalls plus the loop's own "
        f"({len(LOOP_SYSCALLS)} names). **default-profile**: `{DEFAULT_PROFILE}` translated to "
        f"libseccomp (`filter_from_oci`, default container capabilities). Filters are built in the "
        f"parent and loaded in the child before execve. A case fails, and no ratio resting on it "
        f"is met, unless every run's clock reads succeeded, its N getppid calls all returned the "
        f"parent, its `/proc/PID/status` showed `Seccomp: 2` with one filter (none for bare), and "
        f"under the derived filter a `{PROBE}` call failed with EPERM. {p['repeats']} repeats in "
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


class CaseFailed(RuntimeError):
    """A run that did not measure what its case claims."""


def loop_ns(loop: str, n: int, flt, probe: bool = False) -> tuple[float, dict]:
    """One run of the loop under ``flt`` (None: no filter): ns/call and the loop's own report.
    Raises :class:`CaseFailed` when the run did not measure N successful getppid calls under the
    filter it claims."""
    def pre() -> None:
        _pin_last_cpu()
        if flt is not None:
            flt.load()

    proc = subprocess.Popen([loop, str(n)] + (["probe"] if probe else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=pre)
    status = _seccomp_status(proc.pid)  # Popen returns once execve has succeeded
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise CaseFailed(f"the loop exited {proc.returncode}: {err.strip()[-300:]}")
    want = (0, 0) if flt is None else (2, 1)
    if status is None:
        raise CaseFailed("the loop's /proc status could not be read: filter state unknown")
    if status != want:
        raise CaseFailed(f"/proc status Seccomp/filters {status}, expected {want}")
    line = next((l for l in out.splitlines() if l.startswith("ns_per_call=")), None)
    if line is None:
        raise CaseFailed(f"the loop printed no ns_per_call: {out[-300:]!r}")
    kv = parse_kv(line)
    if kv.get("calls") != n or kv.get("failed") != 0:
        raise CaseFailed(f"{int(kv.get('failed', -1))} of {int(kv.get('calls', 0))} getppid calls did "
                         f"not return the parent (N = {n})")
    return kv["ns_per_call"], kv


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
            "_derived_rules": len(policy.syscalls), "_derived_denies_probe": PROBE not in policy.syscalls}


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
    checks = Checks()
    try:
        loop = progs["getppid_loop"]
        filters = build_filters()
        for name in CASES:  # one unmeasured run per case: is the filter what the case claims?
            try:
                _, kv = loop_ns(loop, 1000, filters[name], probe=True)
            except CaseFailed as e:
                checks.require(name, False, str(e))
                continue
            if name == "bare":
                checks.require(name, kv.get("probe_errno") == 0, f"{PROBE} succeeded with no filter")
            elif name == "derived" and filters["_derived_denies_probe"]:
                checks.require(name, kv.get("probe_errno") == EPERM,
                               f"{PROBE}, outside the filter, failed with EPERM")
        values: dict[str, list[float]] = {c: [] for c in CASES}
        added: dict[str, list[float]] = {c: [] for c in CASES}
        rng = random.Random(20261126)
        for rep in range(p["repeats"]):
            order = list(CASES)
            rng.shuffle(order)
            this = {}
            for name in order:
                if not checks.ok(name):
                    continue
                progress(f"repeat {rep + 1}/{p['repeats']}: {name}")
                try:
                    runs = sorted(loop_ns(loop, p["n"], filters[name])[0] for _ in range(p["runs"]))
                except CaseFailed as e:
                    checks.require(name, False, str(e))
                    progress(f"{name}: measured nothing ({e}); dropped from the run")
                    continue
                this[name] = runs[len(runs) // 2]
            for name, v in this.items():
                values[name].append(v)
                if "bare" in this:
                    added[name].append(v - this["bare"])
    finally:
        progs.cleanup()
    for name in CASES:
        if checks.ok(name):
            checks.require(name, len(values[name]) == p["repeats"],
                           f"{p['repeats']} repeats of {p['runs']} runs, every getppid call returned "
                           f"the parent and the filter was in force")

    stats = {c: summarize(values[c]) for c in CASES}
    add = {c: summarize(added[c]) for c in CASES}
    bare = stats["bare"]["median"]
    rows = []
    for c in CASES:
        s, a = stats[c], add[c]
        rows.append({
            "case": c,
            "ns/call": s["median"],
            "range": [s["min"], s["max"]] if s["n"] else None,
            "added ns": (a["median"] if c != "bare" else 0.0) if s["n"] else None,
            "added range": [a["min"], a["max"]] if c != "bare" and a["n"] else None,
            "× bare": ratio(s["median"], bare),
            "repeats": s["n"],
            "check": checks.summary(c),
        })
    d, dp = add["derived"]["median"], add["default-profile"]["median"]
    ratios = {
        "derived / bare": checks.ratio(ratio(stats["derived"]["median"], bare), "derived", "bare"),
        "default_profile / bare": checks.ratio(ratio(stats["default-profile"]["median"], bare),
                                               "default-profile", "bare"),
        "derived_added ns": checks.ratio(d, "derived", "bare"),
        "default_profile_added ns": checks.ratio(dp, "default-profile", "bare"),
        # added costs are a few ns and can be at or below zero in noise; the ratio is only
        # meaningful when the default profile's added cost is clearly positive
        "derived_added / default_profile_added": checks.ratio(
            ratio(d, dp) if dp and dp > 1.0 else None, "derived", "default-profile", "bare"),
        "derived_added - default_profile_added ns": checks.ratio(
            d - dp if d is not None and dp is not None else None, "derived", "default-profile", "bare"),
    }
    notes = [f"derived filter: {filters['_derived_rules']} allowed syscalls, no argument checks",
             f"measured at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios,
            "targets": TARGETS, "notes": notes, "params": p, **checks.fields()}


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
