"""Compiling IAM envelopes: valid, linted, deterministic documents within AWS's size limits."""

from __future__ import annotations

import json

import pytest
from parliament import analyze_policy_string

from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamderive import IamDeriveOptions, IamEnvelope, IamStatement, derive_iam
from enforcer.iamdocument import TARGETS, IamDocumentError, compile_iam, resource_text
from enforcer.iameval import evaluate
from sensor.awsmodels import ServiceCatalog
from tests.awsrequests import evidence

ROLE = "arn:aws:iam::123456789012:role/research-agent"


@pytest.fixture(scope="module")
def mapper():
    return ActionMapper(ActionDatabase(), ServiceCatalog())


def _stmt(sid, actions, resource, level="Read"):
    return IamStatement(sid, level, tuple({"action": a, "source": "same-name", "operations": []} for a in actions),
                        resource, "exact", {"count": 1, "sessions": 1, "behaviours": []})


def _many_services(mapper) -> IamEnvelope:
    keys = [
        "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/1.pdf",
        "aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2",
        "aws:dynamodb:Query arn:aws:dynamodb:us-east-1::table/papers/index/by-author",
        "aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/sessions-2024-05",
        "aws:sqs:SendMessage arn:aws:sqs:us-east-1:123456789012:research-jobs-v1",
        "aws:sns:Publish arn:aws:sns:us-east-1:123456789012:alerts",
        "aws:secretsmanager:GetSecretValue arn:aws:secretsmanager:us-east-1::secret:prod/db-??????",
        "aws:kms:Decrypt arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "aws:s3:ListBuckets",
    ]
    sessions = {f"s{i}": [(1000.0 + i, k) for k in keys] for i in range(3)}
    return derive_iam(evidence(sessions), mapper, {"cloud_identity:aws": {ROLE: 1.0}},
                      IamDeriveOptions(min_count=3, min_sessions=3))


def test_every_service_statement_lints_clean(mapper):
    env = _many_services(mapper)
    assert len(env.statements) == 9
    for target in TARGETS:
        doc = compile_iam(env, target)
        findings = analyze_policy_string(doc.text).findings
        assert findings == [], [(f.issue, f.detail) for f in findings]
        assert json.loads(doc.text)["Version"] == "2012-10-17"


def test_parliament_catches_a_wrong_resource():
    """The lint is not vacuous: a list action on an object ARN is reported."""
    env = IamEnvelope(None, None, (_stmt("S3List1", ["s3:ListBucket"], "arn:aws:s3:::b/*", "List"),))
    findings = analyze_policy_string(compile_iam(env).text).findings
    assert [f.issue for f in findings] == ["RESOURCE_MISMATCH"]


def test_size_counting_per_target(mapper):
    env = _many_services(mapper)
    boundary, session = compile_iam(env, "boundary"), compile_iam(env, "session")
    assert "\n" in boundary.text and "\n" not in session.text and " " not in session.text.split('"Statement"')[0]
    assert boundary.size == len("".join(boundary.text.split()))   # whitespace not counted
    assert session.size == len(session.text)                      # every character counted
    assert json.loads(boundary.text) == json.loads(session.text)


def test_packing_keeps_pairs_and_limit_is_enforced():
    stmts = tuple(_stmt(f"S3Read{i}", ["s3:GetObject", "s3:GetObjectTagging"], f"arn:aws:s3:::bucket-{i:03d}/k") for i in range(60))
    env = IamEnvelope(None, None, stmts)
    doc = compile_iam(env, "session")   # too big unpacked; merged by equal actions
    parsed = json.loads(doc.text)["Statement"]
    assert len(parsed) == 1 and len(parsed[0]["Resource"]) == 60 and doc.size <= 2048
    assert doc.statements[0][1] == tuple(f"S3Read{i}" for i in range(60))
    for i in range(60):
        r = f"arn:aws:s3:::bucket-{i:03d}/k"
        assert evaluate("s3:GetObjectTagging", r, [doc.text]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::bucket-000/other", [doc.text]).allowed
    wide = IamEnvelope(None, None, tuple(_stmt(f"S3Read{i}", [f"s3:GetObject"], f"arn:aws:s3:::b/{'x' * 80}{i}") for i in range(20))
                       + tuple(_stmt(f"S3List{i}", ["s3:ListBucket"], f"arn:aws:s3:::c{'y' * 80}{i}") for i in range(20)))
    with pytest.raises(IamDocumentError, match="over the limit of 2048"):
        compile_iam(wide, "session")
    assert compile_iam(wide, "boundary").size <= 6144


def test_packing_never_joins_different_actions_and_resources():
    env = IamEnvelope(None, None, (_stmt("A1", ["s3:GetObject"], "arn:aws:s3:::a/*"),
                                   _stmt("B1", ["s3:PutObject"], "arn:aws:s3:::b/*", "Write")) +
                      tuple(_stmt(f"C{i}", ["s3:GetObjectTagging"], f"arn:aws:s3:::{'z' * 100}{i}/k") for i in range(12)))
    doc = compile_iam(env, "session")
    assert len(json.loads(doc.text)["Statement"]) == 3   # packed: the twelve same-action statements became one
    assert not evaluate("s3:PutObject", "arn:aws:s3:::a/x", [doc.text]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::b/x", [doc.text]).allowed


def test_resource_text_escapes_and_refuses():
    assert resource_text("arn:aws:s3:::b/odd%20%2A%3F%24x/*") == "arn:aws:s3:::b/odd ${*}${?}${$}x/*"
    assert resource_text("arn:aws:s3:::b/caf%C3%A9") == "arn:aws:s3:::b/caf\u00e9"
    with pytest.raises(IamDocumentError, match="U\\+6587"):
        resource_text("arn:aws:s3:::b/%E6%96%87")
    env = IamEnvelope(None, None, (_stmt("S3Read1", ["s3:GetObject"], "arn:aws:s3:::b/%E6%96%87"),))
    with pytest.raises(IamDocumentError, match="statement S3Read1"):
        compile_iam(env)


def test_literal_star_in_a_key_is_not_a_wildcard():
    env = IamEnvelope(None, None, (_stmt("S3Read1", ["s3:GetObject"], "arn:aws:s3:::b/a%2Ab"),))
    doc = compile_iam(env).text
    assert evaluate("s3:GetObject", "arn:aws:s3:::b/a*b", [doc]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::b/aXXb", [doc]).allowed


def test_nothing_allowed_compiles_to_deny_all():
    doc = json.loads(compile_iam(IamEnvelope(None, None, ())).text)
    assert doc["Statement"] == [{"Sid": "DenyAllNothingObserved", "Effect": "Deny", "Action": "*", "Resource": "*"}]


def test_golden_research_corpus_document(mapper):
    from pathlib import Path
    sessions = {}
    for s in range(4):
        keys = [f"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/{s * 2 + i}.pdf" for i in (1, 2)]
        keys += ["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"] * 2
        sessions[f"s{s}"] = [(1_700_000_000.0 + s * 10 + i, k) for i, k in enumerate(keys)]
    env = derive_iam(evidence(sessions), mapper, {"cloud_identity:aws": {ROLE: 1.0}})
    golden = Path(__file__).resolve().parent.parent / "golden" / "compiled" / "research-corpus.iam.json"
    assert compile_iam(env, "boundary").text == golden.read_text()
