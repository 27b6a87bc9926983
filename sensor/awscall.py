"""AWS API calls observed in captured requests, and their behaviour keys.

Pipeline (pure; the catalog is built once at the edge)::

    CapturedRequest ─ sigv4.redact (in the capture, before anything leaves it)
                    ─ observe: credential scope → operation and parameters → resources
                    ─ AwsCall ─ behaviours() → keys for the profile

Behaviour key grammar::

    key        = "aws:" service ":" operation *( "+" qualifier ) [ " " target ]
    service    = botocore service name        ; s3, dynamodb, sqs, secretsmanager, ...
    operation  = API operation name | "?"     ; GetObject, ListObjectsV2; "?" when not determined
    qualifier  = request parameter that changes the IAM action for this resource (sorted);
                 S3: VersionId, ACL, Tagging, ObjectLockMode, ObjectLockLegalHoldStatus,
                 BypassGovernanceRetention, ObjectLockEnabledForBucket
    target     = [ role "=" ] resource
    role       = parameter naming a secondary resource: CopySource, SSEKMSKeyId, SourceKeyId,
                 DestinationKeyId, TargetKeyId; Put/Update/Delete/ConditionCheck/Get for DynamoDB
                 transaction items
    resource   = ARN (see sensor.awsarn: literal text encoded, "?" for undetermined parts) | "?"

No target: the call names no resource (``aws:s3:ListBuckets``). One key per resource a call
names, so ``DeleteObjects`` of three keys gives three behaviours. Examples::

    aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf
    aws:s3:GetObject+VersionId arn:aws:s3:::research-corpus-v2/papers/7.pdf
    aws:s3:CopyObject CopySource=arn:aws:s3:::research-corpus-v2/papers/7.pdf
    aws:dynamodb:Query arn:aws:dynamodb:us-east-1::table/sessions/index/by-user
    aws:dynamodb:GetItem arn:aws:dynamodb:us-east-1::table/?          (table name cut from the capture)
    aws:secretsmanager:GetSecretValue arn:aws:secretsmanager:us-east-1::secret:prod/db-??????
    aws:sqs:?                                                          (operation not determined)

A key is split at its first space; neither side can contain another one.

The access key id is reduced to a keyed hash by :func:`sensor.sigv4.redact` before this module
sees the request; the call keeps the hash and the credential kind (long-term or temporary), never
the key id, a signature or a token, and no parameter value other than the resource names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import sigv4
from .awsarn import UNDETERMINED
from .awsmodels import ServiceCatalog
from .awsoperation import OperationCall, Unmatched, match
from .awsresource import Scope, Target, targets
from .httprequest import CapturedRequest, DuplicateHeader

KIND = "aws"
_KEY_RE = re.compile(
    r"^aws:(?P<service>[a-z0-9][a-z0-9-]*):(?P<operation>[A-Za-z0-9]+|\?)(?P<quals>(?:\+[A-Za-z]+)*)"
    r"(?: (?:(?P<role>[A-Za-z][A-Za-z0-9]*)=)?(?P<resource>\?|arn:[!-~]+))?$")


class AwsKeyError(ValueError):
    """A behaviour key that is not an ``aws:`` key."""


@dataclass(frozen=True)
class AwsBehaviour:
    service: str
    operation: str                       # "?" when not determined
    qualifiers: tuple[str, ...] = ()
    role: str | None = None
    resource: str | None = None          # None: the call names no resource

    @property
    def key(self) -> str:
        head = f"aws:{self.service}:{self.operation}" + "".join(f"+{q}" for q in self.qualifiers)
        if self.resource is None:
            return head
        return f"{head} {self.role + '=' if self.role else ''}{self.resource}"

    @property
    def determined(self) -> bool:
        return self.operation != UNDETERMINED and (self.resource is None or UNDETERMINED not in self.resource)


def parse_key(key: str) -> AwsBehaviour:
    m = _KEY_RE.match(key)
    if not m:
        raise AwsKeyError(f"bad aws behaviour key {key!r} (want aws:SERVICE:OPERATION[+QUALIFIER...] [ROLE=]ARN)")
    quals = tuple(q for q in m.group("quals").split("+") if q)
    if list(quals) != sorted(set(quals)):
        raise AwsKeyError(f"bad aws behaviour key {key!r}: qualifiers must be sorted and unique")
    if m.group("operation") == UNDETERMINED and (quals or m.group("resource")):
        raise AwsKeyError(f"bad aws behaviour key {key!r}: an undetermined operation has no target")
    return AwsBehaviour(m.group("service"), m.group("operation"), quals, m.group("role"), m.group("resource"))


@dataclass(frozen=True)
class AwsCall:
    service: str                         # botocore service name; the signing name when unknown
    operation: str | None                # None: not determined (``reason`` says why)
    region: str | None
    credential: sigv4.Credential
    targets: tuple[Target, ...] = ()
    reason: str = ""

    def behaviours(self) -> tuple[AwsBehaviour, ...]:
        if self.operation is None:
            return (AwsBehaviour(self.service, UNDETERMINED),)
        return tuple(sorted({AwsBehaviour(self.service, self.operation, t.qualifiers, t.role, t.resource)
                             for t in self.targets}, key=lambda b: b.key))

    def keys(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.behaviours())


@dataclass(frozen=True)
class NotObserved:
    """A request that is not an observable AWS call, counted by kind."""

    kind: str        # unsigned | unredacted | malformed
    reason: str


def observe(request: CapturedRequest, catalog: ServiceCatalog,
            s3_endpoints: tuple[str, ...] = ()) -> AwsCall | NotObserved:
    """Decode a redacted captured request into the AWS call it makes."""
    try:
        cred = sigv4.credential(request)
    except sigv4.Unsigned as e:
        return NotObserved("unsigned", str(e))
    except sigv4.UnredactedCredentials as e:
        return NotObserved("unredacted", str(e))
    except (sigv4.SigV4Error, DuplicateHeader) as e:
        return NotObserved("malformed", str(e))
    region = cred.region or (cred.region_set[0] if len(cred.region_set) == 1 and cred.region_set[0] != "*" else None)
    try:
        found = match(request, catalog, cred.service, s3_endpoints)
    except DuplicateHeader as e:
        found = Unmatched(str(e))
    if isinstance(found, Unmatched):
        return AwsCall(found.service or cred.service, None, region, cred, (), found.reason)
    scope = Scope(catalog.partition(region) or UNDETERMINED, region or UNDETERMINED)
    entry = catalog.entry(found.service)
    shape = entry.model.operation_model(found.operation).input_shape if entry else None
    members = set(shape.members) if shape is not None else set()
    return AwsCall(found.service, found.operation, region, cred, targets(found, scope, members))


__all__ = ["AwsBehaviour", "AwsCall", "AwsKeyError", "NotObserved", "OperationCall", "observe", "parse_key"]
