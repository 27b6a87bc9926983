"""Closure for names: how observed ``dns:NAME`` and ``connect:PROTO:NAME:PORT`` behaviours
become name entries of a policy (``allow.names``), each element naming its rule.

Rules, as recorded in provenance:

* ``exact-name``: a name stays itself (literal closure uses nothing else);
* ``name-suffix``: ``*.S`` for a suffix ``S`` under which more than ``max_siblings`` distinct
  names were observed, never at or above a public suffix (the Public Suffix List, ICANN and
  private sections, as shipped by the ``publicsuffixlist`` package: offline, no download), and
  admitting at most the number of labels in front of ``S`` that were observed there, capped at
  ``max_labels``: a wildcard also authorises data smuggled in DNS labels, so depth is never
  left open. Names deeper than the cap stay exact;
* ports, per protocol: ``exact-ports``, or ``port-range`` when more than ``max_ports`` distinct
  ports were seen for one entry (the address rules' convention).

A ``dns:NAME`` behaviour is a member of the element that admits its name (its queries are
evidence for it); a name only ever resolved, never connected to, becomes a resolve-only entry
(``name:NAME``). Pure and deterministic: keys and options in, sorted elements out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sensor.workload import BehaviourKeyError, parse_name_key

from .elements import Element
from .names import NameRule

DEFAULT_MAX_NAME_SIBLINGS = 3
DEFAULT_MAX_NAME_LABELS = 1


@lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


def public_suffix(name: str) -> str:
    """The public suffix of ``name`` (``co.uk`` for ``a.example.co.uk``; the last label for a
    name under no listed suffix, as the PSL's default rule says)."""
    return _psl().publicsuffix(name) or name.rsplit(".", 1)[-1]


def suffix_allowed(suffix: str) -> bool:
    """May ``*.suffix`` be a pattern? Only strictly below the public suffix it sits under."""
    ps = public_suffix(suffix)
    return suffix != ps and suffix.endswith("." + ps)


@dataclass
class NameOptions:
    max_siblings: int = DEFAULT_MAX_NAME_SIBLINGS
    max_labels: int = DEFAULT_MAX_NAME_LABELS
    max_ports: int = 4


def split(keys: list[str]) -> tuple[dict[str, dict[tuple[str, int], list[str]]], dict[str, str], list[str]]:
    """Name keys and dns keys by name: ``({name: {(proto, port): [keys]}}, {name: dns key},
    unparsed)``."""
    connects: dict[str, dict[tuple[str, int], list[str]]] = {}
    queries: dict[str, str] = {}
    bad: list[str] = []
    for k in keys:
        if k.startswith("dns:"):
            queries[k[4:]] = k
            continue
        try:
            n = parse_name_key(k)
        except BehaviourKeyError:
            bad.append(k)
            continue
        connects.setdefault(n.name, {}).setdefault((n.proto, n.port), []).append(k)
    return connects, queries, bad


def _groups(names: list[str], opts: NameOptions, structural: bool) -> dict[str, list[str]]:
    """pattern -> names it admits: ``*.S`` for suffixes with more than K names, the rest exact."""
    out: dict[str, list[str]] = {}
    left = set(names)
    if structural:
        candidates: dict[str, set[str]] = {}
        for n in names:
            labels = n.split(".")
            for extra in range(1, min(opts.max_labels, len(labels) - 1) + 1):
                candidates.setdefault(".".join(labels[extra:]), set()).add(n)
        # Longest suffix first: the narrowest pattern that earns its widening wins.
        for suffix in sorted(candidates, key=lambda s: (-s.count("."), s)):
            members = sorted(candidates[suffix] & left)
            if len(members) > opts.max_siblings and suffix_allowed(suffix):
                out[f"*.{suffix}"] = members
                left -= set(members)
    for n in sorted(left):
        out[n] = [n]
    return out


def elements(keys: list[str], opts: NameOptions, structural: bool) -> list[Element]:
    """The name elements of the egress substrate's name and dns keys."""
    connects, queries, bad = split(keys)
    out: list[Element] = []
    for pattern, names in sorted(_groups(sorted(set(connects) | set(queries)), opts, structural).items()):
        wild = pattern.startswith("*.")
        depth = max((n.count(".") - pattern.count(".") + 1 for n in names), default=1) if wild else 1
        name_rule = "name-suffix" if wild else "exact-name"
        detail_names = ""
        if wild:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            detail_names = (f"{len(names)} names under {pattern[2:]} (more than {opts.max_siblings}; "
                            f"public suffix {public_suffix(pattern[2:])}): {shown}; at most "
                            f"{depth} label(s) in front (cap {opts.max_labels})")
        dns_members = sorted(queries[n] for n in names if n in queries)
        by_proto: dict[str, dict[int, list[str]]] = {}
        for n in names:
            for (proto, port), ks in connects.get(n, {}).items():
                by_proto.setdefault(proto, {}).setdefault(port, []).extend(ks)
        if not by_proto:
            rule = NameRule(pattern, max_labels=depth)
            out.append(Element(rule.id, "egress", name_rule, dns_members, detail=detail_names,
                               flags=("name-suffix",) if wild else (), entries=(rule.id,)))
            continue
        first = True
        for proto in sorted(by_proto):
            ports = by_proto[proto]
            extra_members = dns_members if first else []
            first = False
            if structural and len(ports) > opts.max_ports:
                lo, hi = min(ports), max(ports)
                rule = NameRule(pattern, proto, (), (lo, hi), max_labels=depth)
                members = sorted(k for ks in ports.values() for k in ks) + extra_members
                detail = "; ".join(x for x in (detail_names, f"{len(ports)} distinct ports (more "
                                   f"than {opts.max_ports}) widened to {lo}-{hi}") if x)
                out.append(Element(rule.id, "egress", f"{name_rule}+port-range", sorted(members),
                                   detail=detail, flags=("port-range",) + (("name-suffix",) if wild else ()),
                                   entries=(rule.id,)))
                continue
            for port in sorted(ports):
                rule = NameRule(pattern, proto, (port,), max_labels=depth)
                members = sorted(ports[port]) + extra_members
                extra_members = []
                out.append(Element(rule.id, "egress", f"{name_rule}+exact-ports" if structural else name_rule,
                                   sorted(members), detail=detail_names,
                                   flags=("name-suffix",) if wild else (), entries=(rule.id,)))
    out += [Element(k, "egress", "exact", [k], encodable=False) for k in bad]
    return out
