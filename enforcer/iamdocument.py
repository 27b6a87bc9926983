"""Compile an IAM envelope into an IAM policy document, within AWS's size limits.

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
``${?}``, ``${$}``. When a document is over its limit, statements with the same resources are
merged (their actions joined), then statements with the same actions (their resources joined);
both keep exactly the same action-resource pairs. Still over: an error naming the size and the
limit, nothing written. A policy that allows nothing compiles to one explicit deny of everything.

Output is deterministic: the boundary, managed and role targets are indented JSON, the session
target is compact (its whitespace counts).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sensor.awsarn import decode

from .iamderive import IamEnvelope

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
    statements: tuple[tuple[str, tuple[str, ...]], ...]   # (Sid, derived statement sids it holds)

    def report(self) -> dict:
        return {"target": self.target.name, "what": self.target.what, "size": self.size,
                "limit": self.target.limit, "whitespaceCounted": self.target.whitespace_counts,
                "statements": [{"sid": sid, "holds": list(holds)} for sid, holds in self.statements],
                "packedPolicySize": "not computable offline" if self.target.name == "session" else None}


def resource_text(pattern: str) -> str:
    """A resource pattern in the encoding of :mod:`sensor.awsarn` as IAM policy text: raw ``*``
    and ``?`` are wildcards, everything between them is decoded and its ``$``, ``*``, ``?``
    escaped."""
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
                raise IamDocumentError(f"resource {pattern!r}: {e}") from None
            out.append(text.replace("$", "${$}").replace("*", "${*}").replace("?", "${?}"))
    text = "".join(out)
    bad = sorted({c for c in text if not (c in "\t\n\r" or 0x20 <= ord(c) <= 0xFF)})
    if bad:
        raise IamDocumentError(f"resource {pattern!r} has characters an IAM policy cannot carry "
                               f"({', '.join(f'U+{ord(c):04X}' for c in bad[:4])})")
    return text


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


def compile_iam(envelope: IamEnvelope, target: str = "boundary") -> CompiledDocument:
    """The IAM policy document of ``envelope`` for ``target`` (see :data:`TARGETS`)."""
    if target not in TARGETS:
        raise IamDocumentError(f"unknown IAM document target {target!r} (want one of {', '.join(TARGETS)})")
    t = TARGETS[target]
    rows = []
    for s in envelope.statements:
        try:
            resource = resource_text(s.resource)
        except IamDocumentError as e:
            raise IamDocumentError(f"statement {s.sid}: {e}") from None
        rows.append((s.sid, sorted(s.action_names), [resource], [s.sid]))
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
