"""Event capacity: can the sensor keep up, with zero loss, with the exec and connect rates that two
generator processes can make on this machine?

Two C generators (``bench/progs/exec_gen.c``, ``connect_gen.c``) join a fresh cgroup v2 and run
flat out for a fixed time, each counting exactly what it did. The sensor is attached in a separate
process that drains its ring buffer the way the daemon does; it counts the exec and connect events
whose cgroup id is the generators' cgroup. Zero loss means those counts equal the generators' own,
exactly, and the kernel's loss counters did not move. A short run without the sensor gives the
machine's rate for comparison.

Run as ``python -m bench.bench_capacity drain CGROUP_ID`` it is that drain process.
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

from . import ROOT, Cgroup, build_programs, kill_process_group, parse_kv, progress, ratio

TITLE = "Event capacity (exec and connect, 2 generators, zero loss)"
GENERATORS = 2
NET_OP_CONNECT = 0  # bpf/events.h
LOSS_COUNTER = {"exec": "ringbuf_full_exec", "connect": "ringbuf_full_net"}  # Sensor.loss() names
MARK = "bench-drain: "  # prefix of the drain's protocol lines on stdout
TARGETS = {
    "exec events missing": "== 0",
    "connect events missing": "== 0",
    "kernel loss during run": "== 0",
    "missing events not counted as lost": "== 0",
    "drain CPU cores (max of phases)": "<= 1",
}


def params(quick: bool) -> dict:
    if quick:
        return {"seconds": 10, "baseline_seconds": 5}
    return {"seconds": 60, "baseline_seconds": 10}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"{GENERATORS} generator processes per phase, written in C so they count exactly: "
        f"`exec_gen` forks and execs a static no-op and counts children that exited 0 (their exec "
        f"happened); `connect_gen` opens a TCP socket, connects to a listener on 127.0.0.1 "
        f"(`tcp_sink`, 2 accepting processes outside the cgroup) and closes it with SO_LINGER 0, "
        f"counting every connect() call. Each generator moves itself into a fresh cgroup v2 "
        f"under the cgroup2 mount (read from /proc/self/mountinfo) *after* its own exec, so every "
        f"exec/connect event in that cgroup is one the generators counted. With the sensor: "
        f"`Sensor` with the daemon's defaults (`ringbuf_pages` {Config().ringbuf_pages}, "
        f"`max_cgroups` {Config().max_cgroups}) is attached in a separate drain process "
        f"that polls the ring buffer in a loop (and reads the syscall counters once a second) as "
        f"the daemon does, counts exec and connect events for the cgroup id, and drains to empty "
        f"after the generators stop. Sensor phases last {p['seconds']} s each; a baseline phase "
        f"without the sensor ({p['baseline_seconds']} s) runs just before and just after each, and "
        f"the rate ratio is against their mean (range: against each). Drain CPU = user+system CPU of the drain "
        f"process over the phase / wall time. Kernel loss = how much the sensor's loss "
        f"counters (`Sensor.loss()`: ring-buffer reserve failures per event type, syscalls with "
        f"no free cgroup slot, decode failures) moved over the phase, for the whole machine."
    )


# --------------------------------------------------------------------------- the drain process


def loss_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The loss counters (``Sensor.loss()``: name -> cumulative count) that moved, and by how much."""
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] != before.get(k, 0)}


def drain_main(cgroup_id: int) -> int:
    """Attach the sensor, count this cgroup's exec/connect events until told to stop, report JSON."""
    # Only protocol lines go to stdout; everything else (logs, library warnings) to stderr,
    # which the parent sends to a file so a chatty library can never block this process.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        proto.write(MARK + json.dumps(obj) + "\n")
        proto.flush()

    from sensor.probes import Sensor

    counts = {"exec": 0, "connect": 0, "elsewhere": 0, "events": 0}

    def on_event(event) -> None:
        counts["events"] += 1
        if getattr(event, "cgroup_id", None) != cgroup_id:
            counts["elsewhere"] += 1
            return
        kind = classify(event, cgroup_id)
        if kind:
            counts[kind] += 1

    cfg = Config()  # what the daemon and `record` ship with
    sensor = Sensor(ringbuf_pages=cfg.ringbuf_pages, max_cgroups=cfg.max_cgroups)
    try:
        sensor.attach()
        loss0 = dict(sensor.loss())
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        say({"ready": True})
        next_counts = t0 + 1.0
        last, max_gap, max_counts = t0, 0.0, 0.0
        while not stop.is_set():
            dispatch(sensor, sensor.poll(100), on_event)
            now = time.monotonic()
            if now >= next_counts:
                sensor.syscall_counts()
                max_counts = max(max_counts, time.monotonic() - now)
                next_counts += 1.0
            now = time.monotonic()
            max_gap, last = max(max_gap, now - last), now
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        quiet = 0
        while quiet < 5:  # drain to empty: five polls in a row that bring nothing
            before = counts["events"]
            dispatch(sensor, sensor.poll(100), on_event)
            quiet = quiet + 1 if counts["events"] == before else 0
        lost = loss_delta(loss0, dict(sensor.loss()))
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        say({"exec": counts["exec"], "connect": counts["connect"], "events": counts["events"],
             "elsewhere": counts["elsewhere"],
             "kernel_loss": sum(lost.values()), "loss_by_counter": lost, "cpu_seconds": cpu, "wall_seconds": t1 - t0,
             "user_seconds": r1.ru_utime - r0.ru_utime, "max_gap_ms": max_gap * 1000,
             "max_counts_ms": max_counts * 1000})
    finally:
        sensor.close()
    return 0


def dispatch(sensor, polled, on_event) -> None:
    """Feed what one ``Sensor.poll()`` returned (the decoded events) to ``on_event``."""
    if polled is None or isinstance(polled, int):
        return
    for event in polled:
        on_event(event)


def classify(event, cgroup_id: int) -> str | None:
    """'exec' or 'connect' for a decoded event of the generators' cgroup, else None."""
    if getattr(event, "cgroup_id", None) != cgroup_id:
        return None
    kind = type(event).__name__
    if kind == "ExecEvent":
        return "exec"
    if kind == "NetEvent" and getattr(event, "op", None) in ("connect", NET_OP_CONNECT):
        return "connect"
    return None


class Drain:
    """The drain process: started before a phase, stopped after it; returns its counts."""

    def __init__(self, cgroup_id: int):
        self.log = tempfile.TemporaryFile(mode="w+", prefix="envelope-bench-drain-")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_capacity", "drain", str(cgroup_id)],
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


def phase(progs, kind: str, seconds: float, with_sensor: bool, port: int, label: str) -> dict:
    drain = None
    gens: list[subprocess.Popen] = []
    with Cgroup(f"capacity-{kind}") as cg:
        try:
            if with_sensor:
                progress(f"{label}: attaching the sensor in a drain process")
                drain = Drain(cg.id)
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
    if seen is not None:
        got = int(seen[kind])
        row.update({"events seen": got, "missing": done - got, "kernel loss": int(seen["kernel_loss"]),
                    "drain CPU cores": seen["cpu_seconds"] / seen["wall_seconds"],
                    "drain user cores": seen["user_seconds"] / seen["wall_seconds"],
                    "longest drain iteration ms": seen["max_gap_ms"],
                    "events /s, all": seen["events"] / seen["wall_seconds"],
                    "events /s, other cgroups": seen["elsewhere"] / seen["wall_seconds"]})
    if seen is not None:
        counted = seen.get("loss_by_counter", {}).get(LOSS_COUNTER[kind], 0)
        row["missing, not counted as lost"] = max(0, row["missing"] - counted)
    if seen is not None and seen.get("loss_by_counter"):
        row["loss by counter"] = ", ".join(f"{k} {v:,}" for k, v in seen["loss_by_counter"].items())
    progress(f"{label}: {done:,} in {wall:.1f} s" + (f", sensor saw {row['events seen']:,}" if seen else ""))
    return row


def run(quick: bool = False) -> dict:
    p = params(quick)
    progs = build_programs(["exec_gen", "connect_gen", "tcp_sink", "true_static"])
    sink = None
    rows: list[dict] = []
    notes: list[str] = []
    sensor_reason = None
    errors: list[str] = []
    try:
        sink = subprocess.Popen([progs["tcp_sink"], "2"], stdout=subprocess.PIPE, text=True, start_new_session=True)
        port = int(sink.stdout.readline().strip().split("=", 1)[1])
        for kind in ("exec", "connect"):
            rows.append(phase(progs, kind, p["baseline_seconds"], False, port, f"{kind} baseline, before"))
            if sensor_reason is None:
                try:
                    rows.append(phase(progs, kind, p["seconds"], True, port, f"{kind} with sensor"))
                except DrainUnavailable as e:
                    sensor_reason = str(e)
                    progress(f"sensor unavailable: {sensor_reason}")
                except Exception as e:  # reported with the rows measured so far
                    errors.append(f"{kind} with sensor: {type(e).__name__}: {e}")
                    progress(f"{kind} with sensor failed: {e}")
            rows.append(phase(progs, kind, p["baseline_seconds"], False, port, f"{kind} baseline, after"))
    finally:
        if sink is not None:
            kill_process_group(sink)
        progs.cleanup()

    by = {r["case"]: r for r in rows}
    ratios: dict = {}
    for kind in ("exec", "connect"):
        bases = [by[f"{kind} baseline, {w}"]["rate /s"] for w in ("before", "after")]
        sens = by.get(f"{kind} with sensor")
        ratios[f"{kind} events missing"] = sens["missing"] if sens else None
        ratios[f"{kind} rate with sensor / baseline"] = (
            {"value": ratio(sens["rate /s"], sum(bases) / 2),
             "range": sorted(ratio(sens["rate /s"], b) for b in bases), "range_kind": "vs each baseline"}
            if sens else None)
    sensed = [r for r in rows if "kernel loss" in r]
    ratios["kernel loss during run"] = sum(r["kernel loss"] for r in sensed) if sensed else None
    ratios["missing events not counted as lost"] = (
        sum(r["missing, not counted as lost"] for r in sensed) if sensed else None)
    ratios["drain CPU cores (max of phases)"] = max((r["drain CPU cores"] for r in sensed), default=None)
    for r in sensed:
        if r["failed calls"]:
            notes.append(f"{r['case']}: {r['failed calls']} generator calls failed; a failed exec or "
                         "connect may or may not produce an event, so exactness is only claimed for 0")
    for r in sensed:
        if r["events /s, other cgroups"] > 0.5 * r["events /s, all"]:
            notes.append(f"{r['case']}: most events the sensor drained came from other cgroups "
                         f"({r['events /s, other cgroups']:,.0f}/s): the machine was shared with other "
                         "load, and loss counters are machine-wide")
    if sensor_reason:
        notes.append(f"sensor phases unavailable: {sensor_reason}")
    result = {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
              "notes": notes, "params": p, "errors": errors}
    if sensor_reason and not sensed:
        result["unavailable"] = f"sensor: {sensor_reason}"
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "drain":
        sys.exit(drain_main(int(sys.argv[2])))
    print(f"usage: {sys.argv[0]} drain CGROUP_ID", file=sys.stderr)
    sys.exit(2)
