"""Event capacity: does the sensor count, exactly and with nothing lost, the exec and connect
rates that two generator processes can make on this machine, and what does it cost them?

Two C generators (``bench/progs/exec_gen.c``, ``connect_gen.c``) join a fresh cgroup v2 and run
flat out for a fixed time, each counting exactly what it did. The sensor is attached in a
separate drain process that runs the daemon's pipe (``Sensor`` with the daemon's defaults, the
``Pump`` reading counters every ``poll_interval``, an ``Aggregator``); at the end it reports the
profile's counts for the generators' cgroup, the kernel's own counter-table readings, the
first-sighting records it drained and the loss counters. Zero loss means the profile's counts
equal the generators' own, exactly, and the loss counters did not move. A phase without the
sensor just before and just after gives the machine's rate for comparison.

Run as ``python -m bench.bench_capacity drain CGROUP_PATH`` it is that drain process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from envelope.config import Config

from . import ROOT, Cgroup, Checks, build_programs, kill_process_group, parse_kv, progress, ratio

TITLE = "Event capacity (exec and connect, 2 generators, zero loss)"
GENERATORS = 2
KEY_PREFIX = {"exec": ("exec:",), "connect": ("connect:",)}  # behaviour keys each phase makes
MARK = "bench-drain: "  # prefix of the drain's protocol lines on stdout
TARGETS = {
    "exec events missing": "== 0",
    "connect events missing": "== 0",
    "kernel loss during run": "== 0",
    "exec rate with sensor / baseline": ">= 0.9",
    "connect rate with sensor / baseline": ">= 0.9",
    "drain CPU cores (max of phases)": "<= 1",
}


def params(quick: bool) -> dict:
    if quick:
        return {"seconds": 10, "baseline_seconds": 5}
    return {"seconds": 60, "baseline_seconds": 10}


def method(quick: bool) -> str:
    p = params(quick)
    cfg = Config()
    return (
        f"{GENERATORS} generator processes per phase, written in C so they count exactly: "
        f"`exec_gen` forks and execs a static no-op and counts children that exited 0 (their exec "
        f"happened); `connect_gen` opens a TCP socket, connects to a listener on 127.0.0.1 "
        f"(`tcp_sink`, 2 accepting processes outside the cgroup) and closes it with SO_LINGER 0, "
        f"counting every connect() call. Each generator moves itself into a fresh cgroup v2 "
        f"under the cgroup2 mount (read from /proc/self/mountinfo) *after* its own exec, so every "
        f"exec and connect counted for that cgroup is one the generators counted. With the "
        f"sensor: a separate drain process runs the daemon's pipe, `Sensor` with the daemon's "
        f"defaults (`ringbuf_pages` {cfg.ringbuf_pages}, `max_cgroups` {cfg.max_cgroups}), the "
        f"`Pump` draining the ring buffer and reading the kernel's counters every "
        f"{cfg.poll_interval:g} s into an `Aggregator` that binds the generators' cgroup as one "
        f"session; after the generators stop it finishes (drains, reads the counters once more) "
        f"and reports the profile's counts (exec and connect behaviours of the cgroup), the "
        f"kernel's counter-table readings and the first-sighting records it drained. Sensor "
        f"phases last {p['seconds']} s each; a baseline phase without the sensor "
        f"({p['baseline_seconds']} s) runs just before and just after each, and the rate ratio is "
        f"against their mean (range: against each). Drain CPU = user+system CPU of the drain "
        f"process over the phase / wall time. Kernel loss = how much the sensor's loss counters "
        f"(`Sensor.loss()`: ring-buffer reserve failures per record type, behaviours of cgroups "
        f"without a slot or beyond a full table, decode failures) moved over the phase, for the "
        f"whole machine. A phase fails (measured nothing) unless its generators made calls with "
        f"none failing, and a sensor phase's drain counted the generators' cgroup."
    )


# --------------------------------------------------------------------------- the drain process


def loss_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The loss counters (``Sensor.loss()``: name -> cumulative count) that moved, and by how much."""
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] != before.get(k, 0)}


def drain_main(cgroup_path: str) -> int:
    """Run the daemon's pipe over the generators' cgroup until told to stop; report JSON."""
    # Only protocol lines go to stdout; everything else (logs, library warnings) to stderr,
    # which the parent sends to a file so a chatty library can never block this process.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        proto.write(MARK + json.dumps(obj) + "\n")
        proto.flush()

    from envelope import wiring
    from sensor.pump import Pump, TreeBinding
    from sensor.workload import Workload

    cfg = Config()  # what the daemon and `record` ship with
    workload = Workload.host("bench-capacity")
    sensor = wiring.open_sensor(cfg)
    try:
        agg = wiring.aggregator(cfg)
        binding = TreeBinding(cgroup_path, workload, "generators")
        pump = Pump(sensor, binding, agg, counts_interval=cfg.poll_interval)
        binding.bind(binding.root_id, agg)
        loss0 = dict(sensor.loss())
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        say({"ready": True})
        records = {"all": 0, "first_sightings": 0}
        last, max_gap = t0, 0.0
        while not stop.is_set():
            st = pump.step(100)
            records["all"] += st.events
            records["first_sightings"] += st.by_type.get("ExecFirstEvent", 0) + st.by_type.get(
                "NetFirstEvent", 0)
            now = time.monotonic()
            max_gap, last = max(max_gap, now - last), now
        st = pump.finish()
        records["all"] += st.events
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        lost = loss_delta(loss0, dict(sensor.loss()))
        profile = {k: s.count for k, s in agg.profile(workload).behaviours().items()}
        kernel = {k: r.count for k, r in sensor.behaviour_counts().get(binding.root_id, {}).items()}
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        say({"profile": profile, "kernel": kernel, "records": records,
             "kernel_loss": sum(lost.values()), "loss_by_counter": lost, "cpu_seconds": cpu,
             "wall_seconds": t1 - t0, "user_seconds": r1.ru_utime - r0.ru_utime,
             "max_gap_ms": max_gap * 1000})
        pump.release()
    finally:
        sensor.close()
    return 0


def counted(report: dict, source: str, kind: str) -> int:
    """How many execs or connects the drain's ``source`` ("profile", "kernel") holds."""
    return sum(n for k, n in report[source].items() if k.startswith(KEY_PREFIX[kind]))


class Drain:
    """The drain process: started before a phase, stopped after it; returns its counts."""

    def __init__(self, cgroup_path: str):
        self.log = tempfile.TemporaryFile(mode="w+", prefix="envelope-bench-drain-")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_capacity", "drain", cgroup_path],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        while True:  # other output (library warnings, logs) may come first
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                err = self._log_text()
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise DrainUnavailable(f"drain exited {self.proc.returncode} before ready: {last}")
            if line.startswith(MARK):
                break
        if not json.loads(line[len(MARK):]).get("ready"):
            raise RuntimeError(f"drain said {line!r}")

    def stop(self) -> dict:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            out, _ = self.proc.communicate(timeout=120)
        finally:
            kill_process_group(self.proc)
        err = self._log_text()
        lines = [l[len(MARK):] for l in out.splitlines() if l.startswith(MARK)]
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"drain exited {self.proc.returncode}: {err.strip()[-800:]}")
        return json.loads(lines[-1])

    def _log_text(self) -> str:
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text

    def kill(self) -> None:
        kill_process_group(self.proc)
        if not self.log.closed:
            self.log.close()


class DrainUnavailable(RuntimeError):
    pass


# --------------------------------------------------------------------------- the phases


def phase(progs, kind: str, seconds: float, with_sensor: bool, port: int, label: str,
          checks: Checks) -> dict:
    drain = None
    gens: list[subprocess.Popen] = []
    with Cgroup(f"capacity-{kind}") as cg:
        try:
            if with_sensor:
                progress(f"{label}: attaching the sensor in a drain process")
                drain = Drain(str(cg.path))
            for _ in range(GENERATORS):
                if kind == "exec":
                    cmd = [progs["exec_gen"], str(cg.procs), str(seconds), progs["true_static"]]
                else:
                    cmd = [progs["connect_gen"], str(cg.procs), str(seconds), str(port)]
                gens.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            t0 = time.monotonic()
            progress(f"{label}: {GENERATORS} generators running for {seconds} s")
            next_report = t0 + 10
            while any(g.poll() is None for g in gens):
                time.sleep(0.5)
                if time.monotonic() - t0 > seconds + 60:
                    raise RuntimeError(f"{label}: generators still running {seconds + 60} s after start")
                if time.monotonic() >= next_report:
                    progress(f"{label}: {time.monotonic() - t0:.0f}/{seconds} s")
                    next_report += 10
            reports = []
            for g in gens:
                out, err = g.communicate()
                if g.returncode != 0:
                    raise RuntimeError(f"{label}: generator exited {g.returncode}: {err.strip()[-300:]}")
                reports.append(parse_kv(out.strip().splitlines()[-1]))
            seen = drain.stop() if drain else None
            drain = None
        finally:
            for g in gens:
                if g.poll() is None:
                    g.kill()
                    g.wait()
            if drain is not None:
                drain.kill()
    key = "execs" if kind == "exec" else "connects"
    done = int(sum(r[key] for r in reports))
    failed = int(sum(r.get("failed", 0) for r in reports))
    wall = max(r["seconds"] for r in reports)
    row = {"case": label, "seconds": round(wall, 1), "generated": done, "rate /s": done / wall,
           "failed calls": failed}
    checks.require(label, done > 0, f"the generators made {done:,} {key}")
    # a failed exec or connect may or may not be counted: exactness is only claimed for none
    checks.require(label, failed == 0, f"none of the generators' calls failed ({failed} did)")
    if seen is not None:
        profile, kernel = counted(seen, "profile", kind), counted(seen, "kernel", kind)
        checks.require(label, kernel > 0, "the sensor counted the generators' cgroup")
        row.update({"counted (profile)": profile, "counted (kernel)": kernel,
                    "missing": done - profile, "kernel loss": int(seen["kernel_loss"]),
                    "first sightings": seen["records"]["first_sightings"],
                    "ring records /s, all": seen["records"]["all"] / seen["wall_seconds"],
                    "drain CPU cores": seen["cpu_seconds"] / seen["wall_seconds"],
                    "drain user cores": seen["user_seconds"] / seen["wall_seconds"],
                    "longest drain iteration ms": seen["max_gap_ms"]})
        if seen.get("loss_by_counter"):
            row["loss by counter"] = ", ".join(f"{k} {v:,}" for k, v in seen["loss_by_counter"].items())
    progress(f"{label}: {done:,} in {wall:.1f} s" +
             (f", profile counted {row['counted (profile)']:,}" if seen else ""))
    return row


def run(quick: bool = False) -> dict:
    p = params(quick)
    progs = build_programs(["exec_gen", "connect_gen", "tcp_sink", "true_static"])
    sink = None
    rows: list[dict] = []
    notes: list[str] = []
    sensor_reason = None
    errors: list[str] = []
    checks = Checks()
    try:
        sink = subprocess.Popen([progs["tcp_sink"], "2"], stdout=subprocess.PIPE, text=True, start_new_session=True)
        port = int(sink.stdout.readline().strip().split("=", 1)[1])
        for kind in ("exec", "connect"):
            rows.append(phase(progs, kind, p["baseline_seconds"], False, port,
                              f"{kind} baseline, before", checks))
            if sensor_reason is None:
                try:
                    rows.append(phase(progs, kind, p["seconds"], True, port, f"{kind} with sensor",
                                      checks))
                except DrainUnavailable as e:
                    sensor_reason = str(e)
                    progress(f"sensor unavailable: {sensor_reason}")
                except Exception as e:  # reported with the rows measured so far
                    errors.append(f"{kind} with sensor: {type(e).__name__}: {e}")
                    progress(f"{kind} with sensor failed: {e}")
            rows.append(phase(progs, kind, p["baseline_seconds"], False, port,
                              f"{kind} baseline, after", checks))
    finally:
        if sink is not None:
            kill_process_group(sink)
        progs.cleanup()

    by = {r["case"]: r for r in rows}
    ratios: dict = {}
    for kind in ("exec", "connect"):
        names = [f"{kind} baseline, {w}" for w in ("before", "after")]
        bases = [by[n]["rate /s"] for n in names]
        sens = by.get(f"{kind} with sensor")
        ratios[f"{kind} events missing"] = checks.ratio(sens["missing"] if sens else None,
                                                        f"{kind} with sensor")
        ratios[f"{kind} rate with sensor / baseline"] = (
            checks.ratio(ratio(sens["rate /s"], sum(bases) / 2), f"{kind} with sensor", *names,
                         range=sorted(ratio(sens["rate /s"], b) for b in bases),
                         range_kind="vs each baseline")
            if sens else None)
        if sens:
            ratios[f"{kind}: kernel count - profile count"] = checks.ratio(
                sens["counted (kernel)"] - sens["counted (profile)"], f"{kind} with sensor")
    sensed = [r for r in rows if "kernel loss" in r]
    ratios["kernel loss during run"] = checks.ratio(
        sum(r["kernel loss"] for r in sensed) if sensed else None, *[r["case"] for r in sensed])
    ratios["drain CPU cores (max of phases)"] = checks.ratio(
        max((r["drain CPU cores"] for r in sensed), default=None), *[r["case"] for r in sensed])
    for r in rows:
        r["check"] = checks.summary(r["case"])
    if sensor_reason:
        notes.append(f"sensor phases unavailable: {sensor_reason}")
    result = {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
              "notes": notes, "params": p, "errors": errors, **checks.fields()}
    if sensor_reason and not sensed:
        result["unavailable"] = f"sensor: {sensor_reason}"
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "drain":
        sys.exit(drain_main(sys.argv[2]))
    print(f"usage: {sys.argv[0]} drain CGROUP_PATH", file=sys.stderr)
    sys.exit(2)
