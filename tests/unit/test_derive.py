"""Derivation, one decision at a time, plus validity, replay and diff."""

from __future__ import annotations

import math

import pytest

from enforcer.derive import CoverageNotReached, DeriveError, DeriveOptions, derive
from enforcer.diff import diff
from enforcer.policy import EgressRule, dump_policy, parse_policy
from enforcer.replay import replay
from enforcer.validity import check
from sensor.profile import BehaviourStats, Profile
from sensor.workload import Workload
from envelope.errors import UserError
from envelope.options import duration, pairs, thresholds

W = Workload("research", "Deployment", "agent", "main")
T0 = 1_767_225_600.0
DAY = 86400.0


def build(sessions, *, end_after_days: float = 2.0, fingerprints=None, nodes=("n1",)) -> Profile:
    """``sessions``: list of {key: count}; session i starts on day i, on node i % len(nodes)."""
    p = Profile(W)
    for i, b in enumerate(sessions):
        node = p.node(nodes[i % len(nodes)])
        start = T0 + i * DAY
        node.open_session(f"s{i}", start)
        for j, (k, c) in enumerate(sorted(b.items())):
            node.observe(f"s{i}", k, c, start + 1 + j)
        node.close_session(f"s{i}", start + 3600)
    last = T0 + (len(sessions) - 1) * DAY + end_after_days * DAY
    for name in nodes:
        n = p.node(name)
        for k, v in (fingerprints or {}).items():
            n.add_fingerprint(k, v, T0)
        n.touch(last)
    return p


def steady(extra=None, n=4):
    """n identical sessions (so every behaviour clears 5 over 3) plus optional extras in session 0."""
    base = {"syscall:read": 10, "syscall:openat": 3, "exec:/usr/bin/git": 2, "connect:tcp:10.0.3.7:443": 2}
    out = [dict(base) for _ in range(n)]
    for k, v in (extra or {}).items():
        out[0][k] = v
    return out


# ---- granularity -----------------------------------------------------------------------------

def test_granularity_records_and_respects_substrates():
    p = build(steady({"exec:/usr/bin/curl": 1}))
    pol = derive(p, DeriveOptions(substrates=("syscall", "egress")))
    assert pol.substrates == ("syscall", "egress")
    gran = dict(pol.decisions["granularity"])
    spots = gran.pop("blindSpots")  # the steady profile connects to addresses and resolves nothing
    assert [s.split(":", 1)[0] for s in spots["egress"]] == ["address-without-answer"]
    assert gran == {"substrates": ["syscall", "egress"], "excluded": ["exec", "file", "http", "mcp", "iam",
                                                                    "capability"]}
    assert pol.execs == () and not any(r["substrate"] == "exec" for r in pol.review)
    assert pol.allows("exec:/usr/bin/anything"), "a substrate left out is not constrained"
    assert pol.syscalls and pol.egress


def test_unknown_substrate_and_closure_are_errors():
    p = build(steady())
    with pytest.raises(DeriveError, match="unknown closure 'fuzzy'"):
        derive(p, DeriveOptions(closure="fuzzy"))
    with pytest.raises(DeriveError, match="unknown substrate 'dns'"):
        derive(p, DeriveOptions(substrates=("dns",)))


# ---- closure ---------------------------------------------------------------------------------

def test_literal_closure_is_the_observed_set():
    p = build(steady())
    pol = derive(p, DeriveOptions(closure="literal"))
    assert pol.syscalls == ("openat", "read")
    assert pol.egress == (EgressRule("tcp", "10.0.3.7/32", (443,)),)
    assert pol.execs == ("/usr/bin/git",)
    assert all(pr["rule"] == "literal" for pr in pol.provenance)
    assert not pol.allows("connect:tcp:10.0.3.8:443") and not pol.allows("syscall:open")


def test_literal_merges_connect_and_send_of_one_destination():
    sessions = [{"send:udp:10.96.0.10:53": 1, "connect:udp:10.96.0.10:53": 1} for _ in range(3)]
    pol = derive(build(sessions), DeriveOptions(closure="literal", min_count={"syscall": 5, "egress": 6, "exec": 5, "capability": 5}))
    assert pol.egress == (EgressRule("udp", "10.96.0.10/32", (53,)),)
    prov = pol.provenance[0]
    assert prov["evidence"]["count"] == 6 and len(prov["evidence"]["behaviours"]) == 2


def test_structural_cidr_aggregation_v4_v6_and_configurable_prefix():
    sessions = [{f"connect:tcp:10.0.3.{i + 1}:443": 2, f"connect:tcp:[fd00:1::{i + 1}]:8443": 2} for i in range(4)]
    opts = DeriveOptions(min_count={s: 1 for s in ("syscall", "egress", "exec", "capability")},
                         min_sessions={s: 1 for s in ("syscall", "egress", "exec", "capability")})
    pol = derive(build(sessions), opts)
    assert EgressRule("tcp", "10.0.3.0/24", (443,)) in pol.egress
    assert EgressRule("tcp", "fd00:1::/64", (8443,)) in pol.egress
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["egress:tcp:10.0.3.0/24:443"]["rule"] == "cidr-prefix+exact-ports"
    assert "aggregated to 10.0.3.0/24" in prov["egress:tcp:10.0.3.0/24:443"]["detail"]
    assert pol.decisions["closure"]["rules"]["egress"]["address"]["ipv4Prefix"] == 24
    pol28 = derive(build(sessions), DeriveOptions(**{**opts.__dict__, "ipv4_prefix": 28, "ipv6_prefix": 120}))
    assert EgressRule("tcp", "10.0.3.0/28", (443,)) in pol28.egress
    assert EgressRule("tcp", "fd00:1::/120", (8443,)) in pol28.egress


def test_known_service_cidr_wins_and_overlaps_are_rejected():
    sessions = [{"send:udp:10.96.0.10:53": 2, "connect:tcp:10.96.14.2:443": 2} for _ in range(3)]
    pol = derive(build(sessions), DeriveOptions(service_cidrs=("10.96.0.0/12",)))
    # the resolver (port 53) stays one exact address even inside a known service CIDR
    assert pol.egress == (EgressRule("tcp", "10.96.0.0/12", (443,)), EgressRule("udp", "10.96.0.10/32", (53,)))
    rules = {p["entry"]: p["rule"] for p in pol.provenance if p["substrate"] == "egress"}
    assert rules == {"egress:tcp:10.96.0.0/12:443": "service-cidr+exact-ports",
                     "egress:udp:10.96.0.10/32:53": "dns-resolver"}
    with pytest.raises(DeriveError, match="overlap"):
        derive(build(sessions), DeriveOptions(service_cidrs=("10.96.0.0/12", "10.96.0.0/16")))
    with pytest.raises(DeriveError, match="not a CIDR"):
        derive(build(sessions), DeriveOptions(service_cidrs=("10.96.0.0/40",)))


def test_ports_stay_exact_until_more_than_k_then_a_flagged_range():
    ports = [8000, 8001, 8002, 8003, 8080]
    sessions = [{f"connect:tcp:172.16.5.20:{port}": 2 for port in ports} for _ in range(3)]
    pol = derive(build(sessions), DeriveOptions(max_ports=4))
    assert pol.egress == (EgressRule("tcp", "172.16.5.0/24", (), (8000, 8080)),)
    prov = pol.provenance[0]
    assert prov["rule"] == "cidr-prefix+port-range" and prov["flags"] == ["port-range"]
    assert pol.decisions["closure"]["flagged"] == ["egress:tcp:172.16.5.0/24:8000-8080"]
    exact = derive(build(sessions), DeriveOptions(max_ports=5))
    assert exact.egress == (EgressRule("tcp", "172.16.5.0/24", tuple(ports)),)
    assert not exact.allows("connect:tcp:172.16.5.20:8050") and pol.allows("connect:tcp:172.16.5.20:8050")


def test_exec_siblings_collapse_to_a_directory_pattern():
    tools = ["fetch", "remote-https", "index-pack", "rev-list"]
    sessions = [{f"exec:/usr/lib/git-core/git-{t}": 2 for t in tools} | {"exec:/usr/bin/git": 2} for _ in range(3)]
    pol = derive(build(sessions), DeriveOptions(max_siblings=3))
    assert pol.execs == ("/usr/bin/git", "/usr/lib/git-core/*")
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["exec:/usr/lib/git-core/*"]["rule"] == "directory-pattern"
    assert len(prov["exec:/usr/lib/git-core/*"]["evidence"]["behaviours"]) == 4
    assert derive(build(sessions), DeriveOptions(max_siblings=4)).execs == tuple(
        sorted(["/usr/bin/git"] + [f"/usr/lib/git-core/git-{t}" for t in tools]))


def test_syscall_groups_admit_what_does_the_same_thing_and_are_listed():
    pol = derive(build(steady()))
    assert {"open", "openat", "openat2", "creat"} <= set(pol.syscalls)
    groups = pol.decisions["closure"]["syscallGroups"]
    assert [g["name"] for g in groups] == ["file-open", "file-read"]
    assert all(g["reason"] for g in groups)
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["syscall:openat2"]["rule"] == "syscall-group:file-open"
    assert prov["syscall:openat2"]["observed"] is False and prov["syscall:openat"]["observed"] is True
    assert prov["syscall:openat2"]["evidence"]["behaviours"] == ["syscall:openat"]
    assert {"read", "readv", "pread64"} <= set(pol.syscalls)
    # reading never admits writing, and nothing widens into another kind of access
    assert "write" not in pol.syscalls and "ftruncate" not in pol.syscalls


def test_dangerous_syscalls_are_never_admitted_by_association():
    # ptrace observed everywhere is allowed on its own evidence, flagged; nothing drags in its kin
    sessions = [{"syscall:read": 3, "syscall:ptrace": 2, "syscall:mount": 1} for _ in range(4)]
    pol = derive(build(sessions))
    assert "ptrace" in pol.syscalls and "mount" in pol.syscalls
    for name in ("process_vm_readv", "process_vm_writev", "umount2", "unshare", "setns", "bpf"):
        assert name not in pol.syscalls
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["syscall:ptrace"]["rule"] == "exact" and prov["syscall:ptrace"]["flags"] == ["dangerous"]
    assert "traces" in prov["syscall:ptrace"]["detail"]
    assert "syscall:ptrace" in pol.decisions["closure"]["flagged"]


def test_a_syscall_made_once_in_most_sessions_is_part_of_the_baseline():
    # a child reaper: wait4 once in each of 4 of 6 sessions (count 4, under the old 5-over-3 rule)
    sessions = [{"syscall:read": 40} | ({"syscall:wait4": 1} if i < 4 else {}) for i in range(6)]
    pol = derive(build(sessions))
    assert {"wait4", "waitid"} <= set(pol.syscalls)
    assert pol.decisions["confidence"]["minCount"]["syscall"] == 1
    # seen in two sessions only: in review, and let through and reported when it recurs
    rare = [{"syscall:read": 40} | ({"syscall:wait4": 1} if i < 2 else {}) for i in range(6)]
    pol = derive(build(rare))
    [item] = pol.review
    assert item["key"] == "syscall-group:child-wait" and item["why"] == "sessions 2 < 3"
    assert item["action"] == "alert" and item["entries"] == ["syscall:wait4"]
    assert not pol.allows("syscall:wait4") and pol.admits("syscall:wait4")
    assert not pol.admits("syscall:waitid"), "review lets through what was seen, literally"
    assert "syscall:wait4" in pol.watch


def test_review_actions_per_substrate_and_dangerous_always_denied():
    extra = {"syscall:bpf": 1, "syscall:ftruncate": 1, "connect:tcp:198.51.100.7:4444": 1,
             "exec:/usr/bin/id": 1}
    pol = derive(build(steady(extra)))
    assert pol.decisions["confidence"]["reviewActions"] == {"syscall": "alert", "egress": "deny", "exec": "deny"}
    by = {r["key"]: r for r in pol.review}
    assert by["syscall:bpf"]["action"] == "deny" and "dangerous" in by["syscall:bpf"]["actionReason"]
    assert by["syscall-group:file-write"]["action"] == "alert"
    assert by["egress:tcp:198.51.100.0/24:4444"]["action"] == "deny"
    assert by["egress:tcp:198.51.100.0/24:4444"]["entries"] == ["egress:tcp:198.51.100.7/32:4444"]
    assert by["exec:/usr/bin/id"]["action"] == "deny"
    assert pol.admits("syscall:ftruncate") and not pol.admits("syscall:bpf")
    assert not pol.admits("connect:tcp:198.51.100.7:4444") and not pol.admits("exec:/usr/bin/id")
    # an operator may choose otherwise, per substrate; the dangerous syscall still never passes
    loose = derive(build(steady(extra)), DeriveOptions(review_actions={"syscall": "alert", "egress": "alert",
                                                                      "exec": "alert"}))
    assert loose.admits("connect:tcp:198.51.100.7:4444") and not loose.admits("connect:tcp:198.51.100.8:4444")
    assert loose.admits("exec:/usr/bin/id") and not loose.admits("syscall:bpf")
    strict = derive(build(steady(extra)), DeriveOptions(review_actions={"syscall": "deny"}))
    assert not strict.admits("syscall:ftruncate")
    with pytest.raises(DeriveError, match="alert is not supported for file"):
        derive(build(steady()), DeriveOptions(review_actions={"file": "alert"}))
    # a stated action survives the round trip; a policy that states none denies its review items
    again = parse_policy(dump_policy(pol))
    assert dump_policy(again) == dump_policy(pol) and again.admits("syscall:ftruncate")
    import yaml
    doc = yaml.safe_load(dump_policy(pol))
    del doc["spec"]["decisions"]["confidence"]["reviewActions"]
    legacy = parse_policy(yaml.safe_dump(doc))
    assert legacy.review_action("syscall") == "deny" and not legacy.admits("syscall:ftruncate")


def test_exec_closure_never_widens_a_system_binary_directory():
    tools = ["cat", "grep", "sed", "awk", "tr"]
    sessions = [{f"exec:/usr/bin/{t}": 2 for t in tools} | {"exec:/bin/ls": 2, "exec:/bin/ps": 2,
                                                           "exec:/bin/id": 2, "exec:/bin/df": 2}
                | {f"exec:/opt/app/bin/{t}": 2 for t in tools} for _ in range(3)]
    pol = derive(build(sessions))
    assert "/usr/bin/*" not in pol.execs and "/bin/*" not in pol.execs
    assert {f"/usr/bin/{t}" for t in tools} <= set(pol.execs)
    assert "/opt/app/bin/*" in pol.execs
    assert not pol.allows("exec:/usr/bin/sh") and not pol.allows("exec:/bin/sh")
    prov = {p["entry"]: p for p in pol.provenance}
    assert "never widened" in prov["exec:/usr/bin/cat"]["detail"]
    assert "never widened" in prov["exec:/bin/ls"]["detail"]
    assert "/usr/bin" in pol.decisions["closure"]["rules"]["exec"]["neverWidened"]


def test_every_widening_names_its_rule_and_evidence():
    pol = derive(build(steady()))
    for p in pol.provenance:
        assert p["rule"] and p["evidence"]["behaviours"] and p["evidence"]["count"] > 0
        assert p["evidence"]["firstSeen"] and p["evidence"]["lastSeen"]


def test_probabilistic_adds_rate_distribution_as_detection_only():
    sessions = [{"syscall:read": c, "syscall:write": 5} for c in (2, 4, 6, 8)]
    p = build(sessions)
    pol = derive(p, DeriveOptions(closure="probabilistic", k=2.5))
    structural = derive(p, DeriveOptions(closure="structural"))
    assert pol.syscalls == structural.syscalls and pol.egress == structural.egress
    det = {d["key"]: d for d in pol.detection}
    mean, std, n = p.rate("syscall:read")
    assert det["syscall:read"] == {"key": "syscall:read", "mean": round(mean, 6), "std": round(std, 6),
                                   "k": 2.5, "sessions": 4}
    assert math.isclose(det["syscall:read"]["mean"], 5.0) and math.isclose(det["syscall:read"]["std"], math.sqrt(5), rel_tol=1e-6)
    assert det["syscall:write"]["std"] == 0.0
    assert pol.decisions["closure"]["detection"]["k"] == 2.5
    assert structural.detection == ()


# ---- confidence ------------------------------------------------------------------------------

def test_threshold_n_over_m_with_per_substrate_overrides():
    sessions = [{"syscall:read": 5, "connect:tcp:10.0.0.1:443": 1} for _ in range(2)]
    pol = derive(build(sessions))
    assert pol.syscalls == () and pol.egress == ()
    assert {r["key"] for r in pol.review} == {"syscall-group:file-read", "egress:tcp:10.0.0.0/24:443"}
    relaxed = derive(build(sessions), DeriveOptions(
        min_count=thresholds(["5", "egress=2"], 5, "--min-count"),
        min_sessions=thresholds(["2"], 3, "--min-sessions")))
    assert "read" in relaxed.syscalls and relaxed.egress == (EgressRule("tcp", "10.0.0.0/24", (443,)),)
    assert relaxed.decisions["confidence"]["minCount"] == {"syscall": 5, "egress": 2, "exec": 5}


def test_envelope_element_counts_the_union_of_its_behaviours_sessions():
    # six addresses in one /24, each seen in one session only, three times
    sessions = [{f"connect:tcp:10.0.3.{i}:443": 3} for i in range(1, 7)]
    pol = derive(build(sessions))
    # the default rule unions the session ids: the element earns its envelope with 6 sessions
    assert pol.egress == (EgressRule("tcp", "10.0.3.0/24", (443,)),)
    assert pol.provenance[0]["evidence"]["count"] == 18
    assert pol.provenance[0]["evidence"]["sessions"] == 6
    assert pol.decisions["confidence"]["sessionRule"]["rule"] == "union"
    assert pol.review == ()
    # the same address seen in the same sessions is not counted twice
    shared = [{"connect:tcp:10.0.3.1:443": 3, "connect:tcp:10.0.3.2:443": 3} for _ in range(2)]
    [item] = derive(build(shared)).review
    assert item["evidence"]["sessions"] == 2 and item["why"] == "sessions 2 < 3"
    # the max rule is a lower bound: varying values each seen once cannot earn their envelope
    lower = derive(build(sessions), DeriveOptions(session_rule="max"))
    [item] = lower.review
    assert item["key"] == "egress:tcp:10.0.3.0/24:443"
    assert item["evidence"]["count"] == 18 and item["evidence"]["sessions"] == 1
    assert "lower bound" in lower.decisions["confidence"]["sessionRule"]["meaning"]
    # the sum rule is an upper bound, chosen explicitly
    summed = derive(build(shared), DeriveOptions(session_rule="sum"))
    assert summed.provenance[0]["evidence"]["sessions"] == 4
    assert summed.decisions["confidence"]["sessionRule"]["rule"] == "sum"
    # literal closure judges each address alone
    assert all(r["evidence"]["count"] == 3 for r in derive(build(sessions), DeriveOptions(closure="literal")).review)


def test_below_threshold_goes_to_review_and_watch_with_evidence():
    pol = derive(build(steady({"exec:/usr/bin/curl": 1, "syscall:ptrace": 2})))
    review = {r["key"]: r for r in pol.review}
    assert set(review) == {"exec:/usr/bin/curl", "syscall:ptrace"}
    ev = review["syscall:ptrace"]["evidence"]
    assert ev["count"] == 2 and ev["sessions"] == 1 and ev["firstSeen"] == ev["lastSeen"]
    assert review["syscall:ptrace"]["threshold"] == {"minCount": 1, "minSessions": 3}
    assert pol.watch == ("exec:/usr/bin/curl", "syscall:ptrace")
    assert not pol.allows("syscall:ptrace") and not pol.allows("exec:/usr/bin/curl")


def test_admit_by_entry_or_behaviour_is_recorded_in_provenance():
    p = build(steady({"exec:/usr/bin/curl": 1, "connect:tcp:203.0.113.5:4444": 1, "connect:tcp:203.0.113.6:4444": 1}))
    pol = derive(p, DeriveOptions(admits=(("exec:/usr/bin/curl", "fetches release notes; ticket SEC-12"),
                                          ("connect:tcp:203.0.113.5:4444", "vendor callback"))))
    assert "/usr/bin/curl" in pol.execs
    prov = {x["entry"]: x for x in pol.provenance}
    assert prov["exec:/usr/bin/curl"]["admitted"] == "admit"
    assert prov["exec:/usr/bin/curl"]["reason"] == "fetches release notes; ticket SEC-12"
    # a behaviour inside a reviewed envelope element is admitted literally, the rest stays in review
    assert EgressRule("tcp", "203.0.113.5/32", (4444,)) in pol.egress
    assert prov["egress:tcp:203.0.113.5/32:4444"]["reason"] == "vendor callback"
    [rest] = [r for r in pol.review if r["key"] == "egress:tcp:203.0.113.0/24:4444"]
    assert rest["evidence"]["behaviours"] == ["connect:tcp:203.0.113.6:4444"]
    assert pol.watch == ("connect:tcp:203.0.113.6:4444",)
    assert pol.decisions["confidence"]["admits"] == 2
    # the whole envelope element can be admitted by its entry key
    whole = derive(p, DeriveOptions(admits=(("egress:tcp:203.0.113.0/24:4444", "vendor range"),)))
    assert EgressRule("tcp", "203.0.113.0/24", (4444,)) in whole.egress


def test_io_uring_setup_is_admitted_only_explicitly():
    """Seen in every session, still not allowed: the ring runs syscalls out of seccomp's sight."""
    sessions = [dict(s, **{"syscall:io_uring_setup": 2, "syscall:io_uring_enter": 9}) for s in steady()]
    pol = derive(build(sessions))
    assert "io_uring_setup" not in pol.syscalls and "io_uring_enter" in pol.syscalls
    [item] = [r for r in pol.review if "syscall:io_uring_setup" in r["evidence"]["behaviours"]]
    assert "io_uring" in item["why"] and item["evidence"]["count"] == 8
    assert "syscall:io_uring_setup" in pol.watch
    admitted = derive(build(sessions), DeriveOptions(admits=(("syscall:io_uring_setup", "async I/O; SEC-7"),)))
    assert "io_uring_setup" in admitted.syscalls
    prov = {x["entry"]: x for x in admitted.provenance}
    assert prov["syscall:io_uring_setup"]["reason"] == "async I/O; SEC-7"


def test_admit_errors():
    p = build(steady({"exec:/usr/bin/curl": 1}))
    with pytest.raises(DeriveError, match="not in the review list .*exec:/usr/bin/curl"):
        derive(p, DeriveOptions(admits=(("exec:/usr/bin/wget", "x"),)))
    with pytest.raises(DeriveError, match="already allowed"):
        derive(p, DeriveOptions(admits=(("syscall:read", "x"),)))
    with pytest.raises(DeriveError, match="a reason is required"):
        derive(p, DeriveOptions(admits=(("exec:/usr/bin/curl", " "),)))


def test_negative_thresholds_are_rejected():
    with pytest.raises(UserError, match="negative"):
        thresholds(["-1"], 5, "--min-count")
    with pytest.raises(UserError, match="unknown substrate"):
        thresholds(["dns=2"], 5, "--min-count")
    with pytest.raises(UserError, match="not an integer"):
        thresholds(["five"], 5, "--min-count")
    with pytest.raises(DeriveError, match="non-negative"):
        derive(build(steady()), DeriveOptions(min_sessions={"syscall": -2, "egress": 3, "exec": 3, "capability": 3}))


# ---- validity --------------------------------------------------------------------------------

def test_validity_fingerprint_triggers_and_expiry():
    p = build(steady(), fingerprints={"model": "m1", "image": "sha256:aa"})
    pol = derive(p, DeriveOptions(fingerprint={"identity": "sa/research", "model": "m1b"}, expires_in=14 * DAY))
    v = pol.validity
    assert v["fingerprint"] == {"identity": ["sa/research"], "image": ["sha256:aa"], "model": ["m1b"]}
    assert [t["name"] for t in v["triggers"]] == ["identity-scope-change", "image-change",
                                                 "model-version-change", "expiry"]
    assert v["derivedAt"] == "2026-01-06T00:00:00Z"  # window end, not the clock
    assert v["expiresAt"] == "2026-01-20T00:00:00Z"
    assert v["untracked"] == ["prompt_template", "tool_catalog"]

    ok = check(pol, {"model": "m1b", "image": "sha256:aa"}, now=T0)
    assert not ok["stale"]
    changed = check(pol, {"model": "m2", "tool_catalog": "sha256:t"}, now=T0)
    fired = {t["trigger"]: t for t in changed["triggers"] if t["fired"]}
    assert changed["stale"] and set(fired) == {"model-version-change", "tool-catalog-change"}
    assert "derived against 'm1b', now 'm2'" in fired["model-version-change"]["reason"]
    expired = check(pol, {}, now=T0 + 30 * DAY)
    assert expired["stale"] and [t["trigger"] for t in expired["triggers"] if t["fired"]] == ["expiry"]


def test_parsers():
    assert duration("14d", "--expires-in") == 14 * DAY and duration("1h30m", "--expires-in") == 5400
    with pytest.raises(UserError, match="^--expires-in: 'soon' is not a duration"):
        duration("soon", "--expires-in")
    assert pairs(["model=v1", "image=sha256:x=y"], "--fingerprint") == {"model": "v1", "image": "sha256:x=y"}
    with pytest.raises(UserError):
        pairs(["model"], "--fingerprint")


# ---- coverage-stop ---------------------------------------------------------------------------

def test_coverage_stop_refuses_a_growing_profile_and_says_how_far_off():
    sessions = steady(n=4)
    sessions[-1]["exec:/usr/bin/gcc"] = 1
    sessions[-1]["syscall:memfd_create"] = 1
    p = build(sessions, end_after_days=0.25)  # window ends 6 h after the last session started
    with pytest.raises(CoverageNotReached) as e:
        derive(p)
    msg = str(e.value)
    assert "1 new syscall, 1 new exec behaviours in the last 24 h" in msg
    assert "needs at least 18" in msg and "--force" in msg and "\n" not in msg
    assert e.value.coverage["newBehaviours"] == {"syscall": 1, "egress": 0, "exec": 1}
    assert 17.9 < e.value.coverage["remainingHours"]["exec"] < 18.1
    forced = derive(p, DeriveOptions(force=True))
    assert forced.low_confidence and forced.mode == "alert"
    assert forced.decisions["confidence"]["coverage"]["forced"] is True
    assert forced.to_dict()["spec"]["decisions"]["confidence"]["lowConfidence"] is True
    # a looser threshold lets it through without force
    assert not derive(p, DeriveOptions(coverage_threshold=2)).low_confidence


def test_coverage_stop_counts_only_selected_substrates():
    sessions = steady(n=4)
    sessions[-1]["exec:/usr/bin/gcc"] = 1
    p = build(sessions, end_after_days=0.25)
    assert not derive(p, DeriveOptions(substrates=("syscall", "egress"))).low_confidence


def test_capped_profile_is_not_covered():
    p = build(steady())
    n = p.node("n1")
    n.caps = {"syscall": 2, "egress": 10, "exec": 10}
    n.open_session("late", T0 + 3 * DAY)
    n.observe("late", "syscall:ioctl", 1, T0 + 3 * DAY)
    n.close_session("late", T0 + 3 * DAY + 10)
    with pytest.raises(CoverageNotReached, match="cardinality cap"):
        derive(p)


def test_empty_profile_is_an_error():
    with pytest.raises(DeriveError, match="no behaviours"):
        derive(Profile(W))


# ---- determinism -----------------------------------------------------------------------------

def test_derivation_is_deterministic_and_independent_of_node_order():
    sessions = steady({"exec:/usr/bin/curl": 1}, n=6)
    a = build(sessions, nodes=("n1", "n2"), fingerprints={"model": "m"})
    b = Profile(W)
    for name in ("n2", "n1"):
        b.nodes[name] = a.nodes[name]
    for closure in ("literal", "structural", "probabilistic"):
        opts = DeriveOptions(closure=closure, expires_in=DAY)
        assert dump_policy(derive(a, opts)) == dump_policy(derive(b, opts)) == dump_policy(derive(a, opts))
        assert dump_policy(derive(a, opts), "json") == dump_policy(parse_policy(dump_policy(derive(a, opts))), "json")


# ---- replay and diff -------------------------------------------------------------------------

def test_replay_reports_what_would_be_denied():
    p = build(steady({"exec:/usr/bin/curl": 1}))
    pol = derive(p)
    r = replay(pol, p)
    assert [d["key"] for d in r["denied"]] == ["exec:/usr/bin/curl"]
    assert r["denied"][0]["watched"] and r["wouldBreak"] and r["deniedEvents"] == 1
    assert r["bySubstrate"]["exec"] == {"behaviours": 2, "denied": 1, "events": 9, "deniedEvents": 1}
    later = replay(pol, p, since=T0 + 1 * DAY)
    assert later["denied"] == [] and later["behaviours"] < r["behaviours"]
    other = build([{"syscall:ptrace": 1}])
    assert replay(pol, other)["denied"][0]["key"] == "syscall:ptrace"


def test_diff_says_what_changed_and_why():
    p = build(steady({"exec:/usr/bin/curl": 1}))
    literal = derive(p, DeriveOptions(closure="literal"))
    structural = derive(p)
    d = diff(literal, structural)
    added = {a["entry"]: a for a in d["added"]}
    removed = {r["entry"]: r for r in d["removed"]}
    assert "egress:tcp:10.0.3.0/24:443" in added and "syscall:openat2" in added
    assert added["syscall:openat2"]["rule"] == "syscall-group:file-open"
    assert removed["egress:tcp:10.0.3.7/32:443"]["why"] == "its evidence is covered by egress:tcp:10.0.3.0/24:443"
    assert {"decision": "closure", "old": "literal", "new": "structural"} in d["decisions"]
    assert not d["identical"] and diff(structural, structural)["identical"]

    stricter = derive(p, DeriveOptions(min_count={"syscall": 5, "egress": 5, "exec": 100, "capability": 5}))
    d2 = diff(structural, stricter)
    [gone] = d2["removed"]
    assert gone["entry"] == "exec:/usr/bin/git" and gone["why"].startswith("below threshold in the new policy")
    assert d2["watch"]["added"] == ["exec:/usr/bin/git"]
    admitted = derive(p, DeriveOptions(admits=(("exec:/usr/bin/curl", "needed"),)))
    d3 = diff(structural, admitted)
    assert d3["added"][0]["entry"] == "exec:/usr/bin/curl" and d3["added"][0]["reason"] == "needed"
    assert "in review in the old policy" in d3["added"][0]["previously"]


def test_sensor_fingerprint_keys_map_to_triggers():
    p = build(steady(), fingerprints={"service_account": "agent", "cloud_identity:aws": "arn:aws:iam::1:role/r",
                                      "pod_template_hash": "abc123", "image": "sha256:aa"})
    pol = derive(p)
    names = {t["key"]: t["name"] for t in pol.validity["triggers"]}
    assert names == {"service_account": "identity-scope-change", "cloud_identity:aws": "identity-scope-change",
                     "image": "image-change"}
    assert pol.validity["fingerprint"]["pod_template_hash"] == ["abc123"]
    assert "identity" not in pol.validity["untracked"] and "model" in pol.validity["untracked"]
    r = check(pol, {"pod_template_hash": "def456", "service_account": "agent"})
    assert not r["stale"] and [t["status"] for t in r["triggers"] if t["key"] == "pod_template_hash"] == ["info"]
    r = check(pol, {"cloud_identity:aws": "arn:aws:iam::1:role/admin"})
    assert r["stale"] and [t["trigger"] for t in r["triggers"] if t["fired"]] == ["identity-scope-change"]


def test_ipv4_mapped_ipv6_peers_widen_like_ipv4():
    sessions = [{"connect:tcp:[::ffff:10.0.3.7]:443": 2} for _ in range(3)]
    pol = derive(build(sessions))
    assert pol.egress == (EgressRule("tcp", "::ffff:a00:300/120", (443,)),)
    assert pol.allows("connect:tcp:[::ffff:10.0.3.99]:443")
    assert not pol.allows("connect:tcp:[::ffff:10.0.4.1]:443") and not pol.allows("connect:tcp:[::1]:443")
    assert "IPv4-mapped" in pol.provenance[0]["detail"]


def test_behaviour_kinds_without_a_substrate_are_recorded_not_encoded():
    p = build(steady())
    # a newer sensor's kind, as it would arrive in a packed profile
    p.node("n1").behaviours["smtp:relay.example.com"] = BehaviourStats(8, 4, T0 + 5, T0 + 3 * DAY)
    p = Profile.unpack(p.pack())
    pol = derive(p)
    assert pol.decisions["granularity"]["unencoded"] == {"smtp": 1}
    assert pol.allows("smtp:relay.example.com") and "smtp:relay.example.com" not in pol.watch
    r = replay(pol, p)
    assert r["denied"] == [] and r["bySubstrate"]["smtp"]["behaviours"] == 1


def test_replay_tells_denied_from_let_through_and_reported():
    p = build(steady({"syscall:ftruncate": 1, "connect:tcp:198.51.100.7:4444": 1}))
    pol = derive(p)
    r = replay(pol, p)
    assert r["alerted"] == ["syscall:ftruncate"]  # a syscall in review: runs, reported
    assert [d["key"] for d in r["denied"]] == ["connect:tcp:198.51.100.7:4444"]
