"""The research-corpus example against a real AWS emulator and the real SDK, at the level of the
derivation, compilation and evaluator code (tests/unit/test_iam_cli.py runs it through the CLI).

boto3 talks to a moto server on 127.0.0.1 over HTTPS (certificate from a test CA) with moto's
IAM authorization on (tests/awsworld.py). The agent's requests are taken at botocore's
``before-send`` event: the prepared request, signed, exactly as it goes on the wire, bounded like
the request capture. They are redacted and decoded by the sensor code, recorded per session
through the real aggregator into a profile, derived into IAM statements, compiled, linted by
parliament, and attached to the workload's role in moto. A held-out session then runs under it.

moto evaluates identity policies only (no permissions boundaries, no session policies), so the
document is attached as the role's only inline policy here; the boundary semantics are checked
with the evaluator (enforcer/iameval.py), which is itself checked against moto's decisions on
the requests both can judge (S3 and SQS resources).
"""

from __future__ import annotations

import json

import pytest
from parliament import analyze_policy_string

from enforcer.derive import DeriveOptions, derive
from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamdocument import compile_iam
from enforcer.iameval import evaluate, grants_allowed
from sensor.awscall import parse_key
from sensor.awsmodels import ServiceCatalog
from tests.awsrequests import Recorder, recorded_profile
from tests.awsworld import (ACCOUNT, OBSERVATION, ROLE, ROLE_ARN, TRAINING_TASKS, attempt, client, held_out_attempts,
                            observe_all, research_world, role_policy, session_creds, training_sessions)

T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def catalog():
    return ServiceCatalog()


@pytest.fixture(scope="module")
def mapper(catalog):
    return ActionMapper(ActionDatabase(), catalog)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with research_world(tmp_path_factory.mktemp("moto")) as w:
        yield w


@pytest.fixture(scope="module")
def derived(world, catalog, mapper):
    profile = recorded_profile(training_sessions(world, catalog, T0), fingerprints={"cloud_identity:aws": ROLE_ARN})
    policy = derive(profile, DeriveOptions(substrates=("iam",), iam_actions=mapper))
    return profile.behaviours(), policy


def test_training_evidence_names_operations_and_resources(derived):
    stats, _ = derived
    assert "aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2" in stats
    assert stats["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"].sessions == len(TRAINING_TASKS)
    assert "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf" in stats
    assert any(k.startswith("aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/") for k in stats)
    assert f"aws:sqs:SendMessage arn:aws:sqs:us-east-1:{ACCOUNT}:research-jobs-v1" in stats
    assert "aws:sts:AssumeRole" not in " ".join(stats)  # made by the launcher, not by the sessions


def test_derived_statements_carry_rule_and_evidence(derived):
    _, pol = derived
    assert pol.iam_identity == ROLE_ARN
    by_resource = {s.resource: s for s in pol.iam}
    prov = {p["entry"]: p for p in pol.provenance}
    read = by_resource["arn:aws:s3:::research-corpus-*/papers/*"]
    assert read.action == "s3:GetObject" and read.access_level == "Read"
    assert read.rule == "name-variant-prefix+key-prefix"
    detail = prov[read.id]["detail"]
    assert "GetObject → s3:GetObject (same-name)" in detail
    assert "HeadObject → s3:GetObject (override" in detail  # HeadObject needs s3:GetObject
    assert prov[read.id]["evidence"]["sessions"] == len(TRAINING_TASKS)
    lst = by_resource["arn:aws:s3:::research-corpus-*"]
    assert lst.action == "s3:ListBucket" and prov[lst.id]["detail"].startswith("ListObjectsV2 → s3:ListBucket")
    queue = by_resource[f"arn:aws:sqs:us-east-1:{ACCOUNT}:research-jobs-*"]
    assert queue.action == "sqs:SendMessage" and queue.access_level == "Write"
    # nothing the sessions did not do, at no access level they did not use
    assert {s.action for s in pol.iam} == {"s3:GetObject", "s3:ListBucket", "sqs:SendMessage"}
    review = {r["key"]: r for r in pol.review}
    assert "iam:s3:GetObject arn:aws:s3:::research-corpus-*/notes/draft.txt" in review
    assert pol.watch == ("aws:s3:GetObject arn:aws:s3:::research-corpus-v2/notes/draft.txt",)
    assert pol.validity["fingerprint"] == {"cloud_identity:aws": [ROLE_ARN]}
    assert pol.validity["triggers"][0]["name"] == "identity-scope-change"


def test_compiled_document_is_linted_and_within_limits(derived):
    _, pol = derived
    for target in ("boundary", "session"):
        doc = compile_iam(pol, target)
        assert doc.size <= doc.target.limit
        json.loads(doc.text)
        findings = analyze_policy_string(doc.text).findings
        assert findings == [], [(f.issue, f.detail) for f in findings]
    assert compile_iam(pol, "boundary").text == compile_iam(pol, "boundary").text


def test_held_out_session_under_the_derived_policy(world, derived, catalog, mapper):
    _, pol = derived
    doc = compile_iam(pol, "boundary").text
    with role_policy(world, doc):
        rec = Recorder()
        creds = session_creds(world, "held-out")
        s3 = client(world["server"], "s3", creds, rec)
        sqs = client(world["server"], "sqs", creds, rec)
        for name, (fn, expected) in held_out_attempts(s3, sqs, world["queues"]).items():
            rec.take()
            allowed = attempt(fn)
            assert allowed is expected, name
            # the evaluator on the same observed request, and the policy itself, decide as moto did
            [call] = observe_all(rec, catalog)
            grants = [g for b in call.behaviours() for g in mapper.map(b).grants]
            assert grants_allowed(grants, [doc]) is allowed, (name, call.keys())
            assert all(pol.allows(k) for k in call.keys()) is allowed, (name, call.keys())


def test_what_moto_does_not_check(world, derived):
    """Known limits of moto's authorization, checked so they are known: it ignores permissions
    boundaries, and it authorizes DynamoDB against resource ``*`` (a table-scoped allow denies).
    The evaluator answers as AWS does in both cases."""
    _, pol = derived
    doc = compile_iam(pol, "boundary").text
    iam = client(world["server"], "iam", world["admin"])
    iam.create_policy(PolicyName="envelope-boundary", PolicyDocument=doc)
    boundary_arn = f"arn:aws:iam::{ACCOUNT}:policy/envelope-boundary"
    iam.put_role_permissions_boundary(RoleName=ROLE, PermissionsBoundary=boundary_arn)
    try:
        assert iam.get_role(RoleName=ROLE)["Role"]["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary_arn
        s3 = client(world["server"], "s3", session_creds(world, "boundary"))
        s3.put_object(Bucket="research-corpus-v2", Key="papers/boundary.pdf", Body=b"x")  # moto: allowed
        decision = evaluate("s3:PutObject", "arn:aws:s3:::research-corpus-v2/papers/boundary.pdf",
                            [OBSERVATION], boundary=doc)
        assert not decision.allowed and decision.reason == "boundary-implicit-deny"
        assert evaluate("s3:GetObject", "arn:aws:s3:::research-corpus-v3/papers/1.pdf", [OBSERVATION],
                        boundary=doc).allowed
    finally:
        iam.delete_role_permissions_boundary(RoleName=ROLE)
    table_policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["dynamodb:CreateTable", "dynamodb:DescribeTable"],
         "Resource": f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/papers"}]}
    iam.put_role_policy(RoleName=ROLE, PolicyName="table", PolicyDocument=json.dumps(table_policy))
    iam.delete_role_policy(RoleName=ROLE, PolicyName="observation")
    try:
        ddb = client(world["server"], "dynamodb", session_creds(world, "table"))
        assert not attempt(lambda: ddb.describe_table(TableName="papers"))  # moto checks against "*"
        assert evaluate("dynamodb:DescribeTable", f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/papers",
                        [table_policy]).allowed
    finally:
        iam.delete_role_policy(RoleName=ROLE, PolicyName="table")
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))


def test_behaviour_keys_parse_back(derived):
    stats, _ = derived
    for key in stats:
        assert parse_key(key).key == key


GRID_POLICIES = {
    "prefixes": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::research-corpus-*/papers/*"},
                 {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::research-corpus-v3"},
                 {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": f"arn:aws:sqs:us-east-1:{ACCOUNT}:research-jobs-*"}],
    "wildcards": [{"Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::*/notes/*"},
                  {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::payroll-exports/papers/1.pdf"},
                  {"Effect": "Allow", "Action": "sqs:*", "Resource": f"arn:aws:sqs:us-east-1:{ACCOUNT}:payroll-queue"}],
    "deny": [{"Effect": "Allow", "Action": ["s3:*", "sqs:*"], "Resource": "*"},
             {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::payroll-exports/*"},
             {"Effect": "Deny", "Action": "sqs:*", "Resource": f"arn:aws:sqs:us-east-1:{ACCOUNT}:payroll-*"}],
}


def test_evaluator_agrees_with_moto_on_s3_and_sqs(world, catalog, mapper):
    """Where moto authorizes against real resource ARNs (S3 buckets and objects, SQS queues), the
    evaluator decides every request of the grid as moto does."""
    iam = client(world["server"], "iam", world["admin"])
    iam.delete_role_policy(RoleName=ROLE, PolicyName="observation")
    agreed = {True: 0, False: 0}
    try:
        for name, statements in GRID_POLICIES.items():
            policy = {"Version": "2012-10-17", "Statement": statements}
            iam.put_role_policy(RoleName=ROLE, PolicyName="grid", PolicyDocument=json.dumps(policy))
            rec = Recorder()
            creds = session_creds(world, f"grid-{name}")
            s3 = client(world["server"], "s3", creds, rec)
            sqs = client(world["server"], "sqs", creds, rec)
            attempts = []
            for bucket in ("research-corpus-v2", "research-corpus-v3", "payroll-exports"):
                for key in ("papers/1.pdf", "notes/draft.txt"):
                    attempts.append(lambda b=bucket, k=key: s3.get_object(Bucket=b, Key=k))
                attempts.append(lambda b=bucket: s3.list_objects_v2(Bucket=b))
                attempts.append(lambda b=bucket: s3.put_object(Bucket=b, Key="papers/grid.pdf", Body=b"x"))
            for url in world["queues"].values():
                attempts.append(lambda u=url: sqs.send_message(QueueUrl=u, MessageBody="x"))
            for fn in attempts:
                rec.take()
                moto_allowed = attempt(fn)
                [call] = observe_all(rec, catalog)
                grants = [g for b in call.behaviours() for g in mapper.map(b).grants]
                assert grants_allowed(grants, [policy]) is moto_allowed, (name, call.keys())
                agreed[moto_allowed] += 1
            iam.delete_role_policy(RoleName=ROLE, PolicyName="grid")
    finally:
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))
    assert agreed[True] >= 10 and agreed[False] >= 10, agreed   # both outcomes exercised
