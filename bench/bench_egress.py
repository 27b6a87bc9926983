"""connect() cost of the egress enforcement programs with 10,000 CIDR entries, against none and
against two floors measured in the same run.

A tiny C loop (compiled here from ``LOOP_C``) joins a fresh cgroup v2, opens one UDP socket and
times N ``connect()`` calls to 127.0.0.1:PORT in thread CPU time, pinned to the last CPU
(after N/10 warm-up). A UDP
connect only sets the peer, so the syscall is short and the cgroup ``connect4`` hook (which runs
for UDP and TCP connects alike, before any packet) is a visible part of it; a TCP handshake
would bury a ~100 ns difference in tens of microseconds of noise. Cases, interleaved over
repeats:

* **none**: no programs on the cgroup;
* **floor: empty connect4**: a ``cgroup/connect4`` program that returns 1 (the least any
  connect hook costs);
* **floor: one LPM lookup**: a ``cgroup/connect4`` program that does a single LPM-trie lookup of
  the destination among the same 10,000 prefixes (plus the peer's /32), keyed by the address
  alone, and allows;
* **egress 1 entry**: ``bpf/egress.c`` attached (enforce mode), one rule allowing the peer;
* **egress 10k entries**: the same with 10,000 more CIDR entries of mixed prefix lengths
  (/20 to /32, in 198.18.0.0/15, a benchmarking range nothing here connects to) plus the
  allowing rule.

Every connect is allowed, so each one runs the full check: state-word read, LPM trie lookup,
port check. Added ns = median(case) - median(none); Envelope's added cost is reported against
both floors' added costs.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import tempfile
from pathlib import Path

from . import Cgroup, cgroup_bpf_missing, parse_kv, progress, quartiles, ratio, summarize, unavailable

TITLE = "Egress enforcement: connect() cost (10,000 CIDR entries)"
TARGETS = {"ns added per connect (10k entries)": "<= 1000",
           "egress 10k added / one-LPM floor added": "<= 1.25"}
CASES = ["none", "floor: empty connect4", "floor: one LPM lookup", "egress 1 entry", "egress 10k entries"]

FLOOR_EMPTY_C = "int floor_connect4(struct bpf_sock_addr *ctx) { return 1; }"
FLOOR_LPM_C = r"""
struct key4 { __u32 prefixlen; __u32 addr; };
BPF_LPM_TRIE(prefixes, struct key4, __u32, 16384);
int floor_connect4(struct bpf_sock_addr *ctx)
{
    struct key4 k = {32, ctx->user_ip4};
    __u32 *hit = prefixes.lookup(&k);
    if (hit)
        return 1;
    return 1;
}
"""


LOOP_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* udp_connect_loop CGROUP_PROCS N PORT: joins the cgroup, times N connect() calls. */
/* Thread CPU time: the hook runs in the calling thread, and preemption by other load is excluded. */
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int cg = open(argv[1], O_WRONLY);
    if (cg < 0 || write(cg, "0", 1) != 1) { perror("join cgroup"); return 1; }
    close(cg);
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(sysconf(_SC_NPROCESSORS_ONLN) - 1, &set);
    sched_setaffinity(0, sizeof(set), &set);
    long n = atol(argv[2]);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    long failed = 0, last = 0;
    for (long i = 0; i < n / 10; i++) connect(fd, (struct sockaddr *)&a, sizeof(a));
    double t0 = now();
    for (long i = 0; i < n; i++)
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) { failed++; last = errno; }
    double t1 = now();
    printf("connects=%ld failed=%ld last_errno=%ld seconds=%.6f\n", n, failed, last, t1 - t0);
    return 0;
}
"""


def params(quick: bool) -> dict:
    return ({"repeats": 4, "runs": 2, "n": 300_000} if quick
            else {"repeats": 9, "runs": 3, "n": 1_000_000})


def method(quick: bool) -> str:
    p = params(quick)
    return (f"A C loop in a fresh cgroup, pinned to the last CPU, times {p['n']:,} `connect()` calls "
            f"(CLOCK_THREAD_CPUTIME_ID) on one UDP socket to 127.0.0.1 (after {p['n'] // 10:,} "
            f"warm-up; a UDP connect runs the same cgroup connect4 hook as TCP, without a "
            f"handshake's noise). Each repeat visits every case once in a shuffled order; a case's "
            f"slot runs the loop with nothing attached, then with the case attached, {p['runs']}x "
            f"each, keeping the fastest of each (a neighbour on this shared machine only adds "
            f"time); *added* = case - the bare run of the same slot; medians over {p['repeats']} "
            f"repeats, min-max spread. Programs, each loaded once: `bpf/egress.c` (connect4/6, "
            f"sendmsg4/6 and the DNS answer program attached with BPF_F_ALLOW_MULTI, enforce mode, "
            f"not pinned) with 1 entry, and with 10,000 CIDR entries /20-/32 in 198.18.0.0/15 plus "
            f"the rule allowing the peer; floors: an empty cgroup/connect4 program, and one doing a "
            f"single LPM-trie lookup keyed by the address alone among the same 10,000 prefixes plus "
            f"the peer's /32. Envelope's added cost is given against each floor's; a floor that "
            f"measured no cost (noise above the effect) fails the run instead of passing a ratio.")


def extra_rules(n: int) -> list:
    """``n`` distinct CIDRs, /20 to /32, inside 198.18.0.0/15 (deterministic)."""
    from enforcer.policy import EgressRule
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    nets: dict = {}
    i = 0
    while len(nets) < n:
        plen = 20 + (i % 13)
        addr = base + (i * 2654435761) % (1 << 17)
        net = ipaddress.IPv4Network((addr >> (32 - plen) << (32 - plen), plen))
        nets.setdefault(net, EgressRule("tcp" if i % 3 else "udp", str(net), (443 + i % 5,)))
        i += 1
    return list(nets.values())


class Floor:
    """A BCC-compiled ``cgroup/connect4`` floor program, attached to one cgroup at a time."""

    def __init__(self, source: str, prefixes: list | None = None):
        from bcc import BPF
        self.bpf = BPF(text=source)
        self.fn = self.bpf.load_func(b"floor_connect4", BPF.CGROUP_SOCK_ADDR,
                                     attach_type=10)  # BPF_CGROUP_INET4_CONNECT
        self.entries = 0
        if prefixes is not None:
            import ctypes
            t = self.bpf[b"prefixes"]
            for net in prefixes:
                k = t.Key(net.prefixlen, int.from_bytes(net.network_address.packed, "little"))
                t[k] = ctypes.c_uint32(1)
                self.entries += 1

    def attach(self, cgroup_path) -> None:
        from sensor import kernel
        fd = kernel.open_cgroup(cgroup_path)
        try:
            kernel.prog_attach(self.fn.fd, fd, kernel.BPF_CGROUP_INET4_CONNECT, kernel.BPF_F_ALLOW_MULTI)
        finally:
            os.close(fd)

    def detach(self, cgroup_path) -> None:
        from sensor import kernel
        fd = kernel.open_cgroup(cgroup_path)
        try:
            kernel.prog_detach(self.fn.fd, fd, kernel.BPF_CGROUP_INET4_CONNECT)
        finally:
            os.close(fd)


def loop_ns(loop: str, cg, port: int, n: int) -> float:
    """One run of the connect loop in ``cg``: ns per connect; every connect must succeed."""
    import subprocess
    out = subprocess.run([loop, str(cg.procs), str(n), str(port)], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"connect loop exited {out.returncode}: {out.stderr.strip()[-300:]}")
    kv = parse_kv(out.stdout.strip().splitlines()[-1])
    if kv.get("failed", 0) or kv.get("connects") != n:
        raise RuntimeError(f"{int(kv.get('failed', 0))} connects failed (last errno "
                           f"{int(kv.get('last_errno', 0))})")
    return kv["seconds"] / kv["connects"] * 1e9


def slot(loop: str, port: int, p: dict, attached) -> tuple[float, float]:
    """(bare, with the case) ns per connect, each the fastest of ``runs``, in one fresh cgroup."""
    with Cgroup("egress") as cg:
        bare = min(loop_ns(loop, cg, port, p["n"]) for _ in range(p["runs"]))
        if attached is None:
            return bare, min(loop_ns(loop, cg, port, p["n"]) for _ in range(p["runs"]))
        attached.attach(str(cg.path))
        try:
            return bare, min(loop_ns(loop, cg, port, p["n"]) for _ in range(p["runs"]))
        finally:
            attached.detach(str(cg.path))


def build_loop(tmp: Path) -> str:
    import subprocess
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not found; install gcc and libc6-dev (make setup)")
    src, out = tmp / "udp_connect_loop.c", tmp / "udp_connect_loop"
    src.write_text(LOOP_C)
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"gcc udp_connect_loop.c failed: {r.stderr.strip()}")
    return str(out)


def run(quick: bool = False) -> dict:
    missing = cgroup_bpf_missing()
    if missing:
        return unavailable(TITLE, method(quick), missing, TARGETS)
    import socket
    from enforcer.policy import EgressRule
    p = params(quick)
    tmp = Path(tempfile.mkdtemp(prefix="envelope-bench-egress-"))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the peer exists; nothing is sent
    peer.bind(("127.0.0.1", 0))
    port = peer.getsockname()[1]
    programs = []
    try:
        loop = build_loop(tmp)
        from enforcer.egress import EgressProgram
        allow = EgressRule("udp", "127.0.0.1/32", (port,))
        big = extra_rules(10_000)
        lpm = Floor(FLOOR_LPM_C, [ipaddress.ip_network(r.cidr) for r in big]
                    + [ipaddress.ip_network("127.0.0.1/32")])
        if lpm.entries != len(big) + 1:
            raise RuntimeError(f"LPM floor holds {lpm.entries} prefixes, expected {len(big) + 1}")
        one = EgressProgram.load("bench/Unit/egress-1/main", pin_dir=None)
        programs.append(one)
        one.write_policy([allow], "enforce", grace=0)
        ten = EgressProgram.load("bench/Unit/egress-10k/main", pin_dir=None)
        programs.append(ten)
        compiled = ten.write_policy(big + [allow], "enforce", grace=0)
        entries = {"none": 0, "floor: empty connect4": 0, "floor: one LPM lookup": lpm.entries,
                   "egress 1 entry": 1, "egress 10k entries": compiled.count}
        attached = {"none": None, "floor: empty connect4": Floor(FLOOR_EMPTY_C),
                    "floor: one LPM lookup": lpm, "egress 1 entry": one, "egress 10k entries": ten}
        samples: dict[str, list[float]] = {c: [] for c in CASES}
        bare_runs: list[float] = []
        rng = random.Random(9)
        for r in range(p["repeats"]):
            order = list(CASES)
            rng.shuffle(order)
            for case in order:
                bare, ns = slot(loop, port, p, attached[case])
                bare_runs.append(bare)
                samples[case].append(ns - bare)
                progress(f"repeat {r + 1}/{p['repeats']} {case}: {ns:.0f} ns per connect, "
                         f"{ns - bare:+.1f} on the bare run before it")
    finally:
        for prog in programs:
            prog.close()
        peer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {c: summarize(v) for c, v in samples.items()}
    base = summarize(bare_runs)["median"]
    rows = []
    for c in CASES:
        st = stats[c]
        rows.append({"case": c, "entries": entries[c],
                     "ns per connect": round(base + st["median"], 1) if c != "none" else round(base, 1),
                     "ns added": round(st["median"], 1) if c != "none" else 0.0,
                     "added range": [round(st["min"], 1), round(st["max"], 1)] if c != "none" else None})
    added_10k = stats["egress 10k entries"]["median"]
    empty = stats["floor: empty connect4"]["median"]
    one_lpm = stats["floor: one LPM lookup"]["median"]
    errors = [f"{name} measured no added cost ({v:.1f} ns): noise exceeded the effect; rerun on a "
              f"quieter machine" for name, v in (("the empty-program floor", empty),
                                                  ("the one-LPM floor", one_lpm),
                                                  ("egress 10k entries", added_10k)) if v <= 0]

    def per_repeat(num, den):
        return {"value": ratio(stats[num]["median"], stats[den]["median"]),
                "range": quartiles([ratio(x, y) for x, y in zip(samples[num], samples[den]) if y > 0]),
                "range_kind": "IQR"}

    out = {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {"ns added per connect (10k entries)": added_10k,
                   "ns added per connect (1 entry)": stats["egress 1 entry"]["median"],
                   "ns added: empty connect4 floor": empty,
                   "ns added: one-LPM floor": one_lpm,
                   "egress 10k added / one-LPM floor added": None if errors else per_repeat(
                       "egress 10k entries", "floor: one LPM lookup"),
                   "egress 10k added / empty-program floor added": None if errors else per_repeat(
                       "egress 10k entries", "floor: empty connect4")},
        "targets": TARGETS,
        "params": p,
    }
    if errors:
        out["errors"] = errors
    return out
