"""What the request capture costs: per syscall everywhere, per write() outside watched cgroups,
per HTTPS request and on an HTTPS download loop inside them.

Four measurements, each with the capture and without it in the same run:

- **syscall path**: the getppid loop (``bench/progs/getppid_loop.c``) with nothing attached, an
  empty raw tracepoint (the floor), the sensor alone, and the sensor with the capture loaded and
  a cgroup watched (the loop's own cgroup is not): the capture hooks sys_enter only through the
  sensor's per-slot hook word, so getppid should pay nothing more;
- **write() outside watched cgroups**: ``bench/progs/write_loop.c`` (1-byte writes to /dev/null)
  under the sensor alone and under the sensor with the capture (hooked cgroup: another one);
- **HTTPS requests**: a Python client (http.client, keep-alive, the system libssl) makes N GET
  requests to a local HTTPS server (Python's http.server, another process) from a cgroup, with
  the sensor alone (no capture), with the capture loaded and the cgroup not watched (the uprobes
  on libssl still fire: they are per file), and with the cgroup watched; per-request wall time;
- **HTTPS download loop**: the same client downloads a 1 MiB body over and over for a fixed time;
  MB/s with the capture on (watched) against the sensor alone.

Each case checks it measured what it says: the probes counted the loop's syscalls, the client
got every byte it asked for, and the watched cases' requests were all captured (exchanges seen).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import Cgroup, build_programs, parse_kv, progress, quartiles, ratio, summarize
from .bench_syscall import NR_GETPPID, Floor, best_of_runs

TITLE = "Request capture cost (http)"
TARGETS = {"https download: capture / sensor alone (throughput)": ">= 0.95",
           "https download: capture without TLS response probes / sensor alone": ">= 0.95",
           "getppid: sensor+capture added / floor added": "<= 1.10 × sensor's own ratio",
           "write() outside watched cgroups: capture added ns": "within the noise (compare with the spread)"}
NR_WRITE = 1
COUNTS_INTERVAL = 1.0  # seconds: sensor.pump.Pump's default counts_interval

CLIENT = r"""
import http.client, ssl, sys, time
mode, port, ca, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
c.request("GET", "/warm/1"); c.getresponse().read()
t0 = time.perf_counter(); count = 0; got = 0
if mode == "requests":
    for i in range(int(n)):
        c.request("GET", f"/v1/docs/{i}"); r = c.getresponse(); got += len(r.read()); count += 1
else:
    while time.perf_counter() - t0 < n:
        c.request("GET", "/download/1048576"); r = c.getresponse(); b = r.read(); got += len(b); count += 1
        assert len(b) == 1048576
dt = time.perf_counter() - t0
print(f"requests={count} bytes={got} seconds={dt:.6f}")
"""

SERVER = r"""
import http.server, ssl, sys, trustme
ca = trustme.CA(); cert = ca.issue_cert("127.0.0.1")
ca.cert_pem.write_to_path(sys.argv[1])
BODY = b"x" * 1048576
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no delayed-ACK stall between them
    def do_GET(self):
        body = BODY if self.path.startswith("/download/") else b'{"ok":1}'
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); cert.configure_cert(ctx)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def method(quick: bool) -> str:
    p = params(quick)
    return (f"Syscall path: getppid loop, N = {p['n']:,}, best of {p['runs']} runs per slot, {p['repeats']} "
            f"repeats in a shuffled order, each case right after a bare run (added = case − bare); "
            f"cases bare, floor (empty raw tracepoint), sensor, sensor+capture (a cgroup watched, not the "
            f"loop's). write(): write_loop, same scheme, sensor against sensor+capture. HTTPS: a "
            f"keep-alive http.client client in its own cgroup, {p['requests']:,} GET requests per run "
            f"(wall µs per request, median of {p['https_repeats']} runs), and a {p['download_s']:.0f} s "
            f"1 MiB download loop (MB/s), against a local http.server over TLS in another process; "
            f"cases: sensor alone, capture loaded with the client's cgroup not watched, capture watched, "
            f"capture watched without the SSL_read probes (config http_tls_responses: false). "
            f"The sensor's ring and the capture's are drained by a thread as the daemon does.")


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "runs": 3, "n": 1_000_000, "requests": 500, "https_repeats": 3, "download_s": 3.0}
    return {"repeats": 9, "runs": 5, "n": 1_000_000, "requests": 2000, "https_repeats": 7, "download_s": 10.0}


class _Sensor:
    """A sensor (with or without the capture) drained by a thread; watches ``watch`` if given."""

    def __init__(self, capture: bool, watch: Cgroup | None = None, tls_responses: bool = True):
        from sensor.probes import Sensor
        exts = []
        if capture:
            from sensor.httpcapture import HttpCapture
            exts.append(HttpCapture(os.urandom(32), tls_responses=tls_responses))
        self.capture = exts[0] if exts else None
        self.sensor = Sensor(ringbuf_pages=256, max_cgroups=1024, extensions=exts)
        self.sensor.attach()
        if watch is not None:
            self.sensor.watch_cgroup(watch.id, str(watch.path))
        self.exchanges = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        try:
            next_counts = 0.0
            while not self._stop.is_set():
                for ev in self.sensor.poll(100):
                    if type(ev).__name__ == "RequestObserved":
                        self.exchanges += 1
                if time.monotonic() >= next_counts:  # the pump reads the counters once a second
                    next_counts = time.monotonic() + COUNTS_INTERVAL
                    self.sensor.behaviour_counts()  # and with them runs the capture's tick
        except BaseException as e:  # surfaced by the case that reads `error`
            self.error = e

    error = None

    def counted(self, nr: int) -> int:
        return sum(per.get(nr, 0) for per in self.sensor.syscall_counts().values())

    def close(self):
        self._stop.set()
        self._thread.join()  # the drain loop looks at the flag every 100 ms
        self.sensor.close()


def _loop_case(loop: str, p: dict, nr: int, capture: bool, other: Cgroup) -> tuple[float, str]:
    s = _Sensor(capture, watch=other if capture else None)
    try:
        before = s.counted(nr)
        value = best_of_runs(loop, p["n"], p["runs"])
        counted = s.counted(nr) - before
        if counted < p["n"] * p["runs"]:
            raise RuntimeError(f"counted {counted} calls, expected >= {p['n'] * p['runs']}")
        return value, f"counted {counted:,}"
    finally:
        s.close()


def _interleaved(loop: str, p: dict, nr: int, cases: dict, other: Cgroup) -> dict:
    import random
    values = {c: [] for c in ["bare", *cases]}
    added = {c: [] for c in cases}
    checks = {}
    rng = random.Random(20261201)
    for rep in range(p["repeats"]):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            progress(f"{Path(loop).name} repeat {rep + 1}/{p['repeats']}: bare, then {name}")
            bare = best_of_runs(loop, p["n"], p["runs"])
            value, checks[name] = cases[name]()
            values["bare"].append(bare)
            values[name].append(value)
            added[name].append(value - bare)
    return {"values": values, "added": added, "checks": checks}


def _client(cg: Cgroup, mode: str, port: int, ca: str, n: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, mode, str(port), ca, str(n)], capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: cg.add(os.getpid()))
    if proc.returncode != 0:
        raise RuntimeError(f"https client failed: {proc.stderr.strip()[-400:]}")
    return parse_kv(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    p = params(quick)
    progs = build_programs(["getppid_loop", "write_loop"])
    rows: list[dict] = []
    notes: list[str] = []
    ratios: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="envelope-bench-http-"))
    server = None
    with Cgroup("http-watched") as watched, Cgroup("http-client") as client_cg:
        try:
            # ---- syscall path and write(): the loops run in this process's cgroup, never watched
            floor = Floor()
            try:
                sysres = _interleaved(progs["getppid_loop"], p, NR_GETPPID, {
                    "floor": lambda: floor.measure(progs["getppid_loop"], p["n"], p["runs"]),
                    "sensor": lambda: _loop_case(progs["getppid_loop"], p, NR_GETPPID, False, watched),
                    "sensor+capture": lambda: _loop_case(progs["getppid_loop"], p, NR_GETPPID, True, watched),
                }, watched)
            finally:
                floor.close()
            wres = _interleaved(progs["write_loop"], p, NR_WRITE, {
                "sensor": lambda: _loop_case(progs["write_loop"], p, NR_WRITE, False, watched),
                "sensor+capture": lambda: _loop_case(progs["write_loop"], p, NR_WRITE, True, watched),
            }, watched)
            for label, res in (("getppid", sysres), ("write() outside watched cgroups", wres)):
                for case, vals in res["values"].items():
                    s = summarize(vals)
                    a = summarize(res["added"].get(case, [0.0]))
                    rows.append({"case": f"{label}: {case}", "ns/call": s["median"],
                                 "range": [s["min"], s["max"]], "added ns": a["median"] if case != "bare" else 0.0,
                                 "added range": [a["min"], a["max"]] if case != "bare" else None,
                                 "check": res["checks"].get(case, "")})
            sa, sf = sysres["added"]["sensor+capture"], sysres["added"]["floor"]
            so = sysres["added"]["sensor"]
            ratios["getppid: sensor added / floor added"] = ratio(summarize(so)["median"], summarize(sf)["median"])
            ratios["getppid: sensor+capture added / floor added"] = {
                "value": ratio(summarize(sa)["median"], summarize(sf)["median"]),
                "range": quartiles([ratio(x, y) for x, y in zip(sa, sf) if y]), "range_kind": "IQR"}
            ratios["getppid: (sensor+capture) / sensor, total ns"] = ratio(
                summarize(sysres["values"]["sensor+capture"])["median"], summarize(sysres["values"]["sensor"])["median"])
            ratios["write(): capture added ns (outside watched cgroups)"] = (
                summarize(wres["values"]["sensor+capture"])["median"] - summarize(wres["values"]["sensor"])["median"])

            # ---- HTTPS: the client runs in client_cg, watched or not
            ca = str(tmp / "ca.pem")
            server = subprocess.Popen([sys.executable, "-c", SERVER, ca], stdout=subprocess.PIPE, text=True,
                                      preexec_fn=lambda: os.sched_setaffinity(0, {0}))
            port = int(server.stdout.readline())
            per_request: dict[str, list[float]] = {}
            throughput: dict[str, list[float]] = {}
            checks: dict[str, str] = {}
            cases = {"sensor alone": (False, False, True), "capture, cgroup not watched": (True, False, True),
                     "capture, cgroup watched": (True, True, True),
                     "capture watched, no TLS response probes": (True, True, False)}
            for rep in range(p["https_repeats"]):
                for name, (capture, watch, responses) in cases.items():
                    progress(f"https repeat {rep + 1}/{p['https_repeats']}: {name}")
                    s = _Sensor(capture, watch=client_cg if watch else None, tls_responses=responses)
                    try:
                        r = _client(client_cg, "requests", port, ca, p["requests"])
                        if r["requests"] != p["requests"] or r["bytes"] <= 0:
                            raise RuntimeError(f"{name}: {r}")
                        d = _client(client_cg, "download", port, ca, p["download_s"])
                        if d["bytes"] != d["requests"] * 1048576 or d["requests"] < 1:
                            raise RuntimeError(f"{name}: download got {d}")
                        time.sleep(0.5)  # let the drain thread finish the exchanges
                        if s.error is not None:
                            raise RuntimeError(f"{name}: the drain thread failed: {s.error!r}")
                        if watch:
                            want = p["requests"] + d["requests"] + 2
                            if s.exchanges < want * 0.99:
                                raise RuntimeError(f"{name}: {s.exchanges} exchanges captured of {want}")
                            checks[name] = f"{s.exchanges} of {want} exchanges captured"
                        else:
                            checks[name] = f"{r['requests']} requests, {d['requests']} downloads"
                    finally:
                        s.close()
                    per_request.setdefault(name, []).append(r["seconds"] / r["requests"] * 1e6)
                    throughput.setdefault(name, []).append(d["bytes"] / d["seconds"] / 1e6)
            base_us = summarize(per_request["sensor alone"])["median"]
            base_mb = summarize(throughput["sensor alone"])["median"]
            for name in cases:
                a, b = summarize(per_request[name]), summarize(throughput[name])
                rows.append({"case": f"https: {name}", "µs/request": a["median"], "range": [a["min"], a["max"]],
                             "added µs/request": a["median"] - base_us, "download MB/s": b["median"],
                             "MB/s range": [b["min"], b["max"]], "check": checks.get(name, "")})
            ratios["https download: capture / sensor alone (throughput)"] = ratio(
                summarize(throughput["capture, cgroup watched"])["median"], base_mb)
            ratios["https download: capture without TLS response probes / sensor alone"] = ratio(
                summarize(throughput["capture watched, no TLS response probes"])["median"], base_mb)
            ratios["https request: capture added µs"] = (
                summarize(per_request["capture, cgroup watched"])["median"] - base_us)
            ratios["https request: capture loaded, not watched, added µs"] = (
                summarize(per_request["capture, cgroup not watched"])["median"] - base_us)
        finally:
            if server is not None:
                server.kill()
                server.wait()
            progs.cleanup()
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": notes, "params": p}
