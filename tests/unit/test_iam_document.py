"""Compiling a policy's IAM statements: valid, linted, deterministic documents within AWS's size
limits."""

from __future__ import annotations

import json

import pytest
from parliament import analyze_policy_string

from enforcer.derive import DeriveOptions, derive
from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamdocument import TARGETS, IamDocumentError, compile_iam
from enforcer.iameval import evaluate
from enforcer.iamstatement import IamStatement, IamStatementError, resource_text
from enforcer.policy import Policy
from sensor.awsmodels import ServiceCatalog
from sensor.workload import Workload
from tests.awsrequests import DAY, recorded_profile

ROLE = "arn:aws:iam::123456789012:role/research-agent"
W = Workload("research", "Deployment", "research-agent", "agent")


@pytest.fixture(scope="module")
def mapper():
    return ActionMapper(ActionDatabase(), ServiceCatalog())


def _policy(*statements) -> Policy:
    return Policy(W, substrates=("iam",), iam=tuple(statements))


def _stmts(actions, resource, level="Read"):
    return [IamStatement(a, resource, level, "exact") for a in actions]


def _many_services(mapper) -> Policy:
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
    sessions = {f"s{i}": [(1_767_225_600.0 + i * DAY + j, k) for j, k in enumerate(keys)] for i in range(3)}
    return derive(recorded_profile(sessions, fingerprints={"cloud_identity:aws": ROLE}),
                  DeriveOptions(substrates=("iam",), iam_actions=mapper, min_count={"iam": 3},
                                min_sessions={"iam": 3}))


def test_every_service_statement_lints_clean(mapper):
    pol = _many_services(mapper)
    assert len(pol.iam) == 9 and not pol.review
    for target in TARGETS:
        doc = compile_iam(pol, target)
        findings = analyze_policy_string(doc.text).findings
        assert findings == [], [(f.issue, f.detail) for f in findings]
        assert json.loads(doc.text)["Version"] == "2012-10-17"


def test_parliament_catches_a_wrong_resource():
    """The lint is not vacuous: a list action on an object ARN is reported."""
    pol = _policy(IamStatement("s3:ListBucket", "arn:aws:s3:::b/*", "List", "exact"))
    findings = analyze_policy_string(compile_iam(pol).text).findings
    assert [f.issue for f in findings] == ["RESOURCE_MISMATCH"]


def test_size_counting_per_target(mapper):
    pol = _many_services(mapper)
    boundary, session = compile_iam(pol, "boundary"), compile_iam(pol, "session")
    assert "\n" in boundary.text and "\n" not in session.text and " " not in session.text.split('"Statement"')[0]
    assert boundary.size == len("".join(boundary.text.split()))   # whitespace not counted
    assert session.size == len(session.text)                      # every character counted
    assert json.loads(boundary.text) == json.loads(session.text)


def test_packing_keeps_pairs_and_limit_is_enforced():
    stmts = [s for i in range(60) for s in _stmts(["s3:GetObject", "s3:GetObjectTagging"], f"arn:aws:s3:::bucket-{i:03d}/k")]
    pol = _policy(*stmts)
    doc = compile_iam(pol, "session")   # too big unpacked; merged by equal actions
    parsed = json.loads(doc.text)["Statement"]
    assert len(parsed) == 1 and len(parsed[0]["Resource"]) == 60 and doc.size <= 2048
    assert sorted(doc.statements[0][1]) == sorted(s.id for s in stmts)
    for i in range(60):
        r = f"arn:aws:s3:::bucket-{i:03d}/k"
        assert evaluate("s3:GetObjectTagging", r, [doc.text]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::bucket-000/other", [doc.text]).allowed
    wide = _policy(*[s for i in range(20) for s in _stmts(["s3:GetObject"], f"arn:aws:s3:::b/{'x' * 80}{i}")],
                   *[s for i in range(20) for s in _stmts(["s3:ListBucket"], f"arn:aws:s3:::c{'y' * 80}{i}", "List")])
    with pytest.raises(IamDocumentError, match="over the limit of 2048"):
        compile_iam(wide, "session")
    assert compile_iam(wide, "boundary").size <= 6144


def test_packing_never_joins_different_actions_and_resources():
    pol = _policy(*_stmts(["s3:GetObject"], "arn:aws:s3:::a/*"), *_stmts(["s3:PutObject"], "arn:aws:s3:::b/*", "Write"),
                  *[s for i in range(12) for s in _stmts(["s3:GetObjectTagging"], f"arn:aws:s3:::{'z' * 100}{i}/k")])
    doc = compile_iam(pol, "session")
    assert len(json.loads(doc.text)["Statement"]) == 3   # packed: the twelve same-action statements became one
    assert not evaluate("s3:PutObject", "arn:aws:s3:::a/x", [doc.text]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::b/x", [doc.text]).allowed


def test_resource_text_escapes_and_refuses():
    assert resource_text("arn:aws:s3:::b/odd%20%2A%3F%24x/*") == "arn:aws:s3:::b/odd ${*}${?}${$}x/*"
    assert resource_text("arn:aws:s3:::b/caf%C3%A9") == "arn:aws:s3:::b/caf\u00e9"
    with pytest.raises(IamStatementError, match="U\\+6587"):
        resource_text("arn:aws:s3:::b/%E6%96%87")
    with pytest.raises(IamStatementError, match="U\\+6587"):  # refused when the statement is made
        IamStatement("s3:GetObject", "arn:aws:s3:::b/%E6%96%87", "Read", "exact")


def test_literal_star_in_a_key_is_not_a_wildcard():
    doc = compile_iam(_policy(IamStatement("s3:GetObject", "arn:aws:s3:::b/a%2Ab", "Read", "exact"))).text
    assert evaluate("s3:GetObject", "arn:aws:s3:::b/a*b", [doc]).allowed
    assert not evaluate("s3:GetObject", "arn:aws:s3:::b/aXXb", [doc]).allowed


def test_nothing_allowed_compiles_to_deny_all():
    doc = json.loads(compile_iam(_policy()).text)
    assert doc["Statement"] == [{"Sid": "DenyAllNothingObserved", "Effect": "Deny", "Action": "*", "Resource": "*"}]


def test_statements_group_by_service_level_and_resource():
    pol = _policy(IamStatement("s3:GetObject", "arn:aws:s3:::b/*", "Read", "exact"),
                  IamStatement("s3:GetObjectTagging", "arn:aws:s3:::b/*", "Read", "exact"),
                  IamStatement("s3:PutObject", "arn:aws:s3:::b/*", "Write", "exact"),
                  IamStatement("s3:GetObject", "arn:aws:s3:::c/*", "Read", "exact"))
    doc = compile_iam(pol)
    got = [(s["Sid"], s["Action"], s["Resource"]) for s in json.loads(doc.text)["Statement"]]
    assert got == [("S3Read1", ["s3:GetObject", "s3:GetObjectTagging"], ["arn:aws:s3:::b/*"]),
                   ("S3Read2", ["s3:GetObject"], ["arn:aws:s3:::c/*"]),
                   ("S3Write1", ["s3:PutObject"], ["arn:aws:s3:::b/*"])]   # never one statement across levels
    assert doc.report()["statements"][0] == {"sid": "S3Read1", "entries": [
        "iam:s3:GetObject arn:aws:s3:::b/*", "iam:s3:GetObjectTagging arn:aws:s3:::b/*"]}


def test_a_policy_without_the_iam_substrate_is_refused():
    with pytest.raises(IamDocumentError, match="leaves the iam substrate out.*--substrates"):
        compile_iam(Policy(W))
    with pytest.raises(IamDocumentError, match="unknown IAM document target"):
        compile_iam(_policy(), "inline")


def test_golden_research_corpus_document():
    """The compiled boundary of the golden IAM policy (tests/golden/policies) is byte-exact."""
    from pathlib import Path

    from enforcer.policy import load_policy
    root = Path(__file__).resolve().parent.parent / "golden"
    pol = load_policy(root / "policies" / "corpus-agent.iam.policy.yaml")
    golden = root / "compiled" / "research-corpus.iam.json"
    assert compile_iam(pol, "boundary").text == golden.read_text()
