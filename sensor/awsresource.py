"""The resources an AWS operation call names, as behaviour-key ARNs (:mod:`sensor.awsarn`).

Each covered service has one rule that reads the operation's parameters:

- **s3**: ``Bucket`` (+ ``Key``) → ``arn:aws:s3:::bucket[/key]``; access-point hosts →
  ``arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME[/object/KEY]``; ``DeleteObjects`` → one object per
  key in the XML body; ``CopySource`` (``CopyObject``, ``UploadPartCopy``) and ``SSEKMSKeyId``
  are secondary resources with a role;
- **dynamodb** / **dynamodbstreams**: ``TableName`` (a name or an ARN) → ``table/NAME``,
  ``IndexName`` on ``Query``/``Scan`` → ``table/NAME/index/INDEX`` (what IAM authorizes for an
  index query), ``RequestItems`` keys, ``TransactItems`` (role ``Put``/``Update``/``Delete``/
  ``ConditionCheck``/``Get``), ARN members (``TableArn``, ``StreamArn``, ``ResourceArn``, ...);
- **sqs**: ``QueueUrl`` (``https://HOST/ACCOUNT/NAME``) and ``QueueName`` (+
  ``QueueOwnerAWSAccountId``) → ``arn:aws:sqs:REGION:ACCOUNT:NAME``;
- **sns**: ``TopicArn``, ``TargetArn``, ``SubscriptionArn``, ``ResourceArn``, ``Name`` on
  ``CreateTopic``;
- **secretsmanager**: ``SecretId``/``Name`` (an ARN, or a name → ``secret:NAME-??????``),
  ``SecretIdList``;
- **kms**: ``KeyId`` (key id, key ARN, alias name or alias ARN), ``AliasName``, and the
  secondary ``SourceKeyId``/``DestinationKeyId``/``TargetKeyId``; a ``Decrypt`` or ``ReEncrypt``
  whose key travels inside the ciphertext names an undetermined key;
- **sts**: ``RoleArn``.

Qualifiers name request parameters that change which IAM action authorizes a resource (S3's
``VersionId``, ``ACL``, ``Tagging``, object-lock and governance-bypass parameters). Services with
no rule name an undetermined resource (``?``), never a guessed one. The region of a regional ARN
is the one the request was signed for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from .awsarn import UNDETERMINED, literal
from .awsoperation import OperationCall

# S3 request parameters that change the IAM action, and the operations where they do.
_S3_WRITES = frozenset({"PutObject", "CopyObject", "CreateMultipartUpload"})
S3_QUALIFIERS: dict[str, tuple[tuple[str, ...], frozenset[str] | None]] = {
    # qualifier: (members that set it, operations it applies to; None = any with the member)
    "VersionId": (("VersionId",), None),
    "ACL": (("ACL", "GrantFullControl", "GrantRead", "GrantReadACP", "GrantWrite", "GrantWriteACP"),
            _S3_WRITES | {"CreateBucket"}),
    "Tagging": (("Tagging",), _S3_WRITES),
    "ObjectLockMode": (("ObjectLockMode", "ObjectLockRetainUntilDate"), _S3_WRITES),
    "ObjectLockLegalHoldStatus": (("ObjectLockLegalHoldStatus",), _S3_WRITES),
    "BypassGovernanceRetention": (("BypassGovernanceRetention",),
                                  frozenset({"DeleteObject", "DeleteObjects", "PutObjectRetention"})),
    "ObjectLockEnabledForBucket": (("ObjectLockEnabledForBucket",), frozenset({"CreateBucket"})),
}

_KMS_KEY_ID_RE = re.compile(r"^(?:mrk-[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
_ACCOUNT_RE = re.compile(r"^\d{12}$")


@dataclass(frozen=True)
class Target:
    """One resource an operation call names."""

    resource: str | None                  # encoded ARN, possibly with "?"; None: names no resource
    role: str | None = None               # the parameter of a secondary resource
    qualifiers: tuple[str, ...] = ()
    reason: str = ""                      # why a part is undetermined

    @property
    def determined(self) -> bool:
        return self.resource is None or UNDETERMINED not in self.resource


@dataclass(frozen=True)
class Scope:
    partition: str
    region: str


def _undetermined(call: OperationCall, member: str) -> str:
    return f"{member} not readable ({call.body})"


# ---- s3 -------------------------------------------------------------------------------------


def _s3_qualifiers(call: OperationCall, params: Mapping[str, Any]) -> tuple[str, ...]:
    out = []
    for q, (members, ops) in S3_QUALIFIERS.items():
        if ops is not None and call.operation not in ops:
            continue
        if any(m in params and params[m] not in ("", None) for m in members):
            if q == "BypassGovernanceRetention" and str(params.get(members[0])).lower() != "true":
                continue
            out.append(q)
    return tuple(sorted(out))


def _s3_object(scope: Scope, call: OperationCall, bucket: str, key: str) -> str:
    if call.s3 is not None and call.s3.style == "access-point":
        name, account, region = call.s3.access_point
        return f"arn:{scope.partition}:s3:{region}:{account}:accesspoint/{literal(name)}/object/{literal(key)}"
    return f"arn:{scope.partition}:s3:::{literal(bucket)}/{literal(key)}"


def _s3_bucket(scope: Scope, call: OperationCall, bucket: str) -> str:
    if call.s3 is not None and call.s3.style == "access-point":
        name, account, region = call.s3.access_point
        return f"arn:{scope.partition}:s3:{region}:{account}:accesspoint/{literal(name)}"
    return f"arn:{scope.partition}:s3:::{literal(bucket)}"


def _copy_source(scope: Scope, value: str) -> Target:
    text = unquote(value.lstrip("/"))
    version = None
    if "?versionId=" in text:
        text, version = text.split("?versionId=", 1)
    if text.startswith("arn:"):
        return Target(literal(text), role="CopySource", qualifiers=("VersionId",) if version else ())
    bucket, _, key = text.partition("/")
    if not bucket or not key:
        return Target(UNDETERMINED, role="CopySource", reason=f"copy source {value[:60]!r} is not bucket/key")
    return Target(f"arn:{scope.partition}:s3:::{literal(bucket)}/{literal(key)}", role="CopySource",
                  qualifiers=("VersionId",) if version else ())


def _s3(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    if "Bucket" not in shape_members:
        return [Target(None)]
    if "Bucket" in call.undetermined or "Bucket" not in p:
        return [Target(UNDETERMINED, reason="bucket not determined")]
    bucket = p["Bucket"]
    out: list[Target] = []
    if call.operation == "DeleteObjects":
        bypass = _s3_qualifiers(call, p)
        if "Delete" in call.undetermined or not isinstance(p.get("Delete"), dict):
            out.append(Target(f"arn:{scope.partition}:s3:::{literal(bucket)}/{UNDETERMINED}", qualifiers=bypass,
                              reason=_undetermined(call, "Delete")))
        else:
            for obj in p["Delete"].get("Objects") or []:
                quals = tuple(sorted(set(bypass) | ({"VersionId"} if obj.get("VersionId") else set())))
                out.append(Target(_s3_object(scope, call, bucket, obj.get("Key", "")), qualifiers=quals))
        return out
    quals = _s3_qualifiers(call, p)
    if "Key" in shape_members and "Key" in p:
        out.append(Target(_s3_object(scope, call, bucket, p["Key"]), qualifiers=quals))
    else:
        out.append(Target(_s3_bucket(scope, call, bucket), qualifiers=quals))
    if "CopySource" in p:
        out.append(_copy_source(scope, p["CopySource"]))
    if p.get("SSEKMSKeyId"):
        out.append(_kms_key_target(scope, p["SSEKMSKeyId"], role="SSEKMSKeyId"))
    elif "SSEKMSKeyId" in call.withheld or str(p.get("ServerSideEncryption", "")).startswith("aws:kms"):
        why = ("the service model marks SSEKMSKeyId sensitive, so its value is not read"
               if "SSEKMSKeyId" in call.withheld else "SSE-KMS with the bucket's default key")
        out.append(Target(f"arn:{scope.partition}:kms:{scope.region}:{UNDETERMINED}:key/{UNDETERMINED}",
                          role="SSEKMSKeyId", reason=why))
    return out


# ---- dynamodb -------------------------------------------------------------------------------


def _table(scope: Scope, name: str) -> str:
    if name.startswith("arn:"):
        return literal(name)
    return f"arn:{scope.partition}:dynamodb:{scope.region}::table/{literal(name)}"


_DDB_ARN_MEMBERS = ("TableArn", "StreamArn", "ResourceArn", "SourceTableArn", "BackupArn", "ExportArn",
                    "ImportArn")


def _dynamodb(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    out: list[Target] = []
    if "TableName" in shape_members:
        if "TableName" in call.undetermined:
            out.append(Target(f"arn:{scope.partition}:dynamodb:{scope.region}::table/{UNDETERMINED}",
                              reason=_undetermined(call, "TableName")))
        elif "TableName" in p:
            table = _table(scope, p["TableName"])
            if call.operation in ("Query", "Scan") and ("IndexName" in call.undetermined):
                out.append(Target(table + f"/index/{UNDETERMINED}", reason=_undetermined(call, "IndexName")))
            elif call.operation in ("Query", "Scan") and p.get("IndexName"):
                out.append(Target(table + "/index/" + literal(p["IndexName"])))
            else:
                out.append(Target(table))
    for member in ("RequestItems",):
        if member in shape_members:
            if member in call.undetermined:
                out.append(Target(f"arn:{scope.partition}:dynamodb:{scope.region}::table/{UNDETERMINED}",
                                  reason=_undetermined(call, member)))
            else:
                out += [Target(_table(scope, t)) for t in sorted(p.get(member) or {})]
    if "TransactItems" in shape_members:
        if "TransactItems" in call.undetermined:
            out.append(Target(f"arn:{scope.partition}:dynamodb:{scope.region}::table/{UNDETERMINED}",
                              reason=_undetermined(call, "TransactItems")))
        else:
            for item in p.get("TransactItems") or []:
                for kind, body in sorted((item or {}).items()):
                    if isinstance(body, dict) and "TableName" in body:
                        out.append(Target(_table(scope, body["TableName"]), role=kind))
    if "GlobalTableName" in p:
        out.append(Target(f"arn:{scope.partition}:dynamodb:::global-table/{literal(p['GlobalTableName'])}"))
    for member in _DDB_ARN_MEMBERS:
        if member in call.undetermined:
            out.append(Target(UNDETERMINED, reason=_undetermined(call, member)))
        elif isinstance(p.get(member), str):
            out.append(Target(literal(p[member])))
    return _dedupe(out) or [Target(None)]


# ---- sqs, sns -------------------------------------------------------------------------------


def _queue_from_url(scope: Scope, url: str) -> Target:
    try:
        parts = [x for x in urlsplit(url).path.split("/") if x]
    except ValueError:
        parts = []
    if len(parts) == 2 and _ACCOUNT_RE.match(parts[0]):
        return Target(f"arn:{scope.partition}:sqs:{scope.region}:{parts[0]}:{literal(unquote(parts[1]))}")
    if len(parts) == 1 and not url.startswith(("http://", "https://")):  # a bare queue name
        return Target(f"arn:{scope.partition}:sqs:{scope.region}::{literal(parts[0])}")
    return Target(UNDETERMINED, reason="QueueUrl is not https://HOST/ACCOUNT/NAME")


def _sqs(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    out: list[Target] = []
    for member in ("QueueUrl", "QueueName"):
        if member in call.undetermined:
            out.append(Target(f"arn:{scope.partition}:sqs:{scope.region}:{UNDETERMINED}:{UNDETERMINED}",
                              reason=_undetermined(call, member)))
        elif member == "QueueUrl" and "QueueUrl" in p:
            out.append(_queue_from_url(scope, p["QueueUrl"]))
        elif member == "QueueName" and "QueueName" in p:
            owner = p.get("QueueOwnerAWSAccountId", "")
            owner = owner if _ACCOUNT_RE.match(owner or "") else ""
            out.append(Target(f"arn:{scope.partition}:sqs:{scope.region}:{owner}:{literal(p['QueueName'])}"))
    for member in ("SourceArn", "DestinationArn", "TaskHandle"):
        if isinstance(p.get(member), str) and p[member].startswith("arn:"):
            out.append(Target(literal(p[member]), role=member))
    return out or [Target(None)]


def _sns(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    out: list[Target] = []
    for member in ("TopicArn", "TargetArn", "SubscriptionArn", "ResourceArn", "PlatformApplicationArn",
                   "EndpointArn"):
        if member in call.undetermined:
            out.append(Target(UNDETERMINED, reason=_undetermined(call, member)))
        elif isinstance(p.get(member), str):
            out.append(Target(literal(p[member])))
    if call.operation == "CreateTopic":
        if "Name" in call.undetermined:
            out.append(Target(UNDETERMINED, reason=_undetermined(call, "Name")))
        elif "Name" in p:
            out.append(Target(f"arn:{scope.partition}:sns:{scope.region}::{literal(p['Name'])}"))
    return out or [Target(None)]


# ---- secrets manager, kms, sts --------------------------------------------------------------


def _secret(scope: Scope, ref: str) -> str:
    if ref.startswith("arn:"):
        return literal(ref)
    return f"arn:{scope.partition}:secretsmanager:{scope.region}::secret:{literal(ref)}-{UNDETERMINED * 6}"


def _secretsmanager(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    out: list[Target] = []
    for member in ("SecretId", "Name"):
        if member in call.undetermined and member in shape_members:
            out.append(Target(UNDETERMINED, reason=_undetermined(call, member)))
        elif isinstance(p.get(member), str) and (member == "SecretId" or call.operation == "CreateSecret"):
            out.append(Target(_secret(scope, p[member])))
    if "SecretIdList" in call.undetermined or "Filters" in call.undetermined:
        out.append(Target(UNDETERMINED, reason=_undetermined(call, "SecretIdList")))
    else:
        out += [Target(_secret(scope, s)) for s in p.get("SecretIdList") or [] if isinstance(s, str)]
        if p.get("Filters"):
            out.append(Target(UNDETERMINED, reason="secrets selected by filter, not by name"))
    return out or [Target(None)]


def _kms_key_target(scope: Scope, ref: str, role: str | None = None) -> Target:
    if ref.startswith("arn:"):
        return Target(literal(ref), role=role)
    if ref.startswith("alias/"):
        return Target(f"arn:{scope.partition}:kms:{scope.region}::{literal(ref)}", role=role)
    if _KMS_KEY_ID_RE.match(ref):
        return Target(f"arn:{scope.partition}:kms:{scope.region}::key/{ref}", role=role)
    return Target(UNDETERMINED, role=role, reason=f"key reference {ref[:40]!r} not understood")


def _kms(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    p = call.params
    out: list[Target] = []
    primary = "AliasName" if "AliasName" in shape_members else "KeyId"
    for member, role in ((primary, None), ("SourceKeyId", "SourceKeyId"), ("DestinationKeyId", "DestinationKeyId"),
                         ("TargetKeyId", "TargetKeyId")):
        if member not in shape_members:
            continue
        if member in call.undetermined:
            out.append(Target(UNDETERMINED, role=role, reason=_undetermined(call, member)))
        elif isinstance(p.get(member), str):
            out.append(_kms_key_target(scope, p[member], role))
        elif member in ("KeyId", "SourceKeyId") and "CiphertextBlob" in shape_members:
            out.append(Target(f"arn:{scope.partition}:kms:{scope.region}:{UNDETERMINED}:key/{UNDETERMINED}",
                              role=role, reason="the key is named inside the ciphertext"))
    return out or [Target(None)]


def _sts(call: OperationCall, scope: Scope, shape_members: set[str]) -> list[Target]:
    if "RoleArn" in call.undetermined:
        return [Target(UNDETERMINED, reason=_undetermined(call, "RoleArn"))]
    if isinstance(call.params.get("RoleArn"), str):
        return [Target(literal(call.params["RoleArn"]))]
    return [Target(None)]


RULES: dict[str, Callable[[OperationCall, Scope, set[str]], list[Target]]] = {
    "s3": _s3, "dynamodb": _dynamodb, "dynamodbstreams": _dynamodb, "sqs": _sqs, "sns": _sns,
    "secretsmanager": _secretsmanager, "kms": _kms, "sts": _sts,
}


def _dedupe(targets: list[Target]) -> list[Target]:
    seen, out = set(), []
    for t in targets:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def targets(call: OperationCall, scope: Scope, shape_members: set[str]) -> tuple[Target, ...]:
    """The resources ``call`` names. ``shape_members`` are the operation's input members."""
    rule = RULES.get(call.service)
    if rule is None:
        return (Target(UNDETERMINED, reason=f"no resource rule for service {call.service}"),)
    return tuple(_dedupe(rule(call, scope, shape_members)))
