"""AWS calls from captured requests: operations, resources and behaviour keys.

Every request here is the real SDK's: a boto3 client for AWS's own endpoints whose requests are
recorded at ``before-send`` and answered locally (tests/awsrequests.py), then redacted and
decoded exactly as the sensor does.
"""

from __future__ import annotations

import pytest
from botocore.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor import sigv4
from sensor.awsarn import Arn, decode, literal
from sensor.awscall import AwsBehaviour, AwsCall, AwsKeyError, NotObserved, observe, parse_key
from sensor.awsmodels import ServiceCatalog, parse_request_uri
from sensor.awsoperation import s3_addressing
from sensor.httprequest import CapturedRequest
from tests.awsrequests import SESSION_TOKEN, call_offline, offline_requests

KEY = b"sensor-hash-key-0123456789abcdef"


@pytest.fixture(scope="module")
def catalog():
    return ServiceCatalog()


def calls(catalog, service, method, limit=4096, client_kwargs=None, s3_endpoints=(), **kwargs) -> list:
    with offline_requests(service, limit=limit, **(client_kwargs or {})) as (client, rec):
        call_offline(client, method, **kwargs)
    assert rec.requests, "the SDK sent nothing"
    return [observe(sigv4.redact(r, KEY), catalog, s3_endpoints) for r in rec.requests]


def keys(catalog, service, method, **kwargs) -> list[str]:
    out = []
    for c in calls(catalog, service, method, **kwargs):
        assert isinstance(c, AwsCall), c
        out += c.keys()
    return out


PATH_STYLE = {"config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})}


@pytest.mark.parametrize("style", [None, PATH_STYLE, {"endpoint_url": "https://127.0.0.1:4443"}])
def test_s3_object_read_in_every_addressing_style(catalog, style):
    assert keys(catalog, "s3", "get_object", client_kwargs=style, Bucket="research-corpus-v2", Key="papers/7.pdf") == [
        "aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf"]


@pytest.mark.parametrize("method,kwargs,expected", [
    ("head_object", {"Bucket": "b1", "Key": "k"}, ["aws:s3:HeadObject arn:aws:s3:::b1/k"]),
    ("list_objects_v2", {"Bucket": "b1", "Prefix": "papers/"}, ["aws:s3:ListObjectsV2 arn:aws:s3:::b1"]),
    ("list_objects", {"Bucket": "b1"}, ["aws:s3:ListObjects arn:aws:s3:::b1"]),
    ("list_buckets", {}, ["aws:s3:ListBuckets"]),
    ("head_bucket", {"Bucket": "b1"}, ["aws:s3:HeadBucket arn:aws:s3:::b1"]),
    ("get_object", {"Bucket": "b1", "Key": "k", "VersionId": "3"}, ["aws:s3:GetObject+VersionId arn:aws:s3:::b1/k"]),
    ("get_object_acl", {"Bucket": "b1", "Key": "k"}, ["aws:s3:GetObjectAcl arn:aws:s3:::b1/k"]),
    ("get_bucket_policy", {"Bucket": "b1"}, ["aws:s3:GetBucketPolicy arn:aws:s3:::b1"]),
    ("put_object", {"Bucket": "b1", "Key": "k", "Body": b"x", "ACL": "public-read", "Tagging": "a=b"},
     ["aws:s3:PutObject+ACL+Tagging arn:aws:s3:::b1/k"]),
    ("copy_object", {"Bucket": "b1", "Key": "k", "CopySource": {"Bucket": "src", "Key": "a b", "VersionId": "v1"}},
     ["aws:s3:CopyObject arn:aws:s3:::b1/k", "aws:s3:CopyObject+VersionId CopySource=arn:aws:s3:::src/a%20b"]),
    ("upload_part_copy", {"Bucket": "b1", "Key": "k", "CopySource": "src/x", "PartNumber": 1, "UploadId": "u"},
     ["aws:s3:UploadPartCopy CopySource=arn:aws:s3:::src/x", "aws:s3:UploadPartCopy arn:aws:s3:::b1/k"]),
    ("upload_part", {"Bucket": "b1", "Key": "k", "PartNumber": 1, "UploadId": "u", "Body": b"x"},
     ["aws:s3:UploadPart arn:aws:s3:::b1/k"]),
    ("create_multipart_upload", {"Bucket": "b1", "Key": "k"}, ["aws:s3:CreateMultipartUpload arn:aws:s3:::b1/k"]),
    ("delete_objects", {"Bucket": "b1", "Delete": {"Objects": [{"Key": "a"}, {"Key": "b", "VersionId": "1"}]}},
     ["aws:s3:DeleteObjects arn:aws:s3:::b1/a", "aws:s3:DeleteObjects+VersionId arn:aws:s3:::b1/b"]),
    ("get_object", {"Bucket": "b1", "Key": "odd */$?%\u00e9\n"}, ["aws:s3:GetObject arn:aws:s3:::b1/odd%20%2A/%24%3F%25%C3%A9%0A"]),
])
def test_s3_operations(catalog, method, kwargs, expected):
    assert keys(catalog, "s3", method, client_kwargs=PATH_STYLE, **kwargs) == expected


def test_sse_kms_key_is_sensitive_so_undetermined(catalog):
    [c] = calls(catalog, "s3", "put_object", client_kwargs=PATH_STYLE, Bucket="b1", Key="k", Body=b"x",
                ServerSideEncryption="aws:kms", SSEKMSKeyId="alias/corpus")
    kms = [t for t in c.targets if t.role == "SSEKMSKeyId"]
    assert kms and not kms[0].determined and "sensitive" in kms[0].reason
    assert "alias/corpus" not in repr(c)


def test_truncated_delete_objects_body_is_undetermined_not_guessed(catalog):
    [c] = calls(catalog, "s3", "delete_objects", limit=700, client_kwargs=PATH_STYLE, Bucket="b1",
                Delete={"Objects": [{"Key": f"doc-{i:04d}-" + "x" * 60} for i in range(30)]})
    assert c.keys() == ("aws:s3:DeleteObjects arn:aws:s3:::b1/?",)
    assert "truncated" in c.targets[0].reason


def test_access_point_host():
    addr = s3_addressing("reports-111122223333.s3-accesspoint.eu-west-1.amazonaws.com")
    assert addr.style == "access-point" and addr.access_point == ("reports", "111122223333", "eu-west-1")


@pytest.mark.parametrize("host,style,bucket", [
    ("research-corpus-v2.s3.amazonaws.com", "virtual", "research-corpus-v2"),
    ("my.dotted.bucket.s3.us-west-2.amazonaws.com", "virtual", "my.dotted.bucket"),
    ("b1.s3-us-west-2.amazonaws.com", "virtual", "b1"),
    ("b1.s3.dualstack.eu-west-1.amazonaws.com", "virtual", "b1"),
    ("b1.bucket.vpce-1a2b3c4d-5e6f.s3.us-east-1.vpce.amazonaws.com", "virtual", "b1"),
    ("s3.amazonaws.com", "path", None),
    ("s3.s3.amazonaws.com", "virtual", "s3"),
    ("127.0.0.1:9000", "path", None),
    ("[::1]:9000", "path", None),
    ("minio.local:9000", "undetermined", None),
    ("b1.minio.local:9000", "undetermined", None),
])
def test_s3_addressing(host, style, bucket):
    a = s3_addressing(host)
    assert (a.style, a.bucket) == (style, bucket)


def test_configured_s3_endpoint(catalog):
    assert s3_addressing("b1.minio.local:9000", ("minio.local",)).bucket == "b1"
    out = calls(catalog, "s3", "get_object", client_kwargs={"endpoint_url": "https://minio.local:9000"},
                Bucket="b1", Key="k")
    assert out[0].operation is None and "virtual-hosted" in out[0].reason  # not guessed
    out = calls(catalog, "s3", "get_object", client_kwargs={"endpoint_url": "https://minio.local:9000"},
                s3_endpoints=("minio.local",), Bucket="b1", Key="k")
    assert out[0].keys() == ("aws:s3:GetObject arn:aws:s3:::b1/k",)


@pytest.mark.parametrize("method,kwargs,expected", [
    ("get_item", {"TableName": "papers", "Key": {"id": {"S": "1"}}}, ["aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/papers"]),
    ("query", {"TableName": "papers", "IndexName": "by-author", "KeyConditionExpression": "a = :a",
               "ExpressionAttributeValues": {":a": {"S": "x"}}},
     ["aws:dynamodb:Query arn:aws:dynamodb:us-east-1::table/papers/index/by-author"]),
    ("batch_get_item", {"RequestItems": {"t1": {"Keys": [{"id": {"S": "1"}}]}, "t2": {"Keys": [{"id": {"S": "1"}}]}}},
     ["aws:dynamodb:BatchGetItem arn:aws:dynamodb:us-east-1::table/t1", "aws:dynamodb:BatchGetItem arn:aws:dynamodb:us-east-1::table/t2"]),
    ("transact_write_items", {"TransactItems": [{"Put": {"TableName": "t1", "Item": {"id": {"S": "1"}}}},
                                                {"Delete": {"TableName": "t2", "Key": {"id": {"S": "1"}}}}]},
     ["aws:dynamodb:TransactWriteItems Delete=arn:aws:dynamodb:us-east-1::table/t2",
      "aws:dynamodb:TransactWriteItems Put=arn:aws:dynamodb:us-east-1::table/t1"]),
    ("get_item", {"TableName": "arn:aws:dynamodb:eu-west-1:111122223333:table/shared", "Key": {"id": {"S": "1"}}},
     ["aws:dynamodb:GetItem arn:aws:dynamodb:eu-west-1:111122223333:table/shared"]),
    ("list_tables", {}, ["aws:dynamodb:ListTables"]),
])
def test_dynamodb(catalog, method, kwargs, expected):
    assert keys(catalog, "dynamodb", method, **kwargs) == expected


def test_truncated_json_body_leaves_the_table_undetermined(catalog):
    [c] = calls(catalog, "dynamodb", "put_item", limit=900, TableName="papers", Item={"body": {"S": "x" * 5000}})
    assert c.operation == "PutItem"  # from X-Amz-Target, a header
    assert c.keys() == ("aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?",)


@pytest.mark.parametrize("service,method,kwargs,expected", [
    ("sqs", "send_message", {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/jobs", "MessageBody": "hi"},
     ["aws:sqs:SendMessage arn:aws:sqs:us-east-1:123456789012:jobs"]),
    ("sqs", "get_queue_url", {"QueueName": "jobs"}, ["aws:sqs:GetQueueUrl arn:aws:sqs:us-east-1::jobs"]),
    ("sqs", "get_queue_url", {"QueueName": "jobs", "QueueOwnerAWSAccountId": "111122223333"},
     ["aws:sqs:GetQueueUrl arn:aws:sqs:us-east-1:111122223333:jobs"]),
    ("sqs", "list_queues", {}, ["aws:sqs:ListQueues"]),
    ("sns", "publish", {"TopicArn": "arn:aws:sns:us-east-1:123456789012:alerts", "Message": "m"},
     ["aws:sns:Publish arn:aws:sns:us-east-1:123456789012:alerts"]),
    ("sns", "create_topic", {"Name": "alerts"}, ["aws:sns:CreateTopic arn:aws:sns:us-east-1::alerts"]),
    ("secretsmanager", "get_secret_value", {"SecretId": "prod/db"},
     ["aws:secretsmanager:GetSecretValue arn:aws:secretsmanager:us-east-1::secret:prod/db-??????"]),
    ("secretsmanager", "get_secret_value", {"SecretId": "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"},
     ["aws:secretsmanager:GetSecretValue arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"]),
    ("kms", "encrypt", {"KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab", "Plaintext": b"x"},
     ["aws:kms:Encrypt arn:aws:kms:us-east-1::key/1234abcd-12ab-34cd-56ef-1234567890ab"]),
    ("kms", "encrypt", {"KeyId": "alias/app", "Plaintext": b"x"}, ["aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app"]),
    ("kms", "decrypt", {"CiphertextBlob": b"xxxx"}, ["aws:kms:Decrypt arn:aws:kms:us-east-1:?:key/?"]),
    ("sts", "get_caller_identity", {}, ["aws:sts:GetCallerIdentity"]),
    ("sts", "assume_role", {"RoleArn": "arn:aws:iam::123456789012:role/x", "RoleSessionName": "session-1"},
     ["aws:sts:AssumeRole arn:aws:iam::123456789012:role/x"]),
    ("lambda", "invoke", {"FunctionName": "f"}, ["aws:lambda:Invoke ?"]),
])
def test_other_services(catalog, service, method, kwargs, expected):
    assert keys(catalog, service, method, **kwargs) == expected


def test_sensitive_values_are_never_kept(catalog):
    [c] = calls(catalog, "secretsmanager", "put_secret_value", SecretId="prod/db", SecretString="hunter2-very-secret")
    [k] = calls(catalog, "kms", "encrypt", KeyId="alias/app", Plaintext=b"plaintext-very-secret")
    assert "hunter2" not in repr(c) and "plaintext-very" not in repr(k)


def test_query_protocol_truncated_body_leaves_operation_undetermined(catalog):
    [c] = calls(catalog, "sns", "publish", limit=600, TopicArn="arn:aws:sns:us-east-1:123456789012:alerts",
                Message="m" * 4000)
    assert c.operation is None and c.keys() == ("aws:sns:?",)


def test_unsigned_and_unredacted_are_counted_not_decoded(catalog):
    plain = CapturedRequest("GET", "research-corpus-v2.s3.amazonaws.com", "/papers/7.pdf")
    assert observe(plain, catalog) == NotObserved("unsigned", "no SigV4 signature")
    with offline_requests("s3", session_token=SESSION_TOKEN) as (client, rec):
        call_offline(client, "get_object", Bucket="b", Key="k")
    assert observe(rec.requests[0], catalog).kind == "unredacted"


def test_service_outside_the_catalog(catalog):
    [c] = calls(catalog, "ec2", "describe_instances")
    assert c.operation is None and c.service == "ec2" and "catalog" in c.reason


def test_request_uri_templates():
    assert parse_request_uri("/{Bucket}/{Key+}?uploads") == (
        (("label", "Bucket"), ("greedy", "Key")), (("uploads", None),))
    assert parse_request_uri("/{Bucket}?list-type=2") == ((("label", "Bucket"),), (("list-type", "2"),))


def _request_for(route, host="s3.amazonaws.com") -> CapturedRequest:
    path = "/" + "/".join("b1" if kind == "label" else "k/x.pdf" if kind == "greedy" else text
                          for kind, text in route.segments)
    query = [k if v is None else f"{k}={v}" for k, v in route.query_literals] + [f"{q}=1" for q in route.required_query]
    headers = tuple((h, "x") for h in route.required_headers)
    return CapturedRequest(route.method, host, path + ("?" + "&".join(query) if query else ""), headers)


# Operations whose requests are the same on the wire as another's (deprecated forms), and the one
# the decoder reports for them.
WIRE_TWINS = {"GetBucketLifecycle": "GetBucketLifecycleConfiguration", "PutBucketLifecycle": "PutBucketLifecycleConfiguration",
              "GetBucketNotification": "GetBucketNotificationConfiguration",
              "PutBucketNotification": "PutBucketNotificationConfiguration", "ListDirectoryBuckets": "ListBuckets"}


def test_every_s3_operation_routes_back_from_its_own_request_shape(catalog):
    from sensor.awsoperation import match
    entry = catalog.entry("s3")
    assert len(entry.routes) == len(entry.model.operation_names)
    for route in entry.routes:
        got = match(_request_for(route), catalog, "s3")
        assert getattr(got, "operation", None) == WIRE_TWINS.get(route.operation, route.operation), (route, got)
    express = next(r for r in entry.routes if r.operation == "ListDirectoryBuckets")
    assert match(_request_for(express, "s3express-control.us-east-1.amazonaws.com"), catalog, "s3").operation \
        == "ListDirectoryBuckets"


# ---- the key grammar ------------------------------------------------------------------------

def test_parse_key_round_trip_and_rejects():
    for k in ["aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf", "aws:s3:ListBuckets",
              "aws:s3:CopyObject+VersionId CopySource=arn:aws:s3:::src/a", "aws:sns:?",
              "aws:dynamodb:PutItem arn:aws:dynamodb:us-east-1::table/?", "aws:lambda:Invoke ?"]:
        assert parse_key(k).key == k
    for bad in ["aws:s3:GetObject arn:aws:s3:::b/has space", "aws:s3:Get+B+A arn:aws:s3:::b", "s3:GetObject",
                "aws:s3:? arn:aws:s3:::b", "aws:S3:GetObject"]:
        with pytest.raises(AwsKeyError):
            parse_key(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_literal_encoding_round_trips_and_keeps_keys_parseable(name):
    enc = literal(name)
    assert decode(enc) == name
    assert not set(enc) & set(" *?$\n\t")
    b = AwsBehaviour("s3", "GetObject", (), None, f"arn:aws:s3:::bucket/{enc}")
    assert parse_key(b.key) == b
    assert Arn.parse(b.resource).resource == f"bucket/{enc}"
