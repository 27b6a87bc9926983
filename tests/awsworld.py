"""The research-corpus world in a real AWS emulator, for the IAM tests.

A moto server on 127.0.0.1 over HTTPS (tests/motoserver.py) with IAM authorization on: an admin
user made with the unauthenticated bootstrap requests, three buckets (``research-corpus-v2``,
``research-corpus-v3``, ``payroll-exports``) holding the same papers and a draft, three queues
(``research-jobs-v1``, ``research-jobs-v2``, ``payroll-queue``), and the workload's role
``research-agent`` with a broad observation policy (what the agent runs with while it is
observed). Sessions assume the role, as an IRSA pod gets temporary credentials for it.

The agent's requests are taken at botocore's ``before-send`` event (tests/awsrequests.py): the
signed request exactly as it goes on the wire, bounded as the TLS capture bounds it, then
redacted and decoded by the sensor code (``sigv4.redact``, ``awscall.observe``) into behaviour
keys, which is what the capture does with the requests it sees in production.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from sensor import sigv4
from sensor.awscall import AwsCall, observe
from tests.awsrequests import Recorder
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


def client(server: MotoServer, service: str, creds: tuple, recorder: Recorder | None = None):
    c = boto3.client(service, endpoint_url=server.endpoint, verify=str(server.ca_path), region_name="us-east-1",
                     aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
                     aws_session_token=creds[2] if len(creds) > 2 else None,
                     config=Config(retries={"max_attempts": 1}))
    if recorder is not None:
        recorder.attach(c)
    return c


@contextmanager
def research_world(workdir):
    """Start the emulator and build the world; yields ``{"server", "admin", "queues"}``."""
    server = MotoServer(workdir, BOOTSTRAP_REQUESTS)
    server.start()
    try:
        sent = []
        boot = client(server, "iam", ("AKIAIOSFODNN7EXAMPLE", "bootstrap-secret"))
        boot.meta.events.register("before-send", lambda request, **_: sent.append(request.url))
        boot.create_user(UserName="admin")
        boot.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = boot.create_access_key(UserName="admin")["AccessKey"]
        assert len(sent) == BOOTSTRAP_REQUESTS
        admin = (key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.raises(ClientError):  # authorization is on from here: an unknown key is refused
            client(server, "s3", ("AKIAUNKNOWNKEY000000", "nope")).list_buckets()
        s3 = client(server, "s3", admin)
        for bucket in ("research-corpus-v2", "research-corpus-v3", "payroll-exports"):
            s3.create_bucket(Bucket=bucket)
            for k, body in PAPERS.items():
                s3.put_object(Bucket=bucket, Key=k, Body=body)
            s3.put_object(Bucket=bucket, Key="notes/draft.txt", Body=b"draft")
        sqs = client(server, "sqs", admin)
        queues = {n: sqs.create_queue(QueueName=n)["QueueUrl"]
                  for n in ("research-jobs-v1", "research-jobs-v2", "payroll-queue")}
        iam = client(server, "iam", admin)
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                          "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/admin"}}]}
        iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))
        yield {"server": server, "admin": admin, "queues": queues}
    finally:
        server.stop()


def session_creds(world, name: str) -> tuple:
    """Temporary credentials of the role, as an IRSA pod gets them."""
    sts = client(world["server"], "sts", world["admin"])
    c = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName=name)["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA")
    return c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]


def observe_all(recorder: Recorder, catalog) -> list[AwsCall]:
    """Redact and decode every recorded request, as the capture does."""
    calls = []
    for req in recorder.take():
        call = observe(sigv4.redact(req, HASH_KEY), catalog)
        assert isinstance(call, AwsCall), call
        calls.append(call)
    return calls


def training_session(world, catalog, i: int, docs: list[int]) -> list[str]:
    """One observed session of the agent: list the corpus, read the papers of its task, check the
    first with HeadObject, post a job; session 0 also reads the draft once. Returns the behaviour
    keys in the order the requests were sent."""
    rec = Recorder()
    creds = session_creds(world, f"train-{i}")
    s3 = client(world["server"], "s3", creds, rec)
    sqs = client(world["server"], "sqs", creds, rec)
    listed = s3.list_objects_v2(Bucket="research-corpus-v2", Prefix="papers/")
    assert listed["KeyCount"] == len(PAPERS)
    for d in docs:
        assert s3.get_object(Bucket="research-corpus-v2", Key=f"papers/{d}.pdf")["Body"].read() == PAPERS[f"papers/{d}.pdf"]
    s3.head_object(Bucket="research-corpus-v2", Key=f"papers/{docs[0]}.pdf")
    sqs.send_message(QueueUrl=world["queues"]["research-jobs-v1"], MessageBody=json.dumps({"docs": docs}))
    if i == 0:  # a one-off read outside the usual prefix: reviewed, not admitted
        s3.get_object(Bucket="research-corpus-v2", Key="notes/draft.txt")
    calls = observe_all(rec, catalog)
    for call in calls:  # nothing secret survives into what is kept
        assert creds[0] not in repr(call) and creds[2] not in repr(call)
        assert call.credential.key_kind == "ASIA" and call.credential.session_token
    return [k for call in calls for k in call.keys()]


def training_sessions(world, catalog, t0: float, day: float = 86400.0) -> dict[str, list[tuple[float, str]]]:
    """Every training session (:data:`TRAINING_TASKS`), laid out one a day from ``t0`` as the
    profile records them: session id → [(time, behaviour key)]."""
    out = {}
    for i, docs in enumerate(TRAINING_TASKS):
        keys = training_session(world, catalog, i, docs)
        out[f"train-{i}"] = [(t0 + i * day + j, k) for j, k in enumerate(keys)]
    return out


def attempt(fn) -> bool:
    """Whether the emulator allowed the call; any failure other than an access denial fails."""
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


@contextmanager
def role_policy(world, document: str, name: str = "envelope"):
    """The role runs with ``document`` as its only identity policy for the duration."""
    iam = client(world["server"], "iam", world["admin"])
    iam.delete_role_policy(RoleName=ROLE, PolicyName="observation")
    iam.put_role_policy(RoleName=ROLE, PolicyName=name, PolicyDocument=document)
    try:
        yield
    finally:
        iam.delete_role_policy(RoleName=ROLE, PolicyName=name)
        iam.put_role_policy(RoleName=ROLE, PolicyName="observation", PolicyDocument=json.dumps(OBSERVATION))


def held_out_attempts(s3, sqs, queues) -> dict:
    """The held-out session: what it tries, and whether the derived policy should let it."""
    return {
        "read v3 paper": (lambda: s3.get_object(Bucket="research-corpus-v3", Key="papers/9.pdf")["Body"].read(), True),
        "list v3": (lambda: s3.list_objects_v2(Bucket="research-corpus-v3", Prefix="papers/"), True),
        "queue v2": (lambda: sqs.send_message(QueueUrl=queues["research-jobs-v2"], MessageBody="x"), True),
        "write v2": (lambda: s3.put_object(Bucket="research-corpus-v2", Key="papers/new.pdf", Body=b"x"), False),
        "delete v2": (lambda: s3.delete_object(Bucket="research-corpus-v2", Key="papers/1.pdf"), False),
        "other bucket": (lambda: s3.get_object(Bucket="payroll-exports", Key="papers/1.pdf"), False),
        "other prefix": (lambda: s3.get_object(Bucket="research-corpus-v3", Key="notes/draft.txt"), False),
        "other queue": (lambda: sqs.send_message(QueueUrl=queues["payroll-queue"], MessageBody="x"), False),
    }
