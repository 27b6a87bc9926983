"""Compile a policy's IAM statements (``spec.allow.iam``) into an IAM policy document, within
AWS's size limits.

The document allows exactly the derived statements (``Effect: Allow``, ``Action``, ``Resource``;
no ``Condition``, ``NotAction`` or ``NotResource``). It is meant to be attached where it caps
what the workload's identity can do, whatever else is granted to it:

- as an **IRSA permissions boundary**: a customer managed policy set as the role's boundary
  (``iam put-role-permissions-boundary``); the role's effective permissions are the
  intersection of its identity policies and the boundary;
- as a **session policy** passed to ``AssumeRole``/``AssumeRoleWithWebIdentity`` (``Policy=``):
  the session can do only what both the role and the session policy allow.

Size limits (IAM and STS quotas, AWS IAM user guide "IAM and AWS STS quotas"):

========== ====================================================================== ===========
target     what                                                                   limit
========== ====================================================================== ===========
boundary   customer managed policy (a permissions boundary is one)                6,144 characters, whitespace not counted
managed    customer managed policy                                                6,144 characters, whitespace not counted
role       all inline policies of one role together                              10,240 characters, whitespace not counted
session    session policy plaintext (``Policy`` of ``AssumeRole*``)               2,048 characters, as sent
========== ====================================================================== ===========

A session policy has a second limit: STS packs the session policy, managed-policy ARNs and
session tags into a binary form with its own, undocumented bound, reported per request as
``PackedPolicySize`` (a percentage). It cannot be computed offline; a session policy under 2,048
characters can still be refused for it.

Policy documents may contain only tab, line feed, carriage return and U+0020 to U+00FF; a
resource with other characters (an S3 key in another script) cannot be written and is refused
with its statement named. Literal ``*``, ``?`` and ``$`` in names are written as ``${*}``,
``${?}``, ``${$}``.

Document statements: the policy's statements with the same service, access level and resource
are one document statement (its actions joined), named ``<Service><AccessLevel><n>``
(``S3Read1``); the compile report says which policy entries each holds. When a document is over
its limit, statements with the same resources are merged (their actions joined), then
statements with the same actions (their resources joined); both keep exactly the same
action-resource pairs. Still over: an error naming the size and the limit, nothing written. A
policy whose iam statements are empty compiles to one explicit deny of everything.

Output is deterministic: the boundary, managed and role targets are indented JSON, the session
target is compact (its whitespace counts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .iamstatement import ACCESS_LEVELS, IamStatementError, resource_text

VERSION = "2012-10-17"


class IamDocumentError(ValueError):
    """A document that cannot be written within its target; one line."""


@dataclass(frozen=True)
class Target:
    name: str
    limit: int
    whitespace_counts: bool
    what: str


TARGETS = {
    "boundary": Target("boundary", 6144, False, "customer managed policy used as a permissions boundary"),
    "managed": Target("managed", 6144, False, "customer managed policy"),
    "role": Target("role", 10240, False, "inline policies of one role, together"),
    "session": Target("session", 2048, True, "session policy plaintext"),
}


@dataclass(frozen=True)
class CompiledDocument:
    text: str
    target: Target
    size: int
    statements: tuple[tuple[str, tuple[str, ...]], ...]   # (Sid, policy entry ids it holds)

    def report(self) -> dict:
        return {"target": self.target.name, "what": self.target.what, "size": self.size,
                "limit": self.target.limit, "whitespaceCounted": self.target.whitespace_counts,
                "statements": [{"sid": sid, "entries": list(holds)} for sid, holds in self.statements],
                "packedPolicySize": "not computable offline" if self.target.name == "session" else None}


def _size(text: str, target: Target) -> int:
    return len(text) if target.whitespace_counts else sum(1 for c in text if not c.isspace())


def _render(statements: list[dict], target: Target) -> str:
    doc = {"Version": VERSION, "Statement": statements}
    if target.whitespace_counts:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def _pack(rows: list[tuple[str, list[str], list[str], list[str]]], by: int) -> list[tuple[str, list[str], list[str], list[str]]]:
    """Merge rows (sid, actions, resources, holds) with equal ``by`` field (1: actions, 2: resources)."""
    merged: dict[tuple, tuple[str, list[str], list[str], list[str]]] = {}
    order: list[tuple] = []
    for sid, actions, resources, holds in rows:
        k = tuple(actions) if by == 1 else tuple(resources)
        if k in merged:
            s, a, r, h = merged[k]
            merged[k] = (s, sorted(set(a) | set(actions)), sorted(set(r) | set(resources)), h + holds)
        else:
            merged[k] = (sid, list(actions), list(resources), list(holds))
            order.append(k)
    return [merged[k] for k in order]


def _sid(prefix: str, level: str, n: int) -> str:
    word = "".join(ch for ch in prefix.title() if ch.isalnum())
    return f"{word}{level.title().replace(' ', '')}{n}"


def compile_iam(policy, target: str = "boundary") -> CompiledDocument:
    """The IAM policy document of ``policy`` (an :class:`enforcer.policy.Policy` with the iam
    substrate) for ``target`` (see :data:`TARGETS`)."""
    if target not in TARGETS:
        raise IamDocumentError(f"unknown IAM document target {target!r} (want one of {', '.join(TARGETS)})")
    if "iam" not in policy.substrates:
        raise IamDocumentError(f"policy {policy.metadata_name} leaves the iam substrate out (substrates: "
                               f"{', '.join(policy.substrates)}); fix: derive it with --substrates ...,iam")
    t = TARGETS[target]
    grouped: dict[tuple, list] = {}
    for st in policy.iam:
        grouped.setdefault((st.prefix, ACCESS_LEVELS.index(st.access_level), st.resource), []).append(st)
    rows = []
    counters: dict[tuple[str, int], int] = {}
    for (prefix, level, resource), sts in sorted(grouped.items()):
        counters[(prefix, level)] = counters.get((prefix, level), 0) + 1
        sid = _sid(prefix, ACCESS_LEVELS[level], counters[(prefix, level)])
        try:
            text = resource_text(resource)
        except IamStatementError as e:
            raise IamDocumentError(f"statement {sts[0].id}: {e}") from None
        rows.append((sid, sorted({st.action for st in sts}), [text], sorted(st.id for st in sts)))
    if not rows:
        statements = [{"Sid": "DenyAllNothingObserved", "Effect": "Deny", "Action": "*", "Resource": "*"}]
        text = _render(statements, t)
        return CompiledDocument(text, t, _size(text, t), (("DenyAllNothingObserved", ()),))
    for step in (0, 2, 1):
        if step:
            rows = _pack(rows, step)
        statements = [{"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
                      for sid, actions, resources, _ in rows]
        text = _render(statements, t)
        size = _size(text, t)
        if size <= t.limit:
            return CompiledDocument(text, t, size, tuple((sid, tuple(h)) for sid, _, _, h in rows))
    raise IamDocumentError(f"the {t.what} would be {size} characters, over the limit of {t.limit}"
                           f"{'' if t.whitespace_counts else ' (whitespace not counted)'} even with statements merged; "
                           f"fix: derive with structural closure, or split the envelope")
