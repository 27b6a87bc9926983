"""An IAM policy evaluator for identity-based policies, permissions boundaries and session policies.

It answers what AWS answers for one request — action and resource — under the policies that
apply to the calling principal, with the logic of AWS's policy evaluation for a single account:

1. an explicit ``Deny`` in any of the policies denies;
2. otherwise the identity-based policies must allow it;
3. and, when given, the permissions boundary must allow it;
4. and, when given, the session policy must allow it.

Matching:

- ``Action``: ``service:Name`` with ``*`` and ``?`` wildcards, case-insensitive;
- ``Resource``: ``*`` matches everything; otherwise wildcards work within each colon-separated
  ARN segment, except that a ``*`` ending a segment may extend across colons (AWS IAM user guide,
  "Resource"); ``/`` is an ordinary character; case-sensitive; ``${*}``, ``${?}`` and ``${$}``
  stand for the literal characters. No wildcard in the service segment matches, as in AWS.

Out of scope, refused with :class:`UnsupportedPolicy` rather than evaluated wrongly:
``Condition``, ``NotAction``, ``NotResource``, ``Principal`` (resource policies), and policy
variables other than the three escapes. Resource-based policies, SCPs, RCPs and cross-account
access are not modelled. Envelope's compiled documents use none of these.

Used in tests where moto's authorization cannot decide (moto matches resources only for S3,
SQS, IAM roles and ``sts:AssumeRole``, evaluates no boundaries and no session policies, and
treats the policy text as a regular expression) and to decide whether a derived envelope allows
a behaviour.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

VERSIONS = ("2012-10-17",)
_ESCAPES = {"${*}": r"\*", "${?}": r"\?", "${$}": r"\$"}
_TOKEN_RE = re.compile(r"\$\{[^}]*\}|\*|\?|.", re.DOTALL)


class UnsupportedPolicy(ValueError):
    """A policy using an element or variable this evaluator does not model."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str                   # allowed | explicit-deny | implicit-deny | boundary-implicit-deny | session-implicit-deny
    statements: tuple[str, ...]   # the Sids (or indexes) that decided


def _list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _glob(pattern: str, *, segment: bool) -> str:
    out = []
    tokens = _TOKEN_RE.findall(pattern)
    for i, tok in enumerate(tokens):
        if tok in _ESCAPES:
            out.append(_ESCAPES[tok])
        elif tok.startswith("${") and len(tok) > 1:
            raise UnsupportedPolicy(f"policy variable {tok} is not supported")
        elif tok == "*":
            last = i == len(tokens) - 1 or tokens[i + 1] == ":"
            out.append(".*" if (not segment or last) else "[^:]*")
        elif tok == "?":
            out.append("." if not segment else "[^:]")
        else:
            out.append(re.escape(tok))
    return "".join(out)


def action_matches(pattern: str, action: str) -> bool:
    return re.fullmatch(_glob(pattern, segment=False), action, re.IGNORECASE | re.DOTALL) is not None


def resource_matches(pattern: str, resource: str) -> bool:
    if pattern == "*":
        return True
    parts = pattern.split(":", 2)
    if len(parts) >= 2 and parts[0] == "arn" and len(parts) == 3:
        service = parts[2].split(":", 1)[0]
        if "*" in service or "?" in service:
            return False
    return re.fullmatch(_glob(pattern, segment=True), resource, re.DOTALL) is not None


def _statements(policy: Any) -> list[dict]:
    doc = json.loads(policy) if isinstance(policy, str) else policy
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise UnsupportedPolicy("not a policy document (no Statement)")
    if doc.get("Version") not in VERSIONS:
        raise UnsupportedPolicy(f"policy Version {doc.get('Version')!r} is not supported (want 2012-10-17)")
    out = []
    for i, s in enumerate(_list(doc["Statement"])):
        if not isinstance(s, dict):
            raise UnsupportedPolicy(f"statement {i} is not an object")
        for key in ("Condition", "NotAction", "NotResource", "Principal", "NotPrincipal"):
            if key in s:
                raise UnsupportedPolicy(f"statement {s.get('Sid', i)}: {key} is not supported")
        if s.get("Effect") not in ("Allow", "Deny"):
            raise UnsupportedPolicy(f"statement {s.get('Sid', i)}: Effect must be Allow or Deny")
        if "Action" not in s or "Resource" not in s:
            raise UnsupportedPolicy(f"statement {s.get('Sid', i)}: needs Action and Resource")
        out.append({"Sid": str(s.get("Sid", i)), "Effect": s["Effect"],
                    "Action": [str(a) for a in _list(s["Action"])],
                    "Resource": [str(r) for r in _list(s["Resource"])]})
    return out


def _matching(policies: Iterable[Any], action: str, resource: str, effect: str) -> list[str]:
    hits = []
    for policy in policies:
        for s in _statements(policy):
            if s["Effect"] != effect:
                continue
            if any(action_matches(a, action) for a in s["Action"]) and \
                    any(resource_matches(r, resource) for r in s["Resource"]):
                hits.append(s["Sid"])
    return hits


def evaluate(action: str, resource: str, identity: Sequence[Any], boundary: Any = None,
             session: Any = None) -> Decision:
    """Whether ``action`` on ``resource`` is allowed (policies as dicts or JSON text)."""
    every = list(identity) + [p for p in (boundary, session) if p is not None]
    denies = _matching(every, action, resource, "Deny")
    if denies:
        return Decision(False, "explicit-deny", tuple(denies))
    allows = _matching(identity, action, resource, "Allow")
    if not allows:
        return Decision(False, "implicit-deny", ())
    if boundary is not None and not _matching([boundary], action, resource, "Allow"):
        return Decision(False, "boundary-implicit-deny", ())
    if session is not None and not _matching([session], action, resource, "Allow"):
        return Decision(False, "session-implicit-deny", ())
    return Decision(True, "allowed", tuple(allows))


def grants_allowed(grants: Iterable[Any], identity: Sequence[Any], boundary: Any = None, session: Any = None) -> bool:
    """Whether every grant (:class:`enforcer.iamactions.Grant`: an action on a resource) that a
    behaviour needs is allowed; False when it needs none that could be mapped."""
    grants = list(grants)
    return bool(grants) and all(evaluate(g.action, g.resource, identity, boundary, session).allowed for g in grants)
