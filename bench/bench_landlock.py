"""Cost per execve() and per openat() under a Landlock ruleset of realistic size, against none.

The ruleset is what :mod:`enforcer.landlock_rules` compiles for an agent-like envelope: every
binary in ``/usr/bin`` that ``exec_needs`` can inspect up to a count (exact ``file`` rules, with
their ELF interpreter and shared libraries), ``/etc`` files read exactly, Python's library tree,
and the benchmark's own files; about 200 rules in all, every filesystem right of this ABI
handled. It is applied with :class:`enforcer.landlock.Ruleset` in the child before ``execve``,
as ``envelope exec`` does.

* **openat**: ``bench/progs/openat_loop.c`` opens and closes a file five directories below the
  ``tree`` rule that allows it, N times, in thread CPU time (Landlock walks from the file up to
  the rule). After the loop it opens a file the ruleset does not allow: it must fail with EACCES
  under the ruleset and succeed without, or the case fails.
* **execve**: ``bench/progs/exec_gen.c`` forks and execs a target for a few seconds, in a fresh
  cgroup, for a static target (the exec check alone) and ``/usr/bin/true`` (plus the loader's and
  libc's opens). Every exec must succeed; under the ruleset an exec of a binary it does not allow
  must fail, or the case fails.

* **+ observed**: the same ruleset cases with what ``envelope exec --mode enforce`` runs beside
  the ruleset: the sensor with the file substrate's extension (counting every open) and the file
  denial probe watching the cgroup (reporting Landlock's refusals from the syscalls' exits). Each
  such run checks that the opens were counted and that the denied open was reported.

Cases are interleaved over repeats; added = median(ruleset) - median(none).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import Cgroup, build_programs, parse_kv, progress, ratio, summarize, unavailable

TITLE = "Landlock: execve() and openat() cost under a realistic ruleset"
TARGETS = {"openat added ns (ruleset)": "<= 1000"}
DEPTH = 5
EXEC_BINARIES = 60


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "n": 200_000, "exec_seconds": 1.0}
    return {"repeats": 7, "n": 1_000_000, "exec_seconds": 3.0}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"openat: `bench/progs/openat_loop.c`, N = {p['n']:,} opens of a file {DEPTH} directories below its "
            f"tree rule, thread CPU time. execve: `bench/progs/exec_gen.c` for {p['exec_seconds']} s per run, "
            f"static and dynamic targets. **+ observed**: the same under the ruleset with the sensor's file "
            f"observation and the file denial probe attached, as `envelope exec --mode enforce` runs them. "
            f"{p['repeats']} repeats, cases shuffled per repeat; each run checks that the ruleset was in force (a "
            f"denied open or exec), that every measured call succeeded and, observed, that the opens were counted "
            f"and the denied open reported.")


def _ruleset(work: Path, progs, *procs: Path):
    from enforcer.exec_needs import resolve
    from enforcer.landlock_rules import compile_ruleset

    bins = []
    for p in sorted(Path("/usr/bin").iterdir()):
        if len(bins) >= EXEC_BINARIES:
            break
        if p.is_file() and not p.is_symlink() and os.access(p, os.X_OK) and p.name not in ("sh", "dash", "bash"):
            bins.append(str(p))
    execs = sorted(set(bins) | {progs["openat_loop"], progs["exec_gen"], progs["true_static"], "/usr/bin/true"})
    etc = sorted(str(p) for p in Path("/etc").iterdir() if p.is_file() and os.access(p, os.R_OK))[:40]
    files = [f"file:read:{e}" for e in etc] + [
        "file:read:/usr/lib/python3.11/**", "file:list:/usr/lib/python3.11",
        f"file:read:{work}/allowed/**", *(f"file:write:{p}" for p in procs), "file:write:/dev/null"]
    compiled = compile_ruleset("bench/Unit/landlock/main", execs=execs, files=files, exec_needs=resolve(execs))
    return compiled


def _not_allowed(compiled) -> str:
    """A binary in /usr/bin the ruleset does not allow to run (not even as an interpreter)."""
    allowed = {os.path.realpath(r.path) for r in compiled.rules if "execute" in r.rights}
    for p in sorted(Path("/usr/bin").iterdir(), reverse=True):
        if p.is_file() and os.access(p, os.X_OK) and os.path.realpath(p) not in allowed:
            return str(p)
    raise RuntimeError("every binary in /usr/bin is allowed: no exec to check denial with")


class Observed:
    """The sensor with file observation and the file denial probe, for the ``+ observed`` cases."""

    def __init__(self, cg):
        from enforcer.file_denials import FileDenialProbe
        from sensor.file_observer import FileObserver
        from sensor.kernel import RingReader
        from sensor.probes import Sensor
        self.cg = cg
        self.sensor = Sensor(ringbuf_pages=256, extensions=[FileObserver()])
        self.sensor.attach()
        self.probe = FileDenialProbe()
        self.probe.watch(cg.id)
        self.reader = RingReader()
        self.denied: list = []
        self.reader.add(self.probe.events_fd, self.denied.append)

    def counted(self, path: str) -> int:
        self.sensor.poll(0)
        r = self.sensor.behaviour_counts().get(self.cg.id, {}).get(f"file:read:{path}")
        return r.count if r else 0

    def denials(self) -> int:
        self.reader.poll(100)
        return len(self.denied)

    def close(self) -> None:
        self.reader.close()
        self.probe.close()
        self.sensor.close()


def _open_case(loop: str, target: str, denied: str, n: int, rs, cg=None, observed: Observed | None = None) -> float:
    from enforcer import landlock
    pre = landlock.preexec(rs) if rs is not None else None
    if cg is not None:
        inner = pre
        pre = lambda: (cg.add(0), inner and inner())  # noqa: E731 - join the watched cgroup first
    before = (observed.counted(target), observed.denials()) if observed else None
    out = subprocess.run([loop, target, denied, str(n)], capture_output=True, text=True, timeout=600, preexec_fn=pre)
    if out.returncode != 0:
        raise RuntimeError(f"openat_loop exited {out.returncode}: {out.stderr.strip()[-300:]}")
    kv = parse_kv(out.stdout)
    if kv.get("opens") != n or kv.get("failed"):
        raise RuntimeError(f"openat_loop: {out.stdout.strip()} (want {n} successful opens)")
    want = errno.EACCES if rs is not None else 0
    if kv.get("denied_errno") != want:
        raise RuntimeError(f"openat_loop: denied open errno {kv.get('denied_errno')}, expected {want}: "
                           f"the ruleset was {'not ' if rs is not None else ''}in force")
    if observed is not None:
        counted, reported = observed.counted(target) - before[0], observed.denials() - before[1]
        if counted < n + n // 10 or reported < 1:
            raise RuntimeError(f"observed: {counted} opens counted (want {n + n // 10}), {reported} denials "
                               f"reported (want 1)")
    return kv["ns_per_open"]


def _exec_case(gen: str, procs: Path, seconds: float, target: str, rs, expect_fail: bool = False,
               observed: Observed | None = None) -> float:
    from enforcer import landlock
    pre = landlock.preexec(rs) if rs is not None else None
    before = observed.counted("/etc/ld.so.cache") if observed else 0
    out = subprocess.run([gen, str(procs), str(seconds), target], capture_output=True, text=True, timeout=120,
                         preexec_fn=pre)
    if out.returncode != 0:
        raise RuntimeError(f"exec_gen exited {out.returncode}: {out.stderr.strip()[-300:]}")
    kv = parse_kv(out.stdout)
    if expect_fail:
        if kv.get("execs") or not kv.get("failed"):
            raise RuntimeError(f"exec_gen under the ruleset ran a binary it does not allow: {out.stdout.strip()}")
        return 0.0
    if not kv.get("execs") or kv.get("failed"):
        raise RuntimeError(f"exec_gen: {out.stdout.strip()} (want only successful execs)")
    if observed is not None and observed.counted("/etc/ld.so.cache") - before < kv["execs"]:
        raise RuntimeError("observed: the dynamic loader's opens of /etc/ld.so.cache were not all counted")
    return kv["seconds"] / kv["execs"] * 1e6  # us per fork+exec+wait


def run(quick: bool = False) -> dict:
    p = params(quick)
    try:
        from enforcer import landlock
        support = landlock.probe()
    except OSError as e:
        return unavailable(TITLE, method(quick), f"Landlock unavailable: {e}", TARGETS)
    work = Path(tempfile.mkdtemp(prefix="envelope-bench-landlock-"))
    progs = build_programs(["openat_loop", "exec_gen", "true_static"])
    try:
        deep = work / "allowed" / "a" / "b" / "c" / "d"
        deep.mkdir(parents=True)
        target = deep / "file"
        target.write_text("x\n")
        denied = work / "denied"
        denied.write_text("y\n")
        with Cgroup("landlock") as cg, Cgroup("landlock-observed") as ocg:
            compiled = _ruleset(work, progs, cg.procs, ocg.procs)
            rs = landlock.Ruleset.build(compiled, support)
            observed = Observed(ocg)
            try:
                progress(f"ruleset: {len(compiled.rules)} rules compiled, {rs.rules_added} added, "
                         f"{len(rs.skipped)} skipped")
                cases = {
                    "openat none": lambda: _open_case(progs["openat_loop"], str(target), str(denied), p["n"], None),
                    "openat ruleset": lambda: _open_case(progs["openat_loop"], str(target), str(denied), p["n"], rs),
                    "openat ruleset + observed": lambda: _open_case(progs["openat_loop"], str(target), str(denied),
                                                                    p["n"], rs, ocg, observed),
                    "execve static none": lambda: _exec_case(progs["exec_gen"], cg.procs, p["exec_seconds"],
                                                             progs["true_static"], None),
                    "execve static ruleset": lambda: _exec_case(progs["exec_gen"], cg.procs, p["exec_seconds"],
                                                                progs["true_static"], rs),
                    "execve dynamic none": lambda: _exec_case(progs["exec_gen"], cg.procs, p["exec_seconds"],
                                                              "/usr/bin/true", None),
                    "execve dynamic ruleset": lambda: _exec_case(progs["exec_gen"], cg.procs, p["exec_seconds"],
                                                                 "/usr/bin/true", rs),
                    "execve dynamic ruleset + observed": lambda: _exec_case(
                        progs["exec_gen"], ocg.procs, p["exec_seconds"], "/usr/bin/true", rs, observed=observed),
                }
                # the ruleset refuses an exec it does not allow (checked once, not timed)
                _exec_case(progs["exec_gen"], cg.procs, 0.2, _not_allowed(compiled), rs, expect_fail=True)
                values: dict[str, list[float]] = {c: [] for c in cases}
                rng = random.Random(20261201)
                for rep in range(p["repeats"]):
                    order = list(cases)
                    rng.shuffle(order)
                    for name in order:
                        progress(f"repeat {rep + 1}/{p['repeats']}: {name}")
                        values[name].append(cases[name]())
                rules_added = rs.rules_added
            finally:
                observed.close()
                rs.close()
    finally:
        progs.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    stats = {c: summarize(v) for c, v in values.items()}
    rows = []
    for c, s in stats.items():
        unit = "ns/open" if c.startswith("openat") else "us/exec"
        rows.append({"case": c, unit: s["median"], "range": [s["min"], s["max"]], "repeats": s["n"]})

    def added(a: str, b: str):
        return None if stats[a]["median"] is None else stats[a]["median"] - stats[b]["median"]

    ratios = {
        "openat added ns (ruleset)": added("openat ruleset", "openat none"),
        "openat ruleset / none": ratio(stats["openat ruleset"]["median"], stats["openat none"]["median"]),
        "openat added ns (ruleset + observed)": added("openat ruleset + observed", "openat none"),
        "openat ruleset + observed / none": ratio(stats["openat ruleset + observed"]["median"],
                                                  stats["openat none"]["median"]),
        "execve added us (static target)": added("execve static ruleset", "execve static none"),
        "execve added us (dynamic target)": added("execve dynamic ruleset", "execve dynamic none"),
        "execve ruleset / none (dynamic)": ratio(stats["execve dynamic ruleset"]["median"],
                                                 stats["execve dynamic none"]["median"]),
        "execve added us (dynamic, ruleset + observed)": added("execve dynamic ruleset + observed",
                                                               "execve dynamic none"),
    }
    notes = [f"ruleset: {len(compiled.rules)} compiled rules, {rules_added} path-beneath rules added to the kernel, "
             f"handled rights: {', '.join(compiled.handled_fs)} (ABI {support.abi})",
             f"opened file is {DEPTH} directories below its tree rule"]
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes, "params": p}


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
