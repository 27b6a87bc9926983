"""The research-corpus example end to end, against a real AWS emulator and the real SDK.

boto3 talks to a moto server on 127.0.0.1 over HTTPS (certificate from a test CA) with moto's
IAM authorization on. The agent's requests are taken at botocore's ``before-send`` event: the
prepared request, signed, exactly as it goes on the wire (tests/awsrequests.py), bounded like the
request capture. They are redacted and decoded by the sensor code, aggregated per session into
profile evidence, derived into IAM statements, compiled, linted by parliament, and attached to
the workload's role in moto. A held-out session then runs under it.

moto evaluates identity policies only (no permissions boundaries, no session policies), so the
document is attached as the role's only inline policy here; the boundary semantics are checked
with the evaluator (enforcer/iameval.py), which is itself checked against moto's decisions on
the requests both can judge (S3 and SQS resources).
"""

from __future__ import annotations

import json
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from parliament import analyze_policy_string

from enforcer.iamactions import ActionDatabase, ActionMapper
from enforcer.iamderive import IamDeriveOptions, derive_iam
from enforcer.iamdocument import compile_iam
from enforcer.iameval import evaluate, grants_allowed
from sensor import sigv4
from sensor.awscall import AwsCall, observe, parse_key
from sensor.awsmodels import ServiceCatalog
from tests.awsrequests import Recorder, evidence
from tests.motoserver import MotoServer

ACCOUNT = "123456789012"  # moto's default account
ROLE = "research-agent"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
HASH_KEY = b"envelope-test-hash-key-0123456789"
BOOTSTRAP_REQUESTS = 3   # create_user, put_user_policy, create_access_key
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
OBSERVATION = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:*", "sqs:*", "dynamodb:*"], "Resource": "*"}]}
PAPERS = {f"papers/{i}.pdf": f"paper {i}".encode() for i in range(1, 10)}
TRAINING_TASKS = [[1, 2, 3], [2, 4, 5], [3, 6], [1, 7, 8], [5, 6, 8]]


def _client(server: MotoServer, service: str, creds: tuple, recorder: Recorder | None = None):
    c = boto3.client(service, endpoint_url=server.endpoint, verify=str(server.ca_path), region_name="us-east-1",
                     aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
                     aws_session_token=creds[2] if len(creds) > 2 else None,
                     config=Config(retries={"max_attempts": 1}))
    if recorder is not None:
        recorder.attach(c)
    return c


@pytest.fixture(scope="module")
def catalog():
    return ServiceCatalog()


@pytest.fixture(scope="module")
def mapper(catalog):
    return ActionMapper(ActionDatabase(), catalog)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"), BOOTSTRAP_REQUESTS)
    server.start()
    try:
        sent = []
        boot = _client(server, "iam", ("AKIAIOSFODNN7EXAMPLE", "bootstrap-secret"))
        boot.meta.events.register("before-send", lambda request, **_: sent.append(request.url))
        boot.create_user(UserName="admin")
        boot.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = boot.create_access_key(UserName="admin")["AccessKey"]
        assert len(sent) == BOOTSTRAP_REQUESTS
        admin = (key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.raises(ClientError):  # authorization is on from here: an unknown key is refused
            _client(server, "s3", ("AKIAUNKNOWNKEY000000", "nope")).list_buckets()
        s3 = _client(server, "s3", admin)
        for bucket in ("research-corpus-v2", "research-corpus-v3", "payroll-exports"):
            s3.create_bucket(Bucket=bucket)
            for k, body in PAPERS.items():
                s3.put_object(Bucket=bucket, Key=k, Body=body)
            s3.put_object(Bucket=bucket, Key="notes/draft.txt", Body=b"draft")
        sqs = _client(server, "sqs", admin)
        queues = {n: sqs.create_queue(QueueName=n)["QueueUrl"]
                  for n in ("research-jobs-v1", "research-jobs-v2", "payroll-queue")}
        iam = _client(server, "iam", admin)
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                          "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/admin"}}]}
        iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))
        yield {"server": server, "admin": admin, "queues": queues}
    finally:
        server.stop()


def _session_creds(world, name: str) -> tuple:
    sts = _client(world["server"], "sts", world["admin"])
    c = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName=name)["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA")
    return c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]


def _observe_all(recorder: Recorder, catalog) -> list[AwsCall]:
    calls = []
    for req in recorder.take():
        call = observe(sigv4.redact(req, HASH_KEY), catalog)
        assert isinstance(call, AwsCall), call
        calls.append(call)
    return calls


def _training_session(world, catalog, i: int, docs: list[int]) -> list[tuple[float, str]]:
    rec = Recorder()
    creds = _session_creds(world, f"train-{i}")
    s3 = _client(world["server"], "s3", creds, rec)
    sqs = _client(world["server"], "sqs", creds, rec)
    listed = s3.list_objects_v2(Bucket="research-corpus-v2", Prefix="papers/")
    assert listed["KeyCount"] == len(PAPERS)
    for d in docs:
        assert s3.get_object(Bucket="research-corpus-v2", Key=f"papers/{d}.pdf")["Body"].read() == PAPERS[f"papers/{d}.pdf"]
    s3.head_object(Bucket="research-corpus-v2", Key=f"papers/{docs[0]}.pdf")
    sqs.send_message(QueueUrl=world["queues"]["research-jobs-v1"], MessageBody=json.dumps({"docs": docs}))
    if i == 0:  # a one-off read outside the usual prefix: reviewed, not admitted
        s3.get_object(Bucket="research-corpus-v2", Key="notes/draft.txt")
    calls = _observe_all(rec, catalog)
    for call in calls:  # nothing secret survives into what is kept
        assert creds[0] not in repr(call) and creds[2] not in repr(call)
        assert call.credential.key_kind == "ASIA" and call.credential.session_token
    return [(time.time(), k) for call in calls for k in call.keys()]


@pytest.fixture(scope="module")
def derived(world, catalog, mapper):
    sessions = {f"train-{i}": _training_session(world, catalog, i, docs) for i, docs in enumerate(TRAINING_TASKS)}
    stats = evidence(sessions)
    fingerprints = {"cloud_identity:aws": {ROLE_ARN: time.time()}}
    env = derive_iam(stats, mapper, fingerprints, IamDeriveOptions(), max(s.last_seen for s in stats.values()))
    return stats, env


def test_training_evidence_names_operations_and_resources(derived):
    stats, _ = derived
    assert "aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2" in stats
    assert stats["aws:s3:ListObjectsV2 arn:aws:s3:::research-corpus-v2"].sessions == len(TRAINING_TASKS)
    assert "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf" in stats
    assert any(k.startswith("aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/") for k in stats)
    assert f"aws:sqs:SendMessage arn:aws:sqs:us-east-1:{ACCOUNT}:research-jobs-v1" in stats
    assert "aws:sts:AssumeRole" not in " ".join(stats)  # made by the launcher, not by the sessions


def test_derived_statements_carry_rule_and_evidence(derived):
    _, env = derived
    assert env.identity == ROLE_ARN and env.account == ACCOUNT
    by_resource = {s.resource: s for s in env.statements}
    read = by_resource["arn:aws:s3:::research-corpus-*/papers/*"]
    assert read.action_names == ("s3:GetObject",) and read.access_level == "Read"
    assert read.rule == "name-variant-prefix+key-prefix"
    ops = read.actions[0]["operations"]
    assert ops == ["GetObject", "HeadObject"]  # HeadObject needs s3:GetObject
    assert read.evidence["sessions"] == len(TRAINING_TASKS)
    lst = by_resource["arn:aws:s3:::research-corpus-*"]
    assert lst.action_names == ("s3:ListBucket",) and lst.actions[0]["operations"] == ["ListObjectsV2"]
    queue = by_resource[f"arn:aws:sqs:us-east-1:{ACCOUNT}:research-jobs-*"]
    assert queue.action_names == ("sqs:SendMessage",) and queue.access_level == "Write"
    # nothing the sessions did not do, at no access level they did not use
    assert {a for s in env.statements for a in s.action_names} == {"s3:GetObject", "s3:ListBucket", "sqs:SendMessage"}
    review = {r["key"]: r for r in env.review}
    assert "iam:s3:GetObject arn:aws:s3:::research-corpus-*/notes/draft.txt" in review
    assert "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/notes/draft.txt" in env.watch
    assert env.validity["fingerprint"] == {"cloud_identity:aws": [ROLE_ARN]}
    assert env.validity["triggers"][0]["name"] == "identity-scope-change"


def test_compiled_document_is_linted_and_within_limits(derived):
    _, env = derived
    for target in ("boundary", "session"):
        doc = compile_iam(env, target)
        assert doc.size <= doc.target.limit
        json.loads(doc.text)
        findings = analyze_policy_string(doc.text).findings
        assert findings == [], [(f.issue, f.detail) for f in findings]
    assert compile_iam(env, "boundary").text == compile_iam(env, "boundary").text


def _attempt(fn) -> bool:
    try:
        fn()
        return True
    except ClientError as e:
        err = e.response["Error"]
        # moto answers SQS's JSON protocol with an XML error body, which botocore reports as code "403"
        denied = err.get("Code") in ("AccessDenied", "AccessDeniedException") or (
            err.get("Code") == "403" and "<Code>AccessDenied</Code>" in err.get("Message", ""))
        assert denied, e.response
        return False


def test_held_out_session_under_the_derived_policy(world, derived, catalog, mapper):
    _, env = derived
    doc = compile_iam(env, "boundary").text
    iam = _client(world["server"], "iam", world["admin"])
    iam.delete_role_policy(RoleName=ROLE, PolicyName="observation")
    iam.put_role_policy(RoleName=ROLE, PolicyName="envelope", PolicyDocument=doc)
    try:
        rec = Recorder()
        creds = _session_creds(world, "held-out")
        s3 = _client(world["server"], "s3", creds, rec)
        sqs = _client(world["server"], "sqs", creds, rec)
        q = world["queues"]
        attempts = {
            "read v3 paper": (lambda: s3.get_object(Bucket="research-corpus-v3", Key="papers/9.pdf")["Body"].read(), True),
            "list v3": (lambda: s3.list_objects_v2(Bucket="research-corpus-v3", Prefix="papers/"), True),
            "queue v2": (lambda: sqs.send_message(QueueUrl=q["research-jobs-v2"], MessageBody="x"), True),
            "write v2": (lambda: s3.put_object(Bucket="research-corpus-v2", Key="papers/new.pdf", Body=b"x"), False),
            "delete v2": (lambda: s3.delete_object(Bucket="research-corpus-v2", Key="papers/1.pdf"), False),
            "other bucket": (lambda: s3.get_object(Bucket="payroll-exports", Key="papers/1.pdf"), False),
            "other prefix": (lambda: s3.get_object(Bucket="research-corpus-v3", Key="notes/draft.txt"), False),
            "other queue": (lambda: sqs.send_message(QueueUrl=q["payroll-queue"], MessageBody="x"), False),
        }
        outcomes = {}
        for name, (fn, expected) in attempts.items():
            rec.take()
            outcomes[name] = _attempt(fn)
            assert outcomes[name] is expected, name
            # the evaluator, on the same observed request, decides as moto did
            calls = _observe_all(rec, catalog)
            assert len(calls) == 1
            grants = [g for b in calls[0].behaviours() for g in mapper.map(b).grants]
            assert grants_allowed(grants, [doc]) is outcomes[name], (name, calls[0].keys())
    finally:
        iam.delete_role_policy(RoleName=ROLE, PolicyName="envelope")
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))


def test_what_moto_does_not_check(world, derived):
    """Known limits of moto's authorization, checked so they are known: it ignores permissions
    boundaries, and it authorizes DynamoDB against resource ``*`` (a table-scoped allow denies).
    The evaluator answers as AWS does in both cases."""
    _, env = derived
    doc = compile_iam(env, "boundary").text
    iam = _client(world["server"], "iam", world["admin"])
    iam.create_policy(PolicyName="envelope-boundary", PolicyDocument=doc)
    boundary_arn = f"arn:aws:iam::{ACCOUNT}:policy/envelope-boundary"
    iam.put_role_permissions_boundary(RoleName=ROLE, PermissionsBoundary=boundary_arn)
    try:
        assert iam.get_role(RoleName=ROLE)["Role"]["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary_arn
        s3 = _client(world["server"], "s3", _session_creds(world, "boundary"))
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
        ddb = _client(world["server"], "dynamodb", _session_creds(world, "table"))
        assert not _attempt(lambda: ddb.describe_table(TableName="papers"))  # moto checks against "*"
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
    iam = _client(world["server"], "iam", world["admin"])
    iam.delete_role_policy(RoleName=ROLE, PolicyName="observation")
    agreed = {True: 0, False: 0}
    try:
        for name, statements in GRID_POLICIES.items():
            policy = {"Version": "2012-10-17", "Statement": statements}
            iam.put_role_policy(RoleName=ROLE, PolicyName="grid", PolicyDocument=json.dumps(policy))
            rec = Recorder()
            creds = _session_creds(world, f"grid-{name}")
            s3 = _client(world["server"], "s3", creds, rec)
            sqs = _client(world["server"], "sqs", creds, rec)
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
                moto_allowed = _attempt(fn)
                [call] = _observe_all(rec, catalog)
                grants = [g for b in call.behaviours() for g in mapper.map(b).grants]
                assert grants_allowed(grants, [policy]) is moto_allowed, (name, call.keys())
                agreed[moto_allowed] += 1
            iam.delete_role_policy(RoleName=ROLE, PolicyName="grid")
    finally:
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))
    assert agreed[True] >= 10 and agreed[False] >= 10, agreed   # both outcomes exercised
