"""The IAM policy evaluator: matching rules and the identity / boundary / session intersection.

Cases follow AWS's IAM user guide ("Resource", "Policy evaluation logic"); the evaluator is also
checked against moto's decisions in tests/unit/test_iam_moto.py."""

from __future__ import annotations

import pytest

from enforcer.iameval import UnsupportedPolicy, action_matches, evaluate, resource_matches


def pol(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action, resource, sid="A"):
    return {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource}


@pytest.mark.parametrize("pattern,action,ok", [
    ("s3:GetObject", "s3:GetObject", True), ("s3:GetObject", "S3:getobject", True),
    ("s3:Get*", "s3:GetObjectAcl", True), ("s3:Get*", "s3:PutObject", False),
    ("s3:Get?bject", "s3:GetObject", True), ("*", "kms:Decrypt", True), ("s3:*", "s3express:CreateSession", False),
])
def test_action_matching(pattern, action, ok):
    assert action_matches(pattern, action) is ok


@pytest.mark.parametrize("pattern,resource,ok", [
    ("*", "arn:aws:s3:::b/k", True),
    ("arn:aws:s3:::research-corpus-*/papers/*", "arn:aws:s3:::research-corpus-v3/papers/9.pdf", True),
    ("arn:aws:s3:::research-corpus-*/papers/*", "arn:aws:s3:::research-corpus-v3/notes/1.txt", False),
    # "/" is no delimiter: the bucket's * reaches into the key (AWS user guide example bucket/*/test/*)
    ("arn:aws:s3:::research-corpus-*/papers/*", "arn:aws:s3:::research-corpus-x/a/papers/1.pdf", True),
    ("arn:aws:s3:::research-corpus-*", "arn:aws:s3:::research-corpus-v3/papers/1.pdf", True),
    ("arn:aws:s3:::research-corpus-*", "arn:aws:s3:::payroll", False),
    ("arn:aws:s3:::B/k", "arn:aws:s3:::b/k", False),                       # case-sensitive
    ("arn:aws:secretsmanager:us-east-1:1:secret:db-??????", "arn:aws:secretsmanager:us-east-1:1:secret:db-AbCdEf", True),
    ("arn:aws:secretsmanager:us-east-1:1:secret:db-??????", "arn:aws:secretsmanager:us-east-1:1:secret:db-AbCdE", False),
    ("arn:aws:dynamodb:us-east-1:*:table/t", "arn:aws:dynamodb:us-east-1:123456789012:table/t", True),
    # a * inside a segment stops at ":"; a * ending a segment may run past it
    ("arn:aws:sns:us-east-1:1:top*c", "arn:aws:sns:us-east-1:1:top:x:c", False),
    ("arn:aws:sns:us-east-1:*", "arn:aws:sns:us-east-1:1:topic", True),
    ("arn:aws:*:us-east-1:1:x", "arn:aws:sns:us-east-1:1:x", False),         # no wildcard in the service
    ("arn:aws:s3:::b/a${*}b", "arn:aws:s3:::b/a*b", True),
    ("arn:aws:s3:::b/a${*}b", "arn:aws:s3:::b/aXb", False),
    ("arn:aws:s3:::b/${?}${$}", "arn:aws:s3:::b/?$", True),
    ("arn:aws:s3:::b/a.b", "arn:aws:s3:::b/aXb", False),                    # "." is not a regex
])
def test_resource_matching(pattern, resource, ok):
    assert resource_matches(pattern, resource) is ok


def test_evaluation_logic():
    identity = pol(allow("s3:*", "*"))
    boundary = pol(allow("s3:GetObject", "arn:aws:s3:::research-corpus-*/*"))
    session = pol(allow(["s3:GetObject", "s3:PutObject"], "arn:aws:s3:::research-corpus-v3/*"))
    r2, r3 = "arn:aws:s3:::research-corpus-v2/k", "arn:aws:s3:::research-corpus-v3/k"
    assert evaluate("s3:GetObject", r2, [identity], boundary).allowed
    assert evaluate("s3:PutObject", r2, [identity], boundary).reason == "boundary-implicit-deny"
    assert evaluate("s3:GetObject", r2, [identity], boundary, session).reason == "session-implicit-deny"
    assert evaluate("s3:GetObject", r3, [identity], boundary, session).allowed
    assert evaluate("s3:GetObject", r3, [pol(allow("sqs:*", "*"))], boundary).reason == "implicit-deny"
    deny = pol({"Sid": "D", "Effect": "Deny", "Action": "s3:GetObject", "Resource": r3})
    d = evaluate("s3:GetObject", r3, [identity, deny], boundary)
    assert (d.allowed, d.reason, d.statements) == (False, "explicit-deny", ("D",))
    assert evaluate("s3:GetObject", r3, [identity], deny).reason == "explicit-deny"  # a deny in a boundary too


@pytest.mark.parametrize("statement", [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*", "Condition": {"Bool": {"aws:SecureTransport": "true"}}},
    {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
    {"Effect": "Allow", "Action": "s3:*", "NotResource": "arn:aws:s3:::b"},
    {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::${aws:username}/*"},
    {"Effect": "Permit", "Action": "s3:*", "Resource": "*"},
])
def test_unsupported_is_refused_not_guessed(statement):
    with pytest.raises(UnsupportedPolicy):
        evaluate("s3:GetObject", "arn:aws:s3:::b/k", [pol(statement)])
    with pytest.raises(UnsupportedPolicy):
        evaluate("s3:GetObject", "arn:aws:s3:::b/k", [{"Version": "2008-10-17", "Statement": []}])
