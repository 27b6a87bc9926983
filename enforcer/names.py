"""Allowed names: the name entries of a policy (``allow.names``) and the one table that judges
them, for the policy (``Policy.allows``) and the kernel layout (:mod:`enforcer.egress_rules`)
alike, so the two can never disagree.

An entry allows one name (``api.example.com``) or a suffix pattern (``*.svc.example.com``, at
most ``maxLabels`` labels in front of ``svc.example.com``), optionally with a protocol and ports
to connect to: without them it only allows the name to be resolved (``dns:NAME``).

Matching, as ``bpf/egress.c`` does it: the most specific entry whose pattern is a suffix of the
name decides (an exact name beats any pattern, a longer suffix beats a shorter one); the name
must be within that entry's label limit, and the connect's protocol and port among its ports.
Entries of one pattern are merged: ports united, under the smallest label limit among them (a
merge never widens: a rule's ports never reach deeper names than its own limit). Ports of a covering,
less specific entry are folded into a more specific one only when every name the specific
entry matches is matched by the covering one too, so folding never widens anything.

Pure: no I/O; the same entries give the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from sensor.workload import valid_name

from . import ports as port_set

PROTOS = ("tcp", "udp")
DEFAULT_MAX_LABELS = 1


class NameRuleError(ValueError):
    """A name entry that does not make sense; the message names the field."""


def split_pattern(pattern: str) -> tuple[bool, str]:
    """``("*.svc.example.com")`` -> ``(True, "svc.example.com")``; an exact name -> ``(False, name)``."""
    if pattern.startswith("*."):
        return True, pattern[2:]
    return False, pattern


def check_pattern(pattern: Any, path: str = "name") -> str:
    if not isinstance(pattern, str) or not pattern:
        raise NameRuleError(f"{path}: missing or not a non-empty string")
    wild, base = split_pattern(pattern)
    if "*" in base or not valid_name(base):
        raise NameRuleError(f"{path}: {pattern!r} is not a lower-case host name or *.suffix pattern")
    if wild and "." not in base:
        raise NameRuleError(f"{path}: {pattern!r}: a pattern needs a suffix of at least two labels")
    return pattern


@dataclass(frozen=True)
class NameRule:
    """Allow ``pattern`` to be resolved, and, with ``proto``, connects to what it resolved to on
    ``ports`` or ``port_range``."""

    pattern: str
    proto: str | None = None
    ports: tuple[int, ...] = ()
    port_range: tuple[int, int] | None = None
    max_labels: int = DEFAULT_MAX_LABELS

    def __post_init__(self) -> None:
        check_pattern(self.pattern, "name")
        object.__setattr__(self, "ports", tuple(sorted(set(int(p) for p in self.ports))))
        if not isinstance(self.max_labels, int) or not 1 <= self.max_labels <= 16:
            raise NameRuleError(f"maxLabels: {self.max_labels!r} is not within 1-16")
        if self.proto is None:
            if self.ports or self.port_range:
                raise NameRuleError("ports: give proto with ports")
            return
        if self.proto not in PROTOS:
            raise NameRuleError(f"proto: {self.proto!r} is not one of {', '.join(PROTOS)}")
        try:
            ports, port_range = port_set.checked(self.ports, self.port_range)
        except port_set.PortsError as e:
            raise NameRuleError(str(e)) from None
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "port_range", port_range)

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")

    @property
    def port_text(self) -> str:
        return port_set.text(self.ports, self.port_range)

    @property
    def id(self) -> str:
        """``name:api.example.com`` (resolve only) or ``name:tcp:*.svc.example.com:443``."""
        if self.proto is None:
            return f"name:{self.pattern}"
        return f"name:{self.proto}:{self.pattern}:{self.port_text}"

    def sort_key(self) -> tuple:
        return (split_pattern(self.pattern)[1][::-1], self.pattern, self.proto or "",
                self.port_range or (0, 0), self.ports, self.max_labels)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.pattern}
        if self.wildcard:
            d["maxLabels"] = self.max_labels
        if self.proto is not None:
            d["proto"] = self.proto
            d.update(port_set.fields(self.ports, self.port_range))
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "names") -> "NameRule":
        if not isinstance(d, dict):
            raise NameRuleError(f"{path}: expected a mapping")
        for k in d:
            if k not in ("name", "maxLabels", "proto", "ports", "portRange"):
                raise NameRuleError(f"{path}.{k}: unknown field (expected one of name, maxLabels, "
                                    f"proto, ports, portRange)")
        pattern = check_pattern(d.get("name"), f"{path}.name")
        ml = d.get("maxLabels", DEFAULT_MAX_LABELS)
        if not isinstance(ml, int) or isinstance(ml, bool):
            raise NameRuleError(f"{path}.maxLabels: {ml!r} is not an integer")
        pr = d.get("portRange")
        port_range = None
        if pr is not None:
            if not isinstance(pr, dict) or set(pr) - {"min", "max"}:
                raise NameRuleError(f"{path}.portRange: expected {{min, max}}")
            port_range = (pr.get("min"), pr.get("max"))
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in port_range):
                raise NameRuleError(f"{path}.portRange: min and max must be integers")
        ports = d.get("ports") or []
        if not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                                   for p in ports):
            raise NameRuleError(f"{path}.ports: expected a list of port numbers")
        try:
            return cls(pattern, d.get("proto"), tuple(ports), port_range, ml)
        except NameRuleError as e:
            raise NameRuleError(f"{path}.{e}") from None


def parse_name_entry(entry: str) -> NameRule:
    """``name:api.example.com``, ``name:tcp:api.example.com:443`` or
    ``name:tcp:*.svc.example.com:8000-8100``."""
    body = entry.split(":", 1)[1] if entry.startswith("name:") else entry
    parts = body.split(":")
    try:
        if len(parts) == 1:
            return NameRule(parts[0])
        if len(parts) != 3:
            raise NameRuleError("want name:PATTERN or name:PROTO:PATTERN:PORTS")
        proto, pattern, ports = parts
        if "-" in ports:
            lo, hi = ports.split("-", 1)
            return NameRule(pattern, proto, (), (int(lo), int(hi)))
        return NameRule(pattern, proto, tuple(int(p) for p in ports.split(",")))
    except (ValueError, NameRuleError) as e:
        raise NameRuleError(f"bad name entry {entry!r}: {e}") from None


# ---- the table ------------------------------------------------------------------------------


@dataclass
class Ports:
    """Ports of one protocol: exact ports and inclusive ranges."""

    exact: set[int] = field(default_factory=set)
    ranges: set[tuple[int, int]] = field(default_factory=set)

    def add(self, other: "Ports") -> None:
        self.exact |= other.exact
        self.ranges |= other.ranges

    def allows(self, port: int) -> bool:
        return port in self.exact or any(lo <= port <= hi for lo, hi in self.ranges)


@dataclass
class NameEntry:
    """Every rule of one pattern, merged: what one trie entry holds."""

    pattern: str
    max_labels: int
    ports: dict[str, Ports]
    rules: list[NameRule]

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")

    @property
    def base(self) -> str:
        return split_pattern(self.pattern)[1]

    def covers(self, name: str) -> bool:
        """Does the pattern match ``name`` (label limit included)?"""
        if not self.wildcard:
            return name == self.pattern
        if not name.endswith("." + self.base):
            return False
        extra = name[: -len(self.base) - 1]
        return 1 <= extra.count(".") + 1 <= self.max_labels

    def covers_entry(self, other: "NameEntry") -> bool:
        """Is every name ``other`` matches matched by this entry too?"""
        if not other.wildcard:
            return self.covers(other.pattern)
        if not self.wildcard or not other.base.endswith("." + self.base):
            return False
        between = other.base[: -len(self.base) - 1].count(".") + 1
        return other.max_labels + between <= self.max_labels


def _labels(name: str) -> int:
    return name.count(".") + 1


class NameTable:
    """The merged, folded entries of a set of name rules (see the module docstring)."""

    def __init__(self, rules: Iterable[NameRule]):
        by_pattern: dict[str, NameEntry] = {}
        for r in sorted(set(rules), key=NameRule.sort_key):
            e = by_pattern.get(r.pattern)
            if e is None:
                e = by_pattern[r.pattern] = NameEntry(r.pattern, r.max_labels,
                                                      {p: Ports() for p in PROTOS}, [])
            e.max_labels = min(e.max_labels, r.max_labels)
            e.rules.append(r)
            if r.proto is not None:
                ps = e.ports[r.proto]
                if r.port_range is not None:
                    ps.ranges.add(r.port_range)
                else:
                    ps.exact.update(r.ports)
        own = {p: {proto: Ports(set(e.ports[proto].exact), set(e.ports[proto].ranges))
                   for proto in PROTOS} for p, e in by_pattern.items()}
        for e in by_pattern.values():
            for other in by_pattern.values():
                if other is not e and other.wildcard and other.covers_entry(e):
                    for proto in PROTOS:
                        e.ports[proto].add(own[other.pattern][proto])
        # Most specific first: exact names, then longer suffixes.
        self.entries: list[NameEntry] = sorted(
            by_pattern.values(), key=lambda e: (e.wildcard, -len(e.base), e.pattern))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def decide(self, name: str) -> NameEntry | None:
        """The entry that decides ``name``: the most specific whose pattern (label limit aside)
        is a suffix of it; None when that entry's label limit excludes the name."""
        for e in self.entries:
            if not e.wildcard:
                if e.pattern == name:
                    return e
            elif name.endswith("." + e.base):
                return e if e.covers(name) else None
        return None

    def allows_resolve(self, name: str) -> bool:
        return self.decide(name) is not None

    def allows_connect(self, name: str, proto: str, port: int) -> bool:
        e = self.decide(name)
        return e is not None and proto in e.ports and e.ports[proto].allows(port)


def reversed_key(pattern: str) -> bytes:
    """The names trie's key bytes: an exact name backwards with a NUL, a pattern's suffix
    backwards with its leading dot (``*.svc.example.com`` -> ``moc.elpmaxe.cvs.``)."""
    wild, base = split_pattern(pattern)
    if wild:
        return ("." + base)[::-1].encode()
    return base[::-1].encode() + b"\0"
