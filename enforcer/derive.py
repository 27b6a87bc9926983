"""Derivation: a profile in, a policy out, through four explicit decisions.

1. **Granularity**: which substrates (syscall, egress, exec) the policy encodes. Behaviours of a
   left-out substrate are neither allowed nor reviewed; the substrate is simply not constrained.
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
     * ``exact`` / ``companion-group:NAME``: syscalls stay exact, except that a member of a named
       companion group (:mod:`enforcer.companions`) stands for its whole group.
   - ``probabilistic``: the structural envelope plus, per allowed behaviour, its per-session rate
     (mean and standard deviation over closed sessions) as a soft ``detection`` rule: a session
     whose count is more than ``k`` standard deviations away is a soft violation for review.
     Detection rules never allow or deny.

3. **Confidence**: an element enters the allowed set only with at least N occurrences over at
   least M distinct sessions (per substrate; default 5 over 3). An envelope element sums the
   counts of every behaviour it covers. Its distinct sessions are the union of the session ids
   its behaviours were seen in (the profile keeps a capped sample per behaviour): exact while
   every sample is complete, so values which each appeared in a single session can still earn
   their envelope, and a lower bound otherwise (never an over-estimate). ``session_rule="max"``
   (the largest member count) and ``"sum"`` (an upper bound) are explicit alternatives; the
   choice is recorded. Elements below the
   threshold go to ``review`` with their evidence and their behaviours go to ``watch``; an
   explicit admit (``--admit KEY --reason TEXT``) moves one into the allowed set and records the
   reason in provenance.
4. **Validity**: the fingerprint the evidence was gathered under (image digests, model version,
   prompt-template and tool-catalog hashes, identity), the re-derivation triggers that follow
   from it, and an optional expiry counted from the end of the observation window.

Before any of this, **coverage-stop** checks that the profile has stopped growing: fewer than
``coverage_threshold`` new behaviours per substrate in the last ``coverage_hours`` of the window.
Otherwise derivation refuses, unless forced; a forced policy is marked low-confidence and runs in
alert mode.

Everything here is pure: the only clock is the profile's window end, and all output is sorted.
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from sensor.profile import BehaviourStats, Profile
from sensor.workload import SUBSTRATES, BehaviourKeyError, parse_net_key, substrate_of

from . import companions
from .policy import CLOSURES, MODES, EgressRule, Policy, PolicyError, iso_time

DEFAULT_MIN_COUNT = 5
DEFAULT_MIN_SESSIONS = 3
DEFAULT_IPV4_PREFIX = 24
DEFAULT_IPV6_PREFIX = 64
DEFAULT_MAX_PORTS = 4
DEFAULT_MAX_SIBLINGS = 3
DEFAULT_K = 3.0
DEFAULT_COVERAGE_THRESHOLD = 1.0
DEFAULT_COVERAGE_HOURS = 24.0

SESSION_RULES = {
    "union": ("an element's distinct sessions are the union of the session ids of the behaviours it "
              "covers: exact while each behaviour's session sample is complete (under the profile's "
              "cap), otherwise the larger of that union and the largest member count, a lower bound"),
    "max": ("an element's distinct sessions are the largest session count among the behaviours it "
            "covers: a lower bound, because per-behaviour counts cannot show which sessions overlap"),
    "sum": ("an element's distinct sessions are the sum of the session counts of the behaviours it "
            "covers: an upper bound that assumes they never share a session (chosen explicitly)"),
}

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

_SYSCALL_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


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
    substrates: tuple[str, ...] = SUBSTRATES
    min_count: Mapping[str, int] = field(default_factory=lambda: {s: DEFAULT_MIN_COUNT for s in SUBSTRATES})
    min_sessions: Mapping[str, int] = field(default_factory=lambda: {s: DEFAULT_MIN_SESSIONS for s in SUBSTRATES})
    ipv4_prefix: int = DEFAULT_IPV4_PREFIX
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    service_cidrs: tuple[str, ...] = ()
    max_ports: int = DEFAULT_MAX_PORTS
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    k: float = DEFAULT_K
    coverage_threshold: float = DEFAULT_COVERAGE_THRESHOLD
    coverage_hours: float = DEFAULT_COVERAGE_HOURS
    force: bool = False
    admits: tuple[tuple[str, str], ...] = ()  # (entry or behaviour key, reason)
    fingerprint: Mapping[str, str] = field(default_factory=dict)
    expires_in: float | None = None  # seconds after the window end
    mode: str | None = None  # default: alert
    session_rule: str = "union"  # how an envelope element's distinct sessions are counted

    def validate(self) -> None:
        if self.closure not in CLOSURES:
            raise DeriveError(f"unknown closure {self.closure!r} (want one of {', '.join(CLOSURES)})")
        if not self.substrates:
            raise DeriveError("no substrates selected (want some of syscall, egress, exec)")
        for s in self.substrates:
            if s not in SUBSTRATES:
                raise DeriveError(f"unknown substrate {s!r} (want some of {', '.join(SUBSTRATES)})")
        for name, table in (("min-count", self.min_count), ("min-sessions", self.min_sessions)):
            for s in SUBSTRATES:
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


# ---- evidence -------------------------------------------------------------------------------


@dataclass
class Element:
    """One unit the confidence rule judges: a literal behaviour or an envelope around several."""

    id: str
    substrate: str
    rule: str
    members: list[str]
    detail: str = ""
    flags: tuple[str, ...] = ()
    # what the element allows, by substrate
    syscalls: tuple[str, ...] = ()
    egress: EgressRule | None = None
    exec: str | None = None
    encodable: bool = True

    def evidence(self, stats: Mapping[str, BehaviourStats], session_rule: str = "union") -> dict:
        ss = [stats[m] for m in self.members]
        if session_rule == "sum":
            sessions = sum(s.sessions for s in ss)
        elif session_rule == "union":
            union = len(set().union(*(s.session_ids for s in ss)))
            exact = all(s.sessions_complete for s in ss)
            sessions = union if exact else max([union] + [s.sessions for s in ss])
        else:
            sessions = max((s.sessions for s in ss), default=0)
        return {
            "count": sum(s.count for s in ss),
            "sessions": sessions,
            "firstSeen": iso_time(min(s.first_seen for s in ss)),
            "lastSeen": iso_time(max(s.last_seen for s in ss)),
            "behaviours": sorted(self.members),
        }


def substrate_or_none(key: str) -> str | None:
    """The substrate of a behaviour key, or None for a kind no substrate encodes yet (``dns:...``)."""
    try:
        return substrate_of(key)
    except BehaviourKeyError:
        return None


def _addr_text(ip) -> str:
    return ip.compressed


def _aggregate(ip, opts: DeriveOptions, services: list) -> tuple[object, str]:
    for net in services:
        if net.version == ip.version and ip in net:
            return net, "service-cidr"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        # An IPv4 peer reached through a dual-stack socket (::ffff:a.b.c.d): widen it like IPv4,
        # inside ::ffff:0:0/96, never to a /64 that would span every mapped IPv4 address.
        return ipaddress.ip_network(f"{ip}/{96 + opts.ipv4_prefix}", strict=False), "cidr-prefix"
    prefix = opts.ipv4_prefix if ip.version == 4 else opts.ipv6_prefix
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False), "cidr-prefix"


def _literal_elements(substrate: str, keys: list[str]) -> list[Element]:
    out: list[Element] = []
    if substrate == "syscall":
        for k in keys:
            name = k.split(":", 1)[1]
            out.append(Element(k, substrate, "literal", [k], syscalls=(name,),
                               encodable=bool(_SYSCALL_RE.match(name))))
    elif substrate == "exec":
        for k in keys:
            path = k.split(":", 1)[1]
            out.append(Element(k, substrate, "literal", [k], exec=path, encodable=_exec_encodable(path)))
    else:
        groups: dict[tuple, list[str]] = {}
        bad: list[str] = []
        for k in keys:
            try:
                n = parse_net_key(k)
            except BehaviourKeyError:
                bad.append(k)
                continue
            host = ipaddress.ip_network(n.addr)
            groups.setdefault((n.proto, host.version, int(host.network_address), host.prefixlen, n.port, host),
                              []).append(k)
        for (proto, _, _, _, port, host), members in sorted(groups.items(), key=lambda kv: kv[0][:5]):
            rule = EgressRule(proto, host.compressed, (port,))
            out.append(Element(rule.id, substrate, "literal", sorted(members), egress=rule))
        out += [Element(k, substrate, "literal", [k], encodable=False) for k in bad]
    return out


def _exec_encodable(path: str) -> bool:
    return path.startswith("/") and "*" not in path and not path.endswith("/")


def _structural_elements(substrate: str, keys: list[str], opts: DeriveOptions,
                         services: list) -> list[Element]:
    out: list[Element] = []
    if substrate == "syscall":
        grouped: dict[str, list[str]] = {}
        for k in keys:
            name = k.split(":", 1)[1]
            g = companions.group_of(name)
            if g is None:
                out.append(Element(k, substrate, "exact", [k], syscalls=(name,),
                                   encodable=bool(_SYSCALL_RE.match(name))))
            else:
                grouped.setdefault(g.name, []).append(k)
        for gname, members in sorted(grouped.items()):
            g = companions.BY_NAME[gname]
            seen = ", ".join(m.split(":", 1)[1] for m in sorted(members))
            out.append(Element(f"syscall-group:{gname}", substrate, f"companion-group:{gname}", sorted(members),
                               detail=f"seen {seen}; admits {', '.join(g.members)} ({g.reason})",
                               syscalls=g.members))
    elif substrate == "exec":
        by_dir: dict[str, list[str]] = {}
        for k in keys:
            path = k.split(":", 1)[1]
            if not _exec_encodable(path):
                out.append(Element(k, substrate, "exact", [k], exec=path, encodable=False))
                continue
            by_dir.setdefault(posixpath.dirname(path), []).append(k)
        for d, members in sorted(by_dir.items()):
            if len(members) > opts.max_siblings:
                pattern = d.rstrip("/") + "/*"
                out.append(Element(f"exec:{pattern}", substrate, "directory-pattern", sorted(members),
                                   detail=f"{len(members)} sibling paths in {d} (more than {opts.max_siblings})",
                                   flags=("directory-pattern",), exec=pattern))
            else:
                out += [Element(k, substrate, "exact", [k], exec=k.split(":", 1)[1]) for k in sorted(members)]
    else:
        nets: dict[tuple, dict[int, list[str]]] = {}
        addrs: dict[tuple, set] = {}
        how: dict[tuple, str] = {}
        netobj: dict[tuple, object] = {}
        bad: list[str] = []
        for k in keys:
            try:
                n = parse_net_key(k)
            except BehaviourKeyError:
                bad.append(k)
                continue
            net, rule = _aggregate(n.addr, opts, services)
            nk = (n.proto, net.version, int(net.network_address), net.prefixlen)
            nets.setdefault(nk, {}).setdefault(n.port, []).append(k)
            addrs.setdefault(nk, set()).add(n.addr)
            how[nk] = rule
            netobj[nk] = net
        for nk in sorted(nets):
            proto, version = nk[0], nk[1]
            net = netobj[nk]
            cidr = net.compressed
            ports = nets[nk]
            seen_addrs = sorted(addrs[nk], key=int)
            shown = ", ".join(_addr_text(a) for a in seen_addrs[:8]) + (
                f" and {len(seen_addrs) - 8} more" if len(seen_addrs) > 8 else "")
            addr_rule = how[nk]
            if addr_rule == "service-cidr":
                addr_detail = f"{shown} inside known service CIDR {cidr}"
            elif version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
                addr_detail = (f"{shown} (IPv4-mapped) aggregated to {cidr} (IPv4 prefix "
                               f"/{opts.ipv4_prefix} inside ::ffff:0:0/96)")
            else:
                p = opts.ipv4_prefix if version == 4 else opts.ipv6_prefix
                addr_detail = f"{shown} aggregated to {cidr} (IPv{version} prefix /{p})"
            if len(ports) > opts.max_ports:
                lo, hi = min(ports), max(ports)
                rule = EgressRule(proto, cidr, (), (lo, hi))
                members = sorted(k for ks in ports.values() for k in ks)
                out.append(Element(rule.id, substrate, f"{addr_rule}+port-range", members,
                                   detail=f"{addr_detail}; {len(ports)} distinct ports (more than "
                                          f"{opts.max_ports}) widened to {lo}-{hi}",
                                   flags=("port-range",), egress=rule))
            else:
                for port in sorted(ports):
                    rule = EgressRule(proto, cidr, (port,))
                    out.append(Element(rule.id, substrate, f"{addr_rule}+exact-ports", sorted(ports[port]),
                                       detail=addr_detail, egress=rule))
        out += [Element(k, substrate, "exact", [k], encodable=False) for k in bad]
    return out


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


# ---- derivation -----------------------------------------------------------------------------


def derive(profile: Profile, options: DeriveOptions | None = None) -> Policy:
    """Derive the least-privilege policy for ``profile``. Pure and deterministic."""
    opts = options or DeriveOptions()
    opts.validate()
    services = service_networks(opts.service_cidrs)
    stats = profile.behaviours()
    if not stats:
        raise DeriveError(f"the profile of {profile.workload.key} has no behaviours; nothing to derive from")
    _, end = profile.window()

    cov = coverage(profile, opts, stats)
    if not cov["reached"] and not opts.force:
        raise CoverageNotReached(coverage_message(profile.workload.key, cov), cov)
    low_confidence = not cov["reached"]

    per_sub: dict[str, list[str]] = {s: [] for s in opts.substrates}
    unsupported: dict[str, int] = {}
    for k in stats:
        sub = substrate_or_none(k)
        if sub is None:
            kind = k.split(":", 1)[0]
            unsupported[kind] = unsupported.get(kind, 0) + 1
        elif sub in per_sub:
            per_sub[sub].append(k)

    elements: list[Element] = []
    for sub in opts.substrates:
        keys = sorted(per_sub[sub])
        if opts.closure == "literal":
            elements += _literal_elements(sub, keys)
        else:
            elements += _structural_elements(sub, keys, opts, services)

    # ---- confidence ---------------------------------------------------------------------
    admits = {}
    for key, reason in opts.admits:
        admits[key] = reason.strip()
    passed: list[tuple[Element, dict, str | None]] = []  # (element, evidence, admit reason)
    failed: list[tuple[Element, dict]] = []
    for el in elements:
        ev = el.evidence(stats, opts.session_rule)
        n, m = opts.min_count[el.substrate], opts.min_sessions[el.substrate]
        if el.encodable and ev["count"] >= n and ev["sessions"] >= m:
            passed.append((el, ev, None))
        else:
            failed.append((el, ev))

    used_admits: set[str] = set()
    still_failed: list[tuple[Element, dict]] = []
    literal_admits: list[tuple[Element, dict, str]] = []
    for el, ev in failed:
        if el.id in admits:
            if not el.encodable:
                raise DeriveError(f"--admit {el.id}: this behaviour cannot be encoded in a policy")
            passed.append((el, ev, admits[el.id]))
            used_admits.add(el.id)
            continue
        still_failed.append((el, ev))
        for member in el.members:
            if member in admits and member != el.id:
                lit = _literal_elements(el.substrate, [member])[0]
                if not lit.encodable:
                    raise DeriveError(f"--admit {member}: this behaviour cannot be encoded in a policy")
                literal_admits.append((lit, lit.evidence(stats, opts.session_rule), admits[member]))
                used_admits.add(member)
    passed += literal_admits
    for key in sorted(admits):
        if key in used_admits:
            continue
        if any(key == el.id or key in el.members for el, _, _ in passed):
            raise DeriveError(f"--admit {key}: already allowed by the evidence; nothing to admit")
        review_keys = sorted({el.id for el, _ in still_failed})
        hint = f" (review items: {', '.join(review_keys[:10])}{' ...' if len(review_keys) > 10 else ''})" \
            if review_keys else " (the review list is empty)"
        raise DeriveError(f"--admit {key}: not in the review list{hint}")

    # ---- allowed set and provenance -----------------------------------------------------
    syscalls: set[str] = set()
    egress: dict[tuple, EgressRule] = {}
    execs: set[str] = set()
    provenance: list[dict] = []
    for el, ev, reason in passed:
        base = {
            "substrate": el.substrate,
            "rule": el.rule,
            "admitted": "admit" if reason is not None else "threshold",
            "evidence": ev,
        }
        if reason is not None:
            base["reason"] = reason
        if el.detail:
            base["detail"] = el.detail
        if el.flags:
            base["flags"] = list(el.flags)
        if el.id.startswith("syscall-group:"):
            base["element"] = el.id
        if el.syscalls:
            seen = {m.split(":", 1)[1] for m in el.members}
            for name in el.syscalls:
                syscalls.add(name)
                provenance.append({"entry": f"syscall:{name}", "observed": name in seen, **base})
        elif el.egress is not None:
            r = el.egress
            if r.port_range is not None:
                egress[(r.proto, r.cidr, "range", r.port_range)] = r
            else:
                key = (r.proto, r.cidr, "ports", ())
                prev = egress.get(key)
                egress[key] = r if prev is None else EgressRule(r.proto, r.cidr, prev.ports + r.ports)
            provenance.append({"entry": el.id, "observed": True, **base})
        elif el.exec is not None:
            execs.add(el.exec)
            provenance.append({"entry": f"exec:{el.exec}", "observed": True, **base})
    provenance.sort(key=lambda p: (p["entry"], p["rule"]))
    provenance = _dedupe_provenance(provenance)

    mode = opts.mode or "alert"
    policy = Policy(
        workload=profile.workload, mode=mode, substrates=tuple(opts.substrates), closure=opts.closure,
        syscalls=tuple(syscalls), egress=tuple(egress.values()), execs=tuple(execs),
        provenance=tuple(provenance), low_confidence=low_confidence,
    )

    # ---- review and watch: what the final allowed set still leaves out ------------------
    review: list[dict] = []
    watch: set[str] = set()
    for el, _ in still_failed:
        left = [m for m in el.members if not policy.allows(m)]
        if not left:
            continue
        n, m = opts.min_count[el.substrate], opts.min_sessions[el.substrate]
        sub_el = Element(el.id, el.substrate, el.rule, left)
        ev = sub_el.evidence(stats, opts.session_rule)
        if not el.encodable:
            why = "cannot be encoded by this substrate"
        else:
            short = []
            if ev["count"] < n:
                short.append(f"count {ev['count']} < {n}")
            if ev["sessions"] < m:
                short.append(f"sessions {ev['sessions']} < {m}")
            why = "; ".join(short) or "below threshold"
        item = {"key": el.id, "substrate": el.substrate, "rule": el.rule, "evidence": ev,
                "threshold": {"minCount": n, "minSessions": m}, "why": why}
        if el.detail:
            item["detail"] = el.detail
        review.append(item)
        watch.update(left)
    review.sort(key=lambda r: r["key"])

    # ---- probabilistic: per-behaviour rate distribution as soft detection rules ---------
    detection: list[dict] = []
    closed = profile.closed_sessions
    if opts.closure == "probabilistic" and closed:
        for k, s in stats.items():
            if substrate_or_none(k) in opts.substrates and policy.allows(k):
                mean = s.session_sum / closed
                std = math.sqrt(max(s.session_sumsq / closed - mean * mean, 0.0))
                detection.append({"key": k, "mean": round(mean, 6), "std": round(std, 6),
                                  "k": float(opts.k), "sessions": closed})

    policy.review = tuple(review)
    policy.watch = tuple(sorted(watch))
    policy.detection = tuple(detection)
    policy.decisions = _decisions(opts, elements, passed, cov, closed)
    if unsupported:
        # observed, but of a kind no substrate can encode yet: recorded, not silently dropped
        policy.decisions["granularity"]["unencoded"] = dict(sorted(unsupported.items()))
    policy.validity = _validity(profile, opts, end)
    return policy


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


def _decisions(opts: DeriveOptions, elements: list[Element], passed: list, cov: dict, closed: int) -> dict:
    subs = list(opts.substrates)
    if opts.closure == "literal":
        rules = {s: {"rule": "literal"} for s in subs}
    else:
        rules = {}
        if "syscall" in subs:
            rules["syscall"] = {"rule": "exact+companion-groups"}
        if "egress" in subs:
            rules["egress"] = {
                "address": {"rule": "cidr-prefix", "ipv4Prefix": opts.ipv4_prefix,
                            "ipv6Prefix": opts.ipv6_prefix,
                            "serviceCidrs": [n.compressed for n in service_networks(opts.service_cidrs)]},
                "ports": {"rule": "exact-ports", "rangeAbove": opts.max_ports},
            }
        if "exec" in subs:
            rules["exec"] = {"rule": "directory-pattern", "siblingsAbove": opts.max_siblings}
    closure: dict = {"mode": opts.closure, "rules": rules}
    if opts.closure != "literal":
        used = sorted({el.rule.split(":", 1)[1] for el, _, _ in passed if el.rule.startswith("companion-group:")})
        closure["companionGroups"] = [companions.BY_NAME[g].to_dict() for g in used]
        widened = sorted(el.id for el, _, _ in passed if el.flags)
        if widened:
            closure["flagged"] = widened
    if opts.closure == "probabilistic":
        closure["detection"] = {
            "k": float(opts.k),
            "rule": "soft violation when a session's count of an allowed behaviour is more than k "
                    "standard deviations from its observed per-session mean",
            "closedSessions": closed,
        }
    return {
        "granularity": {"substrates": subs,
                        "excluded": [s for s in SUBSTRATES if s not in subs]},
        "closure": closure,
        "confidence": {
            "minCount": {s: opts.min_count[s] for s in subs},
            "minSessions": {s: opts.min_sessions[s] for s in subs},
            "sessionRule": {"rule": opts.session_rule, "meaning": SESSION_RULES[opts.session_rule]},
            "admits": len([1 for _, _, r in passed if r is not None]),
            "coverage": cov,
        },
    }


def _validity(profile: Profile, opts: DeriveOptions, end: float | None) -> dict:
    fp = {k: list(v) for k, v in profile.fingerprints().items()}
    for k, v in sorted(opts.fingerprint.items()):
        fp[k] = [v]
    triggers = [{"name": trigger_name(k), "key": k, "source": "fingerprint"}
                for k in sorted(fp) if k not in INFORMATIONAL_FINGERPRINTS]
    tracked = {trigger_name(k) for k in fp if k not in INFORMATIONAL_FINGERPRINTS}
    dimensions = {"image": "image-change", "model": "model-version-change",
                  "prompt_template": "prompt-template-change", "tool_catalog": "tool-catalog-change",
                  "identity": "identity-scope-change"}
    out: dict = {
        "fingerprint": dict(sorted(fp.items())),
        "triggers": triggers,
        "untracked": [k for k, t in dimensions.items() if t not in tracked],
        "derivedAt": iso_time(end),
        "expiresAt": None,
    }
    if opts.expires_in is not None and end is not None:
        out["expiresAt"] = iso_time(end + opts.expires_in)
        triggers.append({"name": "expiry", "source": "time", "at": out["expiresAt"]})
    return out


# ---- option parsing shared by the CLI -------------------------------------------------------


def parse_thresholds(values: Iterable[str] | None, default: int, what: str) -> dict[str, int]:
    """``["5"]`` sets every substrate; ``["egress=2"]`` one. Later values win."""
    out = {s: default for s in SUBSTRATES}
    for raw in values or ():
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            sub, eq, num = part.rpartition("=")
            try:
                n = int(num)
            except ValueError:
                raise DeriveError(f"{what}: {part!r} is not an integer (use N or SUBSTRATE=N)") from None
            if n < 0:
                raise DeriveError(f"{what}: {n} is negative; thresholds must be 0 or more")
            if eq:
                if sub not in SUBSTRATES:
                    raise DeriveError(f"{what}: unknown substrate {sub!r} (want one of {', '.join(SUBSTRATES)})")
                out[sub] = n
            else:
                out = {s: n for s in SUBSTRATES}
    return out


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90m``, ``36h``, ``14d``, ``2w`` → seconds."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise DeriveError(f"duration {text!r} not understood (want e.g. 90m, 36h, 14d, 2w)")
    v = float(m.group(1)) * _UNIT[m.group(2)]
    if v <= 0:
        raise DeriveError(f"duration {text!r} must be positive")
    return v


def parse_pairs(values: Iterable[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in values or ():
        k, eq, v = str(raw).partition("=")
        if not eq or not k.strip():
            raise DeriveError(f"{what}: {raw!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


__all__ = [
    "CoverageNotReached", "DeriveError", "DeriveOptions", "coverage", "coverage_message", "derive",
    "parse_duration", "parse_pairs", "parse_thresholds", "PolicyError",
]
