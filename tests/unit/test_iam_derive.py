"""IAM derivation: closure on resource ARNs, confidence, review and watch, identity, determinism."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamclosure import name_variant
from enforcer.iamderive import IamDeriveError, IamDeriveOptions, IamEnvelope, derive_iam
from sensor.awscall import parse_key
from sensor.awsmodels import ServiceCatalog
from tests.awsrequests import evidence

ROLE = "arn:aws:iam::123456789012:role/research-agent"
IDENTITY = {"cloud_identity:aws": {ROLE: 1.0}}


@pytest.fixture(scope="module")
def mapper():
    return ActionMapper(ActionDatabase(), ServiceCatalog())


def sessions_of(plan: dict[str, list[str]]) -> dict:
    """session id → keys, each key once per listed occurrence; times increase."""
    t = 1_700_000_000.0
    out = {}
    for sid, keys in plan.items():
        out[sid] = []
        for k in keys:
            t += 1
            out[sid].append((t, k))
    return out


def research_corpus() -> dict:
    plan = {}
    for s in range(4):
        keys = [f"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/{s * 2 + i}.pdf" for i in range(1, 3)]
        keys += ["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"] * 2
        keys += [f"aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/{s + 1}.pdf"]
        plan[f"s{s}"] = keys
    plan["s0"].append("aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt")
    return evidence(sessions_of(plan))


def by_resource(env):
    return {s.resource: s for s in env.statements}


def test_research_corpus_example(mapper):
    env = derive_iam(research_corpus(), mapper, IDENTITY)
    st_ = by_resource(env)
    assert set(st_) == {"arn:aws:s3:::research-corpus-*/papers/*", "arn:aws:s3:::research-corpus-*"}
    read = st_["arn:aws:s3:::research-corpus-*/papers/*"]
    assert read.action_names == ("s3:GetObject",) and read.rule == "name-variant-prefix+key-prefix"
    assert read.evidence["sessions"] == 4 and read.evidence["count"] == 12
    assert any("trailing variant token 'v2'" in d for d in read.details)
    assert any("also matches '/'" in d for d in read.details)
    # the write was seen once: reviewed and watched, never admitted by the reads' closure
    review = {r["key"]: r for r in env.review}
    put = review["iam:s3:PutObject arn:aws:s3:::research-corpus-*/out/1.txt"]
    assert put["kind"] == "below-threshold" and put["accessLevel"] == "Write"
    assert "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt" in env.watch
    assert env.identity == ROLE and env.account == "123456789012"
    assert env.validity["fingerprint"] == {"cloud_identity:aws": [ROLE]}


def test_literal_closure_keeps_observed_resources(mapper):
    env = derive_iam(research_corpus(), mapper, IDENTITY, IamDeriveOptions(closure="literal", min_count=1, min_sessions=1))
    resources = {s.resource for s in env.statements}
    assert "arn:aws:s3:::research-corpus-v2/papers/1.pdf" in resources
    assert not any("*" in r for r in resources)


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
    plan = {f"s{i}": [f"aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/sessions-2024-0{i + 1}"] * 2 for i in range(3)}
    env = derive_iam(evidence(sessions_of(plan)), mapper, IDENTITY)
    [s] = env.statements
    assert s.resource == "arn:aws:dynamodb:us-east-1:123456789012:table/sessions-*"
    assert s.rule == "caller-account+name-variant-prefix" and s.evidence["sessions"] == 3
    anon = derive_iam(evidence(sessions_of(plan)), mapper, {})
    [a] = anon.statements
    assert a.resource == "arn:aws:dynamodb:us-east-1:*:table/sessions-*" and "any-account" in a.flags
    assert anon.identity is None and anon.validity["untracked"] == ["identity"]


def test_few_keys_stay_exact_and_top_level_keys_flag_whole_bucket(mapper):
    few = {f"s{i}": ["aws:s3:GetObject arn:aws:s3:::corpus/papers/a.pdf"] * 2 for i in range(3)}
    env = derive_iam(evidence(sessions_of(few)), mapper, IDENTITY)
    assert [s.resource for s in env.statements] == ["arn:aws:s3:::corpus/papers/a.pdf"]
    top = {f"s{i}": [f"aws:s3:GetObject arn:aws:s3:::corpus/{i}-{j}.txt" for j in range(3)] for i in range(3)}
    env = derive_iam(evidence(sessions_of(top)), mapper, IDENTITY)
    [s] = env.statements
    assert s.resource == "arn:aws:s3:::corpus/*" and "whole-bucket" in s.flags


def test_undetermined_and_unmapped_go_to_review_never_allowed(mapper):
    plan = {f"s{i}": ["aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?",
                      "aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app", "aws:sns:?",
                      "aws:sts:GetCallerIdentity"] * 3 for i in range(4)}
    env = derive_iam(evidence(sessions_of(plan)), mapper, IDENTITY)
    assert env.statements == ()
    kinds = {r["key"]: r["kind"] for r in env.review}
    assert kinds == {"aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?": "not-granted",
                     "aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app": "not-granted", "aws:sns:?": "not-granted"}
    assert [n["key"] for n in env.not_needed] == ["aws:sts:GetCallerIdentity"]
    assert set(env.watch) == set(kinds)


def test_admit_element_and_behaviour(mapper):
    stats = research_corpus()
    el = "iam:s3:PutObject arn:aws:s3:::research-corpus-*/out/1.txt"
    env = derive_iam(stats, mapper, IDENTITY, IamDeriveOptions(admits=((el, "SEC-12 output bucket"),)))
    s = by_resource(env)["arn:aws:s3:::research-corpus-*/out/1.txt"]
    assert s.admitted == "admit" and s.reason == "SEC-12 output bucket"
    key = "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/1.txt"
    env = derive_iam(stats, mapper, IDENTITY, IamDeriveOptions(admits=((key, "SEC-13"),)))
    s = by_resource(env)["arn:aws:s3:::research-corpus-v2/out/1.txt"]
    assert s.admitted == "admit" and s.rule == "exact"
    with pytest.raises(IamDeriveError, match="not a reviewed"):
        derive_iam(stats, mapper, IDENTITY, IamDeriveOptions(admits=(("iam:s3:DeleteObject *", "x"),)))
    with pytest.raises(IamDeriveError, match="reason"):
        IamDeriveOptions(admits=((el, " "),)).validate()


def test_dependent_actions_only_at_the_same_access_level(mapper):
    plan = {f"s{i}": ["aws:dynamodb:RestoreTableToPointInTime arn:aws:dynamodb:us-east-1::table/papers"] * 2 for i in range(3)}
    env = derive_iam(evidence(sessions_of(plan)), mapper, IDENTITY)
    levels = {a: s.access_level for s in env.statements for a in s.action_names}
    assert levels["dynamodb:RestoreTableToPointInTime"] == "Write"
    assert set(levels.values()) == {"Write"}
    assert "dynamodb:PutItem" in levels  # a Write dependent action on the same table type
    dep_review = [r for r in env.review if r["kind"] == "dependent-action"]
    assert {r["key"].split()[0] for r in dep_review} >= {"iam:dynamodb:GetItem", "iam:dynamodb:Query", "iam:dynamodb:Scan"}


def test_several_identities_derive_for_none(mapper):
    fp = {"cloud_identity:aws": {ROLE: 1.0, "arn:aws:iam::123456789012:role/other": 2.0}}
    env = derive_iam(research_corpus(), mapper, fp)
    assert env.identity is None and any(r["kind"] == "identity" for r in env.review)


def test_round_trip_and_determinism(mapper):
    stats = research_corpus()
    a = derive_iam(stats, mapper, IDENTITY).to_dict()
    shuffled = list(stats.items())
    random.Random(7).shuffle(shuffled)
    b = derive_iam(dict(shuffled), mapper, IDENTITY).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert IamEnvelope.from_dict(json.loads(json.dumps(a))).to_dict() == a
    bad = json.loads(json.dumps(a))
    bad["statements"][0]["sid"] = "has space"
    with pytest.raises(IamDeriveError, match=r"statements\[0\]\.sid"):
        IamEnvelope.from_dict(bad)


_OPS = ["GetObject", "HeadObject", "PutObject", "DeleteObject", "GetObjectTagging", "PutObjectAcl", "ListObjectsV2"]


@st.composite
def profiles(draw):
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
    return evidence(sessions_of(plan))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles(), st.integers(1, 4), st.integers(1, 3))
def test_closure_never_crosses_actions_or_access_levels(mapper, stats, min_count, min_sessions):
    """Every allowed action is one some covered behaviour maps to, at that behaviour's level."""
    env = derive_iam(stats, mapper, IDENTITY, IamDeriveOptions(min_count=min_count, min_sessions=min_sessions))
    for s in env.statements:
        needed = {}
        for key in s.evidence["behaviours"]:
            for g in mapper.map(parse_key(key)).grants:
                needed[g.action] = g.access_level
        for a in s.action_names:
            assert a in needed and needed[a] == s.access_level, (a, s.resource)
    assert derive_iam(stats, mapper, IDENTITY, IamDeriveOptions(min_count=min_count, min_sessions=min_sessions)).to_dict() \
        == env.to_dict()
