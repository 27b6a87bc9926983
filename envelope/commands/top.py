"""``envelope top``: a live per-workload view of syscall, exec and connect rates, and losses."""

from __future__ import annotations

import signal
import sys
import threading
import time

from ..output import add_output_option, dump, table


def register(sub) -> None:
    p = sub.add_parser("top", help="live per-workload syscall/exec/connect rates and losses")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("-n", "--iterations", type=int, default=0, help="stop after N refreshes (0: until Ctrl-C)")
    p.add_argument("--limit", type=int, default=20, help="rows to show in the table (default 20)")
    add_output_option(p)
    p.set_defaults(func=cmd_top)


def snapshot(observer, prev: dict, prev_loss: dict, elapsed: float) -> tuple[dict, dict, dict]:
    cur = {w: (r.syscalls, r.execs, r.connects, r.new_behaviours)
           for w, r in observer.agg.totals.items()}
    rows = []
    for w, (sc, ex, co, nb) in cur.items():
        p = prev.get(w, (0, 0, 0, 0))
        rows.append({
            "workload": w.key,
            "syscalls_per_s": round((sc - p[0]) / elapsed, 1),
            "execs_per_s": round((ex - p[1]) / elapsed, 1),
            "connects_per_s": round((co - p[2]) / elapsed, 1),
            "new_behaviours": nb - p[3],
            "sessions": sum(1 for b in observer.agg.bindings.values() if b.workload == w),
        })
    rows.sort(key=lambda r: (-r["syscalls_per_s"], r["workload"]))
    loss = observer.sensor.loss()
    lost = {k: v - prev_loss.get(k, 0) for k, v in loss.items() if v - prev_loss.get(k, 0)}
    return {"time": time.time(), "interval": round(elapsed, 3), "workloads": rows,
            "lost": lost, "lost_total": loss}, cur, loss


def cmd_top(args, config) -> int:
    from sensor.identity import Resolver
    from sensor.pump import NodeBinding, Pump

    from .. import wiring
    from ..daemon import own_cgroup_id
    from ..recording import progress_printer

    say = progress_printer(sys.stderr.isatty() or args.output == "table")
    say("attaching probes (compiling BPF, a few seconds)")
    sensor = wiring.open_sensor(config)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        binding = NodeBinding(Resolver(host_root=config.host_root),
                              ignore_cgroups={c for c in [own_cgroup_id()] if c is not None})
        observer = Pump(sensor, binding, wiring.aggregator(config),
                        counts_interval=min(config.poll_interval, args.interval))
        prev, prev_loss = {}, sensor.loss()
        last = time.monotonic()
        shown = 0
        while not stop.is_set() and (args.iterations == 0 or shown < args.iterations):
            deadline = last + args.interval
            while time.monotonic() < deadline and not stop.is_set():
                observer.step(100)
            now = time.monotonic()
            snap, prev, prev_loss = snapshot(observer, prev, prev_loss, now - last)
            last = now
            shown += 1
            render(snap, args)
    finally:
        sensor.close()
    return 0


def render(snap: dict, args) -> None:
    if args.output != "table":
        sys.stdout.write(dump(snap, args.output) + ("---\n" if args.output == "yaml" else ""))
        sys.stdout.flush()
        return
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J")
    lost = ", ".join(f"{k}={v}" for k, v in snap["lost"].items()) or "none"
    sys.stdout.write(f"envelope top  interval {snap['interval']}s  lost this interval: {lost}\n\n")
    rows = [[r["workload"], r["syscalls_per_s"], r["execs_per_s"], r["connects_per_s"],
             r["new_behaviours"], r["sessions"]] for r in snap["workloads"][: args.limit]]
    sys.stdout.write(table(rows, ["workload", "syscalls/s", "execs/s", "connects/s", "new", "sessions"]))
    sys.stdout.flush()
