"""connect() cost of the egress enforcement programs with 10,000 CIDR entries, against none.

A tiny C loop (compiled here from ``LOOP_C``) joins a fresh cgroup v2, opens one UDP socket and
times N ``connect()`` calls to 127.0.0.1:PORT in thread CPU time, pinned to the last CPU
(after N/10 warm-up). A UDP
connect only sets the peer, so the syscall is short and the cgroup ``connect4`` hook (which runs
for UDP and TCP connects alike, before any packet) is a visible part of it; a TCP handshake
would bury a ~100 ns difference in tens of microseconds of noise. Cases, interleaved over
repeats:

* **none**: no programs on the cgroup;
* **egress 1 entry**: ``bpf/egress.c`` attached (enforce mode), one rule allowing the peer;
* **egress 10k entries**: the same with 10,000 more CIDR entries of mixed prefix lengths
  (/20 to /32, in 198.18.0.0/15, a benchmarking range nothing here connects to) plus the
  allowing rule.

Every connect is allowed, so each one runs the full check: state-word read, LPM trie lookup,
port check. Added ns = median(case) - median(none). A run measured what it claims only if all
N connects succeeded and one connect that no rule allows, made after the loop, was refused with
EPERM under the programs and not without them; otherwise the benchmark fails.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

from . import Cgroup, parse_kv, progress, ratio, summarize, unavailable

TITLE = "Egress enforcement: connect() cost (10,000 CIDR entries)"
TARGETS = {"ns added per connect (10k entries)": "<= 1000"}
CASES = ["none", "egress 1 entry", "egress 10k entries"]


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
/* udp_connect_loop CGROUP_PROCS N PORT: joins the cgroup, times N connect() calls, then one
 * connect to 198.51.100.7:9, which no rule allows, and prints its errno (EPERM when the
 * programs enforce: the proof they were in force). */
/* Thread CPU time: the hook runs in the calling thread, and preemption by other load is excluded. */
static double now(void) { struct timespec t; if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)) { perror("clock_gettime"); exit(3); } return t.tv_sec + t.tv_nsec / 1e9; }
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
    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(9)};
    inet_pton(AF_INET, "198.51.100.7", &d.sin_addr);
    int denied = connect(socket(AF_INET, SOCK_DGRAM, 0), (struct sockaddr *)&d, sizeof(d)) ? errno : 0;
    printf("connects=%ld failed=%ld last_errno=%ld seconds=%.6f denied_errno=%d\n", n, failed, last,
           t1 - t0, denied);
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
            f"/20-/32 in 198.18.0.0/15 plus the rule allowing the peer. Added ns = median(case) - "
            f"median(none). Each run must have made N successful connects, and a connect no rule "
            f"allows must be refused with EPERM under the programs (and not without), or the "
            f"benchmark fails.")


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


def run_case(loop: str, port: int, n: int, rules) -> float:
    """ns per connect() in a fresh cgroup, with ``rules`` enforced (None: no programs)."""
    import subprocess
    prog = None
    with Cgroup("egress") as cg:
        try:
            if rules is not None:
                from enforcer.egress import EgressProgram
                prog = EgressProgram.load("bench/Unit/egress/main", pin_dir=None)
                prog.write_policy(rules, "enforce", grace=0)
                prog.attach(str(cg.path))
            out = subprocess.run([loop, str(cg.procs), str(n), str(port)], capture_output=True,
                                 text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"connect loop exited {out.returncode}: {out.stderr.strip()[-300:]}")
            kv = parse_kv(out.stdout.strip().splitlines()[-1])
            if kv.get("failed", 0) or kv.get("connects") != n:
                raise RuntimeError(f"{int(kv['failed'])} of {n} connects failed (last errno "
                                   f"{int(kv['last_errno'])})")
            # the case measured the programs only if they were in force: a connect no rule allows
            # is refused with EPERM under them, and not refused without
            if (kv.get("denied_errno") == errno.EPERM) != (rules is not None):
                raise RuntimeError(f"the unallowed connect got errno {int(kv.get('denied_errno', -1))}: "
                                   f"the egress programs were {'not ' if rules is not None else ''}in force")
            return kv["seconds"] / kv["connects"] * 1e9
        finally:
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
        rule_sets = {"none": None, "egress 1 entry": [allow], "egress 10k entries": big + [allow]}
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
        rows.append({"case": c, "entries": 0 if c == "none" else len(rule_sets[c]),
                     "ns per connect": round(s["median"], 1), "spread": round(s["spread"] or 0, 3),
                     "ns added": round(s["median"] - base, 1)})
    added_10k = stats["egress 10k entries"]["median"] - base
    return {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {"egress 10k / none": ratio(stats["egress 10k entries"]["median"], base),
                   "egress 1 / none": ratio(stats["egress 1 entry"]["median"], base),
                   "ns added per connect (10k entries)": added_10k},
        "targets": TARGETS,
    }
