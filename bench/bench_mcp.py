"""The MCP gateway's cost: added latency per ``tools/call`` and calls per second through it.

Peers are real: mcp-server-time (its own server from PyPI) on stdio, and the same server's
streamable-HTTP app served by uvicorn on loopback; the official SDK client drives them. Each
transport is measured directly and through the gateway (``envelope mcp wrap`` on stdio,
``envelope mcp proxy`` on HTTP) in observe mode and in enforce mode with a policy derived
(``envelope derive --substrates mcp``) from the benchmark's own warm-up sessions, so enforce
judges every call, and the gateway checks the workload's mode and exceptions before each one. The client and the
servers share the machine's two cores with the gateway, as they would in a pod.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import ROOT, progress, ratio, summarize, unavailable

TITLE = "MCP gateway: added latency per tools/call and throughput (stdio, streamable HTTP)"
TARGETS = {"stdio added median, ms": "<= 1.0", "http added median, ms": "<= 2.0"}
TOOL = ("get_current_time", {"timezone": "Europe/Paris"})
ENVELOPE = [sys.executable, "-m", "envelope.cli"]


def params(quick: bool) -> dict:
    return {"calls": 150 if quick else 1000, "repeats": 2 if quick else 5, "warmup": 20}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"The official `mcp` client calls `{TOOL[0]}` of mcp-server-time {p['calls']} times in one session, "
        f"sequentially, timing each call with `time.perf_counter` (after {p['warmup']} warm-up calls); "
        f"{p['repeats']} sessions per case, per-call latencies pooled, median and p99. Cases: the server "
        "directly, through the gateway in observe mode, and in enforce mode with a policy derived (`envelope derive "
        "--substrates mcp`) from three recorded sessions. stdio: the client launches the server, or `envelope mcp wrap -- SERVER`. HTTP: the "
        "server's streamable-HTTP app under uvicorn on 127.0.0.1, the client speaking the stateless revision "
        "(2026-07-28, one POST per call) directly or through `envelope mcp proxy`. Calls per second is the "
        "number of calls over the wall time of the timed loop. Every call must succeed, or the case fails."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Upstream:
    def __init__(self):
        import uvicorn
        from mcp_server_time.server import create_server

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_server("UTC").streamable_http_app(), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("mcp-server-time HTTP app did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}/mcp"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class _Proxy:
    def __init__(self, state: Path, upstream: str, extra: list[str]):
        self.cmd = [*ENVELOPE, "--state-dir", str(state), "mcp", "proxy", "--workload", "bench-mcp",
                    "--listen", "127.0.0.1:0", "--upstream", upstream, *extra]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not select.select([self.proc.stderr], [], [], 0.5)[0]:
                continue
            line = self.proc.stderr.readline()
            if not line:
                break
            m = re.search(r"mcp proxy ready on [\d.]+:(\d+)", line)
            if m:
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
                return f"http://127.0.0.1:{m.group(1)}/mcp"
        self.proc.kill()
        raise RuntimeError("envelope mcp proxy did not become ready")

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(20)


def _target(kind: str, where, extra: list[str], state: Path):
    from mcp.client.stdio import StdioServerParameters

    server = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]
    if kind == "stdio":
        if where == "direct":
            return StdioServerParameters(command=server[0], args=server[1:])
        return StdioServerParameters(command=ENVELOPE[0], args=[*ENVELOPE[1:], "--state-dir", str(state), "mcp",
                                                                "wrap", "--workload", "bench-mcp", *extra, "--",
                                                                *server], cwd=str(ROOT))
    return where


async def _session(target, calls: int, warmup: int, mode: str) -> tuple[list[float], float]:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client

    if isinstance(target, StdioServerParameters):
        target = stdio_client(target, errlog=open(os.devnull, "w"))
    async with Client(target, mode=mode, read_timeout_seconds=30) as c:
        await c.list_tools()
        for _ in range(warmup):
            r = await c.call_tool(*TOOL)
            if r.is_error:
                raise RuntimeError(f"warm-up call failed: {r.content}")
        lat = []
        t0 = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            r = await c.call_tool(*TOOL)
            lat.append(time.perf_counter() - t)
            if r.is_error:
                raise RuntimeError(f"call failed: {r.content}")
        return lat, time.perf_counter() - t0


def _p99(vals: list[float]) -> float:
    return statistics.quantiles(vals, n=100, method="inclusive")[98]


def run(quick: bool = False) -> dict:
    try:
        import anyio
        import mcp  # noqa: F401
        import mcp_server_time  # noqa: F401
    except ImportError as e:
        return unavailable(TITLE, method(quick), f"the MCP SDK or mcp-server-time is not installed ({e}); "
                                                 f"make setup installs them", TARGETS)
    p = params(quick)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="envelope-bench-mcp-") as tmp:
        state = Path(tmp)
        with _Upstream() as upstream:
            # a policy from three recorded sessions (through the stdio gateway), for enforce mode
            for _ in range(3):
                anyio.run(_session, _target("stdio", "gateway", [], state), 5, 0, "auto")
            env_file = state / "policy.yaml"
            out = subprocess.run([*ENVELOPE, "--state-dir", str(state), "derive", "bench-mcp", "--substrates", "mcp",
                                  "--force", "--min-count", "3", "--min-sessions", "3", "--out", str(env_file)],
                                 cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"envelope derive --substrates mcp failed: {out.stderr.strip()}")
            enforce = ["--policy", str(env_file), "--mode", "enforce"]
            for kind in ("stdio", "http"):
                for case, extra in (("direct", None), ("observe", []), ("enforce", enforce)):
                    lat: list[float] = []
                    rates = []
                    for _ in range(p["repeats"]):
                        if kind == "http" and extra is not None:
                            with _Proxy(state, upstream, extra) as url:
                                got, wall = anyio.run(_session, url, p["calls"], p["warmup"], "auto")
                        else:
                            target = _target(kind, upstream if kind == "http" else case, extra or [], state)
                            got, wall = anyio.run(_session, target, p["calls"], p["warmup"], "auto")
                        if len(got) != p["calls"]:
                            raise RuntimeError(f"{kind} {case}: {len(got)} of {p['calls']} calls measured")
                        lat += got
                        rates.append(len(got) / wall)
                    s = summarize(rates)
                    rows.append({"case": f"{kind} {case}", "calls": len(lat),
                                 "median_ms": round(statistics.median(lat) * 1e3, 3),
                                 "p99_ms": round(_p99(lat) * 1e3, 3),
                                 "calls_per_s": round(s["median"], 1), "calls_per_s_spread": s["spread"]})
                    progress(f"mcp: {kind} {case}: median {rows[-1]['median_ms']} ms, p99 {rows[-1]['p99_ms']} ms, "
                             f"{rows[-1]['calls_per_s']} calls/s")
    by = {r["case"]: r for r in rows}
    ratios = {}
    for kind in ("stdio", "http"):
        direct = by[f"{kind} direct"]
        for case in ("observe", "enforce"):
            r = by[f"{kind} {case}"]
            r["added_median_ms"] = round(r["median_ms"] - direct["median_ms"], 3)
            r["added_p99_ms"] = round(r["p99_ms"] - direct["p99_ms"], 3)
        ratios[f"{kind} added median, ms"] = by[f"{kind} enforce"]["added_median_ms"]
        ratios[f"{kind} added p99, ms"] = by[f"{kind} enforce"]["added_p99_ms"]
        ratios[f"{kind} throughput enforce / direct"] = ratio(by[f"{kind} enforce"]["calls_per_s"],
                                                              direct["calls_per_s"])
    return {"title": TITLE, "method": method(quick), "rows": rows, "ratios": ratios, "targets": TARGETS,
            "notes": ["added = gateway case minus direct case (medians and p99s of pooled per-call latencies)"]}


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
