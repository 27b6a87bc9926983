"""Properties of derivation over generated profiles (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.closure import derivable
from enforcer.derive import DeriveOptions, derive
from enforcer.diff import entry_atoms
from enforcer.elements import admit_only
from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.policy import dump_policy, parse_policy
from enforcer.replay import replay
from sensor.awsmodels import ServiceCatalog
from sensor.profile import Profile
from sensor.workload import SUBSTRATES, Workload

IAM_ACTIONS = ActionMapper(ActionDatabase(), ServiceCatalog())
ROLE = "arn:aws:iam::123456789012:role/prop-agent"

W = Workload("prop", "Deployment", "agent", "main")
T0 = 1_767_225_600.0

KEYS = (
    [f"syscall:{s}" for s in ("read", "write", "openat", "open", "stat", "fstat", "statx", "ptrace", "clone3",
                              "getrandom", "epoll_wait", "pipe2", "wait4", "mount", "bpf", "getdents64",
                              "ftruncate", "kill", "io_uring_setup")]
    + [f"connect:tcp:10.0.{a}.{b}:{p}" for a in (0, 1) for b in (1, 2, 5) for p in (80, 443, 8000, 8001, 8002)]
    + ["connect:udp:10.0.0.1:53", "send:udp:10.0.0.1:53", "send:udp:[fd00::1]:53", "send:udp:[fd00::2]:53",
       "connect:tcp:[fd00:1::5]:443", "connect:tcp:192.168.9.9:5432"]
    + [f"exec:/usr/bin/{b}" for b in ("git", "curl", "sh")]
    + [f"exec:/usr/lib/git-core/git-{t}" for t in ("a", "b", "c", "d", "e")]
    + [f"exec:/bin/{t}" for t in ("ls", "cat", "id", "ps", "df")]
    + ["exec:/init"]
    + [f"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/{i}.pdf" for i in range(1, 5)]
    + ["aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/1.pdf",
       "aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/1.pdf",
       "aws:s3:PutObject+ACL arn:aws:s3:::research-corpus-v2/out/1.txt",   # two IAM actions
       "aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2", "aws:s3:ListBuckets",
       "aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/sessions-2024-05",
       "aws:dynamodb:RestoreTableToPointInTime arn:aws:dynamodb:us-east-1::table/papers",  # dependent actions
       "aws:sqs:SendMessage arn:aws:sqs:us-east-1:123456789012:research-jobs-v1",
       "aws:sts:GetCallerIdentity"]
    + [f"capability:{c}" for c in ("NET_BIND_SERVICE", "CHOWN", "DAC_OVERRIDE", "SYS_ADMIN", "NET_RAW")]
)

session_st = st.dictionaries(st.sampled_from(KEYS), st.integers(1, 6), min_size=1, max_size=14)


@st.composite
def profiles(draw) -> Profile:
    sessions = draw(st.lists(session_st, min_size=1, max_size=8))
    nodes = draw(st.sampled_from([("n1",), ("n1", "n2")]))
    gaps = draw(st.lists(st.floats(0.1, 30.0), min_size=len(sessions), max_size=len(sessions)))
    p = Profile(W)
    t = T0
    for i, b in enumerate(sessions):
        t += gaps[i] * 3600.0
        node = p.node(nodes[i % len(nodes)])
        node.open_session(f"s{i}", t, {"observed": ["capability"]})
        for j, (k, c) in enumerate(sorted(b.items())):
            node.observe(f"s{i}", k, c, t + j)
        if draw(st.booleans()) or i < len(sessions) - 1:
            node.close_session(f"s{i}", t + 600)
    for name in nodes:
        p.node(name).touch(t + draw(st.floats(0.0, 48.0)) * 3600.0)
    if draw(st.booleans()):
        p.node(nodes[0]).add_fingerprint("cloud_identity:aws", ROLE, T0)
    return p


@st.composite
def options(draw, closure=None) -> DeriveOptions:
    n = draw(st.integers(0, 8))
    m = draw(st.integers(0, 5))
    per = draw(st.sampled_from([None, "syscall", "egress", "exec"]))
    min_count = {s: n for s in SUBSTRATES}
    min_sessions = {s: m for s in SUBSTRATES}
    if per:
        min_count[per] = draw(st.integers(0, 8))
        min_sessions[per] = draw(st.integers(0, 5))
    return DeriveOptions(
        closure=closure or draw(st.sampled_from(["literal", "structural", "probabilistic"])),
        substrates=tuple(draw(st.sets(st.sampled_from(derivable()), min_size=1))),
        min_count=min_count, min_sessions=min_sessions,
        ipv4_prefix=draw(st.sampled_from([16, 24, 28, 32])), ipv6_prefix=draw(st.sampled_from([48, 64, 128])),
        max_ports=draw(st.integers(1, 5)), max_siblings=draw(st.integers(1, 4)),
        session_rule=draw(st.sampled_from(["max", "sum"])), force=True, iam_actions=IAM_ACTIONS,
        review_actions={s: draw(st.sampled_from(["deny", "alert"])) for s in ("syscall", "egress", "exec")},
    )


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _observed(p: Profile) -> list[str]:
    return list(p.behaviours())


@SETTINGS
@given(profiles(), options(closure="structural"))
def test_structural_contains_literal(p, opts):
    literal = derive(p, DeriveOptions(**{**opts.__dict__, "closure": "literal"}))
    for closure in ("structural", "probabilistic"):
        wide = derive(p, DeriveOptions(**{**opts.__dict__, "closure": closure}))
        assert set(literal.syscalls) <= set(wide.syscalls)
        for k in _observed(p):
            if literal.allows(k):
                assert wide.allows(k), (closure, k)
        for e in literal.execs:
            assert wide.allows(f"exec:{e}")
        for r in literal.egress:
            for port in r.ports:
                assert wide.allows(f"connect:{r.proto}:{r.network.network_address if r.network.version == 4 else '[' + str(r.network.network_address) + ']'}:{port}")


@SETTINGS
@given(profiles(), options(), st.integers(0, 4), st.integers(0, 3), st.sampled_from([None, *SUBSTRATES]))
def test_raising_n_or_m_never_adds_permissions(p, opts, dn, dm, only):
    subs = SUBSTRATES if only is None else (only,)
    stricter = DeriveOptions(**{**opts.__dict__,
                                "min_count": {s: opts.min_count[s] + (dn if s in subs else 0) for s in SUBSTRATES},
                                "min_sessions": {s: opts.min_sessions[s] + (dm if s in subs else 0) for s in SUBSTRATES}})
    loose, strict = derive(p, opts), derive(p, stricter)
    assert set(entry_atoms(strict)) <= set(entry_atoms(loose))
    for k in _observed(p):
        if strict.allows(k):
            assert loose.allows(k), k


@SETTINGS
@given(profiles(), options(), st.data())
def test_every_allowed_entry_has_provenance_clearing_threshold_or_an_admit(p, opts, data):
    first = derive(p, opts)
    admits = ()
    if first.review and data.draw(st.booleans()):
        item = data.draw(st.sampled_from(first.review))
        key = data.draw(st.sampled_from([item["key"], *item["evidence"]["behaviours"]]))
        admits = ((key, "reviewed by security"),)
    pol = derive(p, DeriveOptions(**{**opts.__dict__, "admits": admits}))
    prov = {x["entry"]: x for x in pol.provenance}
    for atom in entry_atoms(pol):
        assert atom in prov, atom
        x = prov[atom]
        ev, sub = x["evidence"], x["substrate"]
        if x["admitted"] == "threshold":
            assert ev["count"] >= opts.min_count[sub] and ev["sessions"] >= opts.min_sessions[sub]
        else:
            assert x["admitted"] == "admit" and x["reason"] == "reviewed by security"
        for b in ev["behaviours"]:
            assert b in p.behaviours()
    if admits:
        key = admits[0][0]
        assert key in prov or any(key == x.get("element") or key in x["evidence"]["behaviours"]
                                  for x in prov.values())


@SETTINGS
@given(profiles(), options())
def test_review_and_allowed_never_overlap(p, opts):
    pol = derive(p, opts)
    atoms = set(entry_atoms(pol))
    for r in pol.review:
        assert r["key"] not in atoms
        for b in r["evidence"]["behaviours"]:
            assert not pol.allows(b), b
            assert b in pol.watch
    for w in pol.watch:
        assert not pol.allows(w)
    # nothing observed in an included substrate is silently dropped
    for k in _observed(p):
        from sensor.workload import substrate_of
        if substrate_of(k) in pol.substrates:
            assert pol.allows(k) or k in pol.watch


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles(), options())
def test_derivation_is_deterministic(p, opts):
    derived = derive(p, opts)
    a = dump_policy(derived)
    again = Profile.unpack(p.pack())
    assert dump_policy(derive(again, opts)) == a
    back = parse_policy(a)
    assert dump_policy(back) == a
    back.iam_actions = IAM_ACTIONS
    for k in _observed(p):  # a policy read back judges as the derived one
        assert back.allows(k) == derived.allows(k), k
    assert dump_policy(derive(p, opts), "json") == dump_policy(parse_policy(a), "json")


@SETTINGS
@given(profiles(), options())
def test_replay_against_training_evidence_denies_nothing_above_threshold(p, opts):
    pol = derive(p, opts)
    stats = p.behaviours()
    for d in replay(pol, p)["denied"]:
        s = stats[d["key"]]
        from sensor.workload import substrate_of
        sub = substrate_of(d["key"])
        above = s.count >= opts.min_count[sub] and s.sessions >= opts.min_sessions[sub]
        assert not above or admit_only([d["key"]]), d  # only what evidence alone never admits
        assert d["key"] in pol.watch


@SETTINGS
@given(profiles(), options())
def test_dangerous_syscalls_pass_only_on_their_own_evidence(p, opts):
    from enforcer.syscall_groups import DANGEROUS
    pol = derive(p, opts)
    observed = set(_observed(p))
    prov = {x["entry"]: x for x in pol.provenance}
    for name in pol.syscalls:
        if name in DANGEROUS:
            key = f"syscall:{name}"
            assert key in observed, f"{name} admitted without being observed"
            assert prov[key]["evidence"]["behaviours"] == [key]
            if prov[key]["admitted"] == "threshold":
                assert "dangerous" in prov[key]["flags"]
    if "syscall" in pol.substrates:  # a substrate left out is not constrained
        for name in DANGEROUS:
            assert not pol.admits(f"syscall:{name}") or name in pol.syscalls, name


@SETTINGS
@given(profiles(), options())
def test_review_lets_through_only_what_was_observed_and_only_when_alerted(p, opts):
    pol = derive(p, opts)
    observed = set(_observed(p))
    for k in observed:
        if pol.admits(k) and not pol.allows(k):
            from sensor.workload import substrate_of
            assert pol.review_action(substrate_of(k)) == "alert", k
            assert k in pol.watch, "whatever review lets through is reported when it recurs"
    for r in pol.review:
        assert r["action"] in ("deny", "alert")
        for e in r.get("entries", []):
            assert not pol.allows(e.replace("egress:", "connect:", 1)) or not e.startswith("egress:")
        for b in r["evidence"]["behaviours"]:
            if r["action"] == "deny":
                assert not pol.admits(b), b
    # the enforcers' view (allowed + alerted review) is literal on review: nothing unobserved
    admitted = pol.review_admitted()
    if admitted is not None:
        for name in admitted.syscalls:
            assert f"syscall:{name}" in observed
        for e in admitted.execs:
            assert f"exec:{e}" in observed


@SETTINGS
@given(profiles(), options(closure="structural"))
def test_exec_never_widens_into_system_binary_directories(p, opts):
    pol = derive(p, opts)
    for e in pol.execs:
        assert e not in ("/bin/*", "/usr/bin/*", "/sbin/*", "/usr/sbin/*", "/usr/local/bin/*"), e
    if "exec" in pol.substrates:
        assert not pol.admits("exec:/bin/bash") and not pol.admits("exec:/usr/bin/bash")  # never observed
