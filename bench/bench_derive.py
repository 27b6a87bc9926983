"""Derivation time for a large profile: 1,000 behaviours observed over 10,000 sessions.

The profile is built directly from its parts (two node contributions, 5,000 closed sessions
each, every behaviour present on both nodes so the merge does real work), with a realistic mix:
syscalls including syscall-group members, egress spread over IPv4 /24s and IPv6 /64s with a
few port-heavy networks, and exec paths in directories with and without many siblings. A tail of
rare behaviours lands in review. Each closure mode is derived end to end (merge, coverage-stop,
elements, confidence, provenance, review, validity, and for probabilistic the detection rules)
and the YAML dump is timed separately. No wall-clock threshold lives in the tests; the target is
only reported here.
"""

from __future__ import annotations

import random
import time

from enforcer import syscall_groups
from enforcer.derive import DeriveOptions, derive
from enforcer.policy import dump_policy
from sensor.profile import BehaviourStats, NodeContribution, Profile, SessionRecord
from sensor.workload import Workload

from . import Checks, progress, summarize

TITLE = "Policy derivation (1,000 behaviours x 10,000 sessions)"
TARGETS = {"derive structural, median s": "< 0.5"}
T0 = 1_767_225_600.0
DAY = 86400.0


def params(quick: bool) -> dict:
    return {"repeats": 3 if quick else 9, "behaviours": 1000, "sessions": 10_000, "nodes": 2}


def method(quick: bool) -> str:
    p = params(quick)
    return (
        f"`enforcer.derive.derive` on a synthetic profile of {p['behaviours']:,} behaviours "
        f"(300 syscalls, 550 egress destinations, 150 exec paths) over {p['sessions']:,} closed "
        f"sessions on {p['nodes']} nodes spanning 14 days, timed with `time.perf_counter` from the "
        f"profile object to the finished `Policy` (the merge of node contributions included); the "
        f"YAML dump is timed on its own. {p['repeats']} repeats per case, median with min-max. "
        f"Seeded, so every run derives the same policy."
    )


def behaviour_keys(n: int, rng: random.Random) -> list[str]:
    real = sorted(syscall_groups.GROUP_OF) + ["read", "write", "close", "mmap", "munmap", "brk", "futex",
                                          "rt_sigaction", "rt_sigprocmask", "getpid", "ioctl", "madvise"]
    syscalls = [f"syscall:{s}" for s in real]
    syscalls += [f"syscall:sys_{i}" for i in range(300 - len(syscalls))]
    egress = []
    for i in range(400):
        egress.append(f"connect:tcp:10.{i % 8}.{i % 40}.{1 + i % 200}:{[443, 80, 8443][i % 3]}")
    for i in range(60):
        egress.append(f"connect:tcp:172.16.9.{1 + i % 5}:{9000 + i}")  # port-heavy network: a range
    for i in range(90):
        egress.append(f"send:udp:[fd00:{i % 6:x}::{1 + i:x}]:53")
    execs = [f"exec:/usr/lib/tool{i % 30}/bin{i}" for i in range(120)] + [f"exec:/usr/bin/cmd{i}" for i in range(30)]
    keys = sorted(set(syscalls + egress + execs))
    rng.shuffle(keys)
    return sorted(keys[:n])


def build_profile(behaviours: int = 1000, sessions: int = 10_000, nodes: int = 2, seed: int = 7) -> Profile:
    rng = random.Random(seed)
    p = Profile(Workload("bench", "Deployment", "agent", "main"))
    keys = behaviour_keys(behaviours, rng)
    per_node = sessions // nodes
    span = 14 * DAY
    rare_keys = set(rng.sample(keys, len(keys) // 20))  # 5%: one or two sessions on one node
    for ni in range(nodes):
        c = NodeContribution(f"node-{ni}")
        for si in range(per_node):
            start = T0 + span * (si * nodes + ni) / sessions
            c.sessions[f"n{ni}-s{si}"] = SessionRecord(f"n{ni}-s{si}", start, start + 60.0, {})
        c.closed_sessions = per_node
        c.window_start = T0
        for k in keys:
            rare = k in rare_keys
            if rare and ni > 0:
                continue
            n_sess = rng.randint(1, 2) if rare else rng.randint(3, per_node)
            per = rng.randint(1, 2) if rare else rng.randint(1, 20)
            first = T0 + rng.random() * (span * 0.5)  # everything new in the first half: coverage reached
            c.behaviours[k] = BehaviourStats(n_sess * per, n_sess, first, first + rng.random() * span * 0.5,
                                             float(n_sess * per), float(n_sess * per * per))
        c.generation = 1
        c.updated = T0 + span
        p.nodes[c.node] = c
    return p


def _time(fn, repeats: int) -> tuple[dict, object]:
    out, vals = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        vals.append(time.perf_counter() - t)
    return summarize(vals), out


def run(quick: bool = False) -> dict:
    prm = params(quick)
    progress(f"derive: building a profile of {prm['behaviours']} behaviours x {prm['sessions']} sessions")
    profile = build_profile(prm["behaviours"], prm["sessions"], prm["nodes"])
    assert len(profile.behaviours()) == prm["behaviours"] and profile.session_count == prm["sessions"]
    rows = []
    checks = Checks()
    for closure in ("literal", "structural", "probabilistic"):
        opts = DeriveOptions(closure=closure)
        s, policy = _time(lambda: derive(profile, opts), prm["repeats"])
        d, text = _time(lambda: dump_policy(policy), max(1, prm["repeats"] // 3))
        checks.require(closure, dump_policy(derive(profile, opts)) == text, "deterministic")
        # a derivation that refused or admitted nothing was fast for the wrong reason
        checks.require(closure, len(policy.entries()) > 0 and len(policy.review) > 0,
                       f"{len(policy.entries())} entries allowed, {len(policy.review)} in review")
        if closure == "probabilistic":
            checks.require(closure, len(policy.detection) > 0,
                           f"{len(policy.detection)} detection rules")
        progress(f"derive: {closure} median {s['median']:.3f} s")
        rows.append({
            "case": closure,
            "derive_s": round(s["median"], 4),
            "derive_min_s": round(s["min"], 4),
            "derive_max_s": round(s["max"], 4),
            "dump_yaml_s": round(d["median"], 4),
            "allowed_entries": len(policy.entries()),
            "review": len(policy.review),
            "detection_rules": len(policy.detection),
            "policy_bytes": len(text.encode()),
            "check": checks.summary(closure),
        })
    structural = next(r for r in rows if r["case"] == "structural")
    return {
        "title": TITLE,
        "method": method(quick),
        "rows": rows,
        "ratios": {"derive structural, median s": checks.ratio(structural["derive_s"], "structural")},
        "targets": TARGETS,
        **checks.fields(),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(quick=True), indent=2))
