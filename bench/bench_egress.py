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
import shutil
import tempfile
from pathlib import Path

from . import Cgroup, parse_kv, progress, ratio, summarize, unavailable

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
    return {"repeats": 5, "n": 500_000} if quick else {"repeats": 9, "n": 2_000_000}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"A C loop in a fresh cgroup, pinned to the last CPU, times {p['n']:,} `connect()` calls "
            f"(CLOCK_THREAD_CPUTIME_ID) on one UDP socket to "
            f"127.0.0.1 (after {p['n'] // 10:,} warm-up; a UDP connect runs the same cgroup connect4 "
            f"hook as TCP, without a handshake's noise). Cases interleaved over {p['repeats']} "
            f"repeats, medians reported. Programs: `bpf/egress.c` connect4/6 + sendmsg4/6 attached "
            f"with BPF_F_ALLOW_MULTI, enforce mode, not pinned; 10k case: 10,000 CIDR entries "
            f"/20-/32 in 198.18.0.0/15 plus the rule allowing the peer. Floors, in the same run: an "
            f"empty cgroup/connect4 program, and one doing a single LPM-trie lookup keyed by the "
            f"address alone among the same 10,000 prefixes plus the peer's /32. Added ns = "
            f"median(case) - median(none); Envelope's added cost is given against each floor's.")


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


def run_case(loop: str, port: int, n: int, rules) -> float:
    """ns per connect() in a fresh cgroup, with ``rules`` enforced (None: no programs; a
    :class:`Floor`: that program)."""
    import subprocess
    prog = None
    with Cgroup("egress") as cg:
        floor = rules if isinstance(rules, Floor) else None
        try:
            if floor is not None:
                floor.attach(cg.path)
            elif rules is not None:
                from enforcer.egress import EgressProgram
                prog = EgressProgram.load("bench/Unit/egress/main", pin_dir=None)
                prog.write_policy(rules, "enforce", grace=0)
                prog.attach(str(cg.path))
            out = subprocess.run([loop, str(cg.procs), str(n), str(port)], capture_output=True,
                                 text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"connect loop exited {out.returncode}: {out.stderr.strip()[-300:]}")
            kv = parse_kv(out.stdout.strip().splitlines()[-1])
            if kv.get("failed", 0):
                raise RuntimeError(f"{int(kv['failed'])} connects failed (last errno {int(kv['last_errno'])})")
            return kv["seconds"] / kv["connects"] * 1e9
        finally:
            if floor is not None:
                floor.detach(cg.path)
            if prog is not None:
                prog.detach(str(cg.path))
                prog.close()


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
    if os.geteuid() != 0:
        return unavailable(TITLE, method(quick), "needs root (cgroup and BPF attach)", TARGETS)
    try:
        import bcc  # noqa: F401
    except ImportError:
        return unavailable(TITLE, method(quick), "needs bcc (python3-bpfcc)", TARGETS)
    import socket
    from enforcer.policy import EgressRule
    p = params(quick)
    tmp = Path(tempfile.mkdtemp(prefix="envelope-bench-egress-"))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the peer exists; nothing is sent
    peer.bind(("127.0.0.1", 0))
    port = peer.getsockname()[1]
    try:
        loop = build_loop(tmp)
        allow = EgressRule("udp", "127.0.0.1/32", (port,))
        big = extra_rules(10_000)
        lpm = Floor(FLOOR_LPM_C, [ipaddress.ip_network(r.cidr) for r in big]
                    + [ipaddress.ip_network("127.0.0.1/32")])
        if lpm.entries != len(big) + 1:
            raise RuntimeError(f"LPM floor holds {lpm.entries} prefixes, expected {len(big) + 1}")
        rule_sets = {"none": None, "floor: empty connect4": Floor(FLOOR_EMPTY_C),
                     "floor: one LPM lookup": lpm,
                     "egress 1 entry": [allow], "egress 10k entries": big + [allow]}
        samples: dict[str, list[float]] = {c: [] for c in CASES}
        for r in range(p["repeats"]):
            for case in CASES:
                ns = run_case(loop, port, p["n"], rule_sets[case])
                samples[case].append(ns)
                progress(f"repeat {r + 1}/{p['repeats']} {case}: {ns:.0f} ns per connect")
    finally:
        peer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {c: summarize(v) for c, v in samples.items()}
    base = stats["none"]["median"]
    rows = []
    for c in CASES:
        s = stats[c]
        rs = rule_sets[c]
        entries = 0 if rs is None else rs.entries if isinstance(rs, Floor) else len(rs)
        rows.append({"case": c, "entries": entries,
                     "ns per connect": round(s["median"], 1), "spread": round(s["spread"] or 0, 3),
                     "ns added": round(s["median"] - base, 1)})
    added_10k = stats["egress 10k entries"]["median"] - base
    empty = stats["floor: empty connect4"]["median"] - base
    one = stats["floor: one LPM lookup"]["median"] - base
    return {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {"egress 10k / none": ratio(stats["egress 10k entries"]["median"], base),
                   "egress 1 / none": ratio(stats["egress 1 entry"]["median"], base),
                   "ns added per connect (10k entries)": added_10k,
                   "egress 10k added / one-LPM floor added": ratio(added_10k, one),
                   "egress 10k added / empty-program floor added": ratio(added_10k, empty),
                   "ns added: empty connect4 floor": empty,
                   "ns added: one-LPM floor": one},
        "targets": TARGETS,
    }
