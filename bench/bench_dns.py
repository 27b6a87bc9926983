"""Names in the kernel: what the DNS substrate costs.

A minimal UDP DNS responder (``bench/progs/dns_responder.c``, outside the measured cgroup, on
127.0.3.53:53) answers ``n<N>.bench.test`` with one A record 10.80.<N/256>.<N%256>, TTL 300. A C
client (``bench/progs/dns_client.c``) joins a fresh cgroup v2, pinned to the last CPU, and:

1. **answer latency**: times round trips of one lookup (wall clock), with nothing attached;
   with ``bpf/egress.c`` on the cgroup, enforcing ``*.bench.test`` (every answer is parsed, its
   name looked up in the names trie, its address learned: the whole path an answer takes before
   the socket can read it); and with the sensor's DNS observation programs (``bpf/dns.c``) at
   the cgroup2 root as well. Each case's slot runs the client bare and then with the case, in
   one fresh cgroup, keeping the fastest run of each; added ns per answer = case - bare.
2. **connect with 1,000 learned names**: looks up 1,000 names (1,000 learned addresses in the
   cgroup), then times 1,000,000 ``connect()`` calls of a UDP socket to one of them (thread CPU
   time), against no programs and against the same destination allowed by a static address
   rule: the learned path is the static lookup's miss plus one hash lookup.
3. **10,000 fresh lookups, each followed at once by a connect**: every name and every address
   is new; a connect refused with EPERM is a wrongly denied first connect (goal 0).
4. **syscall path**: ``bench/progs/getppid_loop.c`` bare, under the empty raw tracepoint (the
   floor), under the sensor, and under the sensor with the DNS extension, interleaved in one run
   (the DNS programs are cgroup skb hooks: they should cost a syscall nothing).

Each case checks what it measured: lookups answered, connects made and allowed, learned entries
counted in the kernel, getppid calls counted by the sensor.
"""

from __future__ import annotations

import functools
import random
import subprocess

from . import Cgroup, cgroup_bpf_missing, build_programs, parse_kv, progress, quartiles, ratio, summarize, unavailable

TITLE = "Names (DNS) in the kernel: answer latency, learned connects, fresh lookups, syscall path"
TARGETS = {"wrongly denied first connects": "== 0",
           "syscall: sensor+dns added / floor added": "<= 1.10"}
RESOLVER = "127.0.3.53"


def params(quick: bool) -> dict:
    if quick:
        return {"repeats": 3, "rtt_n": 3000, "rtt_runs": 2, "names": 1000, "connects": 300_000, "fresh": 10_000,
                "syscall_repeats": 3, "syscall_runs": 3, "syscall_n": 1_000_000}
    return {"repeats": 7, "rtt_n": 10000, "rtt_runs": 3, "names": 1000, "connects": 1_000_000, "fresh": 10_000,
            "syscall_repeats": 7, "syscall_runs": 5, "syscall_n": 1_000_000}


def method(quick: bool) -> str:
    p = params(quick)
    return (f"A UDP DNS responder outside the measured cgroup answers `n<N>.bench.test` with one A "
            f"record, TTL 300; a C client in a fresh cgroup, pinned to the last CPU: (1) {p['rtt_n']:,} "
            f"lookups of one name, wall ns per round trip, each case's slot first bare then with the "
            f"case, fastest of {p['rtt_runs']} runs each, added = case - bare: with bpf/egress.c "
            f"enforcing `*.bench.test` (each answer parsed, matched, learned) / with the sensor's DNS "
            f"observation programs at the cgroup2 root too (400 lookups: what their ring holds undrained); (2) {p['names']:,} lookups, then "
            f"{p['connects']:,} UDP connect() calls to one learned address (thread CPU time), against "
            f"no programs and a static address rule; (3) {p['fresh']:,} lookups of new names with new "
            f"addresses, each followed at once by a connect: EPERM counts as wrongly denied; (4) the "
            f"getppid loop bare / empty raw tracepoint / sensor / sensor + DNS extension, "
            f"{p['syscall_repeats']} interleaved repeats, best of {p['syscall_runs']} runs each. Cases "
            f"(1) and (2) interleaved over {p['repeats']} repeats; medians, min-max spread.")


class Responder:
    def __init__(self, path: str):
        self.proc = subprocess.Popen([path, RESOLVER, "53", "300"], stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("dns_responder did not start (port 53 on 127.0.3.53 taken?)")

    def close(self) -> int:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return int(parse_kv(out.strip().splitlines()[-1]).get("answered", 0)) if out.strip() else 0


def egress_program(names: bool = True, static: bool = False):
    from enforcer.egress import EgressProgram
    from enforcer.names import NameRule
    from enforcer.policy import EgressRule
    rules = [EgressRule("udp", f"{RESOLVER}/32", (53,))]
    if static:
        rules.append(EgressRule("udp", "10.80.0.0/16", (443,)))
    prog = EgressProgram.load("bench/Unit/dns/main", pin_dir=None)
    prog.write_policy(rules, "enforce", grace=0,
                      names=[NameRule("*.bench.test", "udp", (443,))] if names else [])
    return prog


def observation():
    """The sensor's DNS programs alone, linked at the cgroup2 root (until closed). Their ring is
    drained only at the end: the drain is the daemon's work on another core, and a Python
    thread competing for this machine's two cores would time the scheduler, not the kernel's
    path (records past the ring's capacity are counted as lost, which costs the kernel a
    failed reservation instead of a copy: the case is a lower bound with losses shown)."""
    from sensor import kernel
    from sensor.dns import DnsObserver
    from sensor.kernel import RingReader
    loaded = kernel.load(DnsObserver().family([f"-I{kernel.BPF_DIR}"]))
    reader = RingReader()
    seen = [0]
    reader.add(loaded.maps["events"], lambda raw: seen.__setitem__(0, seen[0] + 1))

    def close() -> int:
        """Records the programs made (read, or lost with the ring full and counted)."""
        reader.drain()
        lost = kernel.Map(loaded.maps["lost"]).percpu_sum(b"\0\0\0\0")
        reader.close()
        loaded.close()
        return seen[0] + lost
    return close


def client(path: str, mode: str, cg, *args) -> dict:
    r = subprocess.run([path, mode, str(cg.procs), RESOLVER, *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"dns_client {mode} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return parse_kv(r.stdout.strip().splitlines()[-1])


def rtt_case(progs, case: str, n: int, runs: int) -> tuple[float, float]:
    """(bare, with the case) wall ns per lookup in one fresh cgroup, each the fastest of
    ``runs`` (a neighbour on this shared machine only adds time)."""
    with Cgroup("dns") as cg:
        if case == "egress + observation":
            n = min(n, 400)  # what the 1 MiB ring holds undrained (a query and an answer each)

        def once() -> float:
            kv = client(progs["dns_client"], "rtt", cg, n)
            if kv["failed"]:
                raise RuntimeError(f"{int(kv['failed'])} of {n} lookups failed")
            return kv["ns_per_lookup"]

        bare = min(once() for _ in range(runs))
        prog, obs = None, None
        try:
            prog = egress_program()
            prog.attach(str(cg.path))
            if case == "egress + observation":
                obs = observation()
            value = min(once() for _ in range(1 if obs else runs))
            if prog.dns_stats()["learned"] < n:
                raise RuntimeError(f"the answer program learned {prog.dns_stats()['learned']} of {n}")
            if obs is not None:
                made, obs = obs(), None
                if made < 2 * n:  # a query and an answer per lookup
                    raise RuntimeError("the observation programs missed DNS messages")
            return bare, value
        finally:
            if obs is not None:
                obs()
            prog.detach(str(cg.path))
            prog.close()


def learned_case(progs, case: str, names: int, connects: int) -> float:
    with Cgroup("dns") as cg:
        prog = None
        try:
            if case != "none":
                prog = egress_program(names=case == "1,000 learned names", static=case == "static rule")
                prog.attach(str(cg.path))
            kv = client(progs["dns_client"], "learn", cg, names, connects)
            if kv["lookups_failed"] or kv["failed"]:
                raise RuntimeError(f"{int(kv['lookups_failed'])} lookups and {int(kv['failed'])} "
                                   f"connects failed (errno {int(kv['last_errno'])})")
            if case == "1,000 learned names":
                n = len({e["addr"] for e in prog.learned()})
                if n != names:
                    raise RuntimeError(f"{n} addresses learned, expected {names}")
            return kv["seconds"] / kv["connects"] * 1e9
        finally:
            if prog is not None:
                prog.detach(str(cg.path))
                prog.close()


def fresh_case(progs, n: int) -> dict:
    with Cgroup("dns") as cg:
        prog = egress_program()
        try:
            prog.attach(str(cg.path))
            kv = client(progs["dns_client"], "fresh", cg, n, 443)
            kv["learned"] = prog.dns_stats()["learned"]
            return kv
        finally:
            prog.detach(str(cg.path))
            prog.close()


def syscall_cases(p: dict) -> tuple[dict, dict, list[str]]:
    from sensor.dns import DnsObserver
    from sensor.probes import Sensor

    from .bench_syscall import Floor, SensorCase, best_of_runs
    progs = build_programs(["getppid_loop"])
    loop = progs["getppid_loop"]
    cases = {"floor": Floor(), "sensor": SensorCase(), "sensor+dns": SensorCase()}
    cases["sensor+dns"].Sensor = functools.partial(Sensor, extensions=[DnsObserver()])
    added: dict[str, list[float]] = {c: [] for c in cases}
    checks: list[str] = []
    rng = random.Random(13)
    try:
        for rep in range(p["syscall_repeats"]):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                bare = best_of_runs(loop, p["syscall_n"], p["syscall_runs"])
                value, check = cases[name].measure(loop, p["syscall_n"], p["syscall_runs"])
                added[name].append(value - bare)
                if rep == 0:
                    checks.append(f"{name}: {check}")
                progress(f"syscall repeat {rep + 1}: {name} +{value - bare:.1f} ns")
    finally:
        for c in cases.values():
            c.close()
        progs.cleanup()
    return {c: summarize(v) for c, v in added.items()}, added, checks


def run(quick: bool = False) -> dict:
    missing = cgroup_bpf_missing()
    if missing:
        return unavailable(TITLE, method(quick), missing, TARGETS)
    p = params(quick)
    progs = build_programs(["dns_responder", "dns_client"])
    responder = Responder(progs["dns_responder"])
    rows, notes = [], []
    try:
        rtt_cases = ["egress (names enforced)", "egress + observation"]
        learn_cases = ["none", "static rule", "1,000 learned names"]
        rtt = {c: [] for c in rtt_cases}
        rtt_bare: list[float] = []
        learn = {c: [] for c in learn_cases}
        for rep in range(p["repeats"]):
            for c in rtt_cases:
                bare, value = rtt_case(progs, c, p["rtt_n"], p["rtt_runs"])
                rtt_bare.append(bare)
                rtt[c].append(value - bare)
                progress(f"repeat {rep + 1}: answer latency, {c}: {value:.0f} ns per lookup, "
                         f"{value - bare:+.0f} on the bare runs before it")
            for c in learn_cases:
                learn[c].append(learned_case(progs, c, p["names"], p["connects"]))
                progress(f"repeat {rep + 1}: connect, {c}: {learn[c][-1]:.1f} ns")
        fresh = fresh_case(progs, p["fresh"])
        progress(f"fresh lookups: {fresh}")
        sys_stats, sys_added, checks = syscall_cases(p)
    finally:
        answered = responder.close()
        progs.cleanup()
    notes.append(f"the responder answered {answered:,} queries")
    notes += checks
    rs = {c: summarize(v) for c, v in rtt.items()}
    base = summarize(rtt_bare)["median"]
    rows.append({"case": "answer round trip: nothing", "ns": round(base, 1), "spread": None,
                 "ns added": 0.0})
    for c in rtt_cases:
        st = rs[c]
        rows.append({"case": f"answer round trip: {c}", "ns": round(base + st["median"], 1),
                     "spread": [round(st["min"], 1), round(st["max"], 1)],
                     "ns added": round(st["median"], 1)})
    ls = {c: summarize(v) for c, v in learn.items()}
    lbase = ls["none"]["median"]
    for c in learn_cases:
        s = ls[c]
        rows.append({"case": f"connect: {c}", "ns": round(s["median"], 1),
                     "spread": round(s["spread"] or 0, 3), "ns added": round(s["median"] - lbase, 1)})
    if fresh["lookups_failed"] or fresh["connects_ok"] + fresh["connects_failed"] != p["fresh"]:
        raise RuntimeError(f"fresh lookups measured the wrong thing: {fresh}")
    rows.append({"case": f"{p['fresh']:,} fresh lookups + connect", "ns": None, "spread": None,
                 "ns added": None, "connects allowed": int(fresh["connects_ok"]),
                 "wrongly denied": int(fresh["eperm"]), "addresses learned": int(fresh["learned"])})
    for c in ("floor", "sensor", "sensor+dns"):
        s = sys_stats[c]
        rows.append({"case": f"getppid: {c}", "ns": None, "spread": round(s["spread"] or 0, 3),
                     "ns added": round(s["median"], 1)})

    def added_ratio(num: str) -> dict | None:
        v = ratio(sys_stats[num]["median"], sys_stats["floor"]["median"])
        per = [ratio(x, y) for x, y in zip(sys_added[num], sys_added["floor"]) if y]
        return None if v is None else {"value": v, "range": quartiles(per), "range_kind": "IQR"}

    return {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {
            "ns an answer gains (names enforced)": rs["egress (names enforced)"]["median"],
            "ns an answer gains (enforced + observed)": rs["egress + observation"]["median"],
            "ns added per connect, learned name": ls["1,000 learned names"]["median"] - lbase,
            "ns added per connect, static rule": ls["static rule"]["median"] - lbase,
            "wrongly denied first connects": int(fresh["eperm"]),
            "syscall: sensor+dns added / floor added": added_ratio("sensor+dns"),
            "syscall: sensor added / floor added": added_ratio("sensor"),
            "syscall: sensor+dns added / sensor added": ratio(sys_stats["sensor+dns"]["median"],
                                                              sys_stats["sensor"]["median"]),
        },
        "targets": TARGETS,
        "notes": notes,
        "params": p,
        **({"errors": [f"the answer program measured no cost ({rs['egress (names enforced)']['median']:.0f} "
                       f"ns): noise exceeded the effect; rerun on a quieter machine"]}
           if rs["egress (names enforced)"]["median"] <= 0 else {}),
    }
