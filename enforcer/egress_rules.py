"""Egress rules as the enforcement programs read them: the pure compile layer of ``bpf/egress.c``.

:func:`compile_rules` lays out a policy's :class:`enforcer.policy.EgressRule`\\ s and
:class:`enforcer.names.NameRule`\\ s as the map entries of one generation (address trie keys
and values per family, exact-port keys beyond the inline ones, name trie keys and values),
packed with the mirrors of ``bpf/egress.h`` (:mod:`sensor.mirrors`). It is pure and
deterministic: the same rules give byte-identical entries, sorted. Loading, pinning and writing
the entries into the kernel is :mod:`enforcer.egress`.

Layout. ``rules4_<gen>`` and ``rules6_<gen>`` are LPM tries keyed by the address alone. Each
network gets one entry holding the TCP and the UDP ports of every rule for it and of every
shorter prefix that covers it, so the kernel's single longest-prefix match decides alone: "any
port", up to ``max_ranges`` ranges and up to ``EGRESS_INLINE_PORTS`` exact ports inline (one
lookup answers address and port together); exact ports beyond those go to the ``ports`` hash
keyed by ``{rule id, port}``. ``names_<gen>`` holds the allowed names backwards
(:func:`enforcer.names.reversed_key`), with the ports the folded
:class:`enforcer.names.NameTable` gives them. The state word (generation | mode << 8 | names
<< 16) selects the active generation, the mode and whether any name is allowed in one 32-bit
map value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from sensor.mirrors import (
    EGRESS_INLINE_PORTS, EGRESS_MAX_RANGES, EGRESS_MODE_ALERT, EGRESS_MODE_ENFORCE,
    EGRESS_MODE_OBSERVE, EGRESS_NAME_EXACT, EGRESS_NAME_LEN, EGRESS_NAME_SUFFIX, EGRESS_PORTS_ANY,
    EGRESS_PORTS_MORE, EgressKey4, EgressKey6, EgressNameKey, EgressPortKey,
    egress_name_rule_struct, egress_rule_struct,
)
from sensor.workload import BehaviourKeyError, parse_name_key, parse_net_key

from .modes import check_mode
from .names import NameRule, NameTable, Ports, reversed_key
from .policy import EgressRule, Policy, PolicyError, parse_entry

MODE_CODES = {"observe": EGRESS_MODE_OBSERVE, "alert": EGRESS_MODE_ALERT,
              "enforce": EGRESS_MODE_ENFORCE}
MODE_NAMES = {v: k for k, v in MODE_CODES.items()}
PROTO_NUMBERS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
STATE_NAMES = 1 << 16
DNS_GRACE_SECONDS = 10.0  # bpf/egress.c EGRESS_DNS_GRACE_NS: a learned address outlives its TTL by this


class EgressRuleError(ValueError):
    """Rules that cannot be laid out (a protocol the programs do not judge, capacity)."""


@dataclass(frozen=True)
class Limits:
    """Map capacities and DNS learning parameters; passed to the C file as ``-D`` flags."""

    max_rules: int = 16384  # entries per address trie (family) and generation
    max_ports: int = 262144  # exact (rule, port) entries beyond the inline ones (allocated on use)
    max_ranges: int = EGRESS_MAX_RANGES  # port ranges per protocol of an entry
    max_names: int = 4096  # entries per name trie and generation
    max_learned: int = 65536  # learned (cgroup, address, protocol, port) entries (LRU)
    dns_grace: float = DNS_GRACE_SECONDS  # seconds a learned address outlives its TTL
    dns_max_answers: int = 32  # answer records parsed per DNS response
    max_cgroups: int = 1024
    ringbuf_pages: int = 16  # 64 KiB: ~1,000 violation records between drains; mapped twice per set

    def cflags(self) -> list[str]:
        return [f"-DEGRESS_MAX_RULES={self.max_rules}", f"-DEGRESS_MAX_PORTS={self.max_ports}",
                f"-DEGRESS_MAX_RANGES={self.max_ranges}", f"-DEGRESS_MAX_NAMES={self.max_names}",
                f"-DEGRESS_MAX_LEARNED={self.max_learned}",
                f"-DEGRESS_DNS_GRACE_NS={int(self.dns_grace * 1e9)}ULL",
                f"-DEGRESS_DNS_MAX_ANSWERS={self.dns_max_answers}",
                f"-DEGRESS_MAX_CGROUPS={self.max_cgroups}",
                f"-DEGRESS_RINGBUF_PAGES={self.ringbuf_pages}"]


@dataclass
class PortSet:
    any_port: bool = False
    ranges: set[tuple[int, int]] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)

    def add(self, other: "PortSet") -> None:
        self.any_port |= other.any_port
        self.ranges |= other.ranges
        self.ports |= other.ports

    def normalised(self, max_ranges: int, what: str) -> tuple[bool, tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Merge overlapping ranges, drop ports inside ranges, expand small ranges if too many."""
        if self.any_port:
            return True, (), ()
        merged: list[list[int]] = []
        for lo, hi in sorted(self.ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if any(lo <= 1 and hi >= 65535 for lo, hi in merged):
            return True, (), ()
        ports = set(self.ports)
        while len(merged) > max_ranges:
            # Turn the narrowest range into exact ports until the rest fit.
            i = min(range(len(merged)), key=lambda j: (merged[j][1] - merged[j][0], merged[j][0]))
            lo, hi = merged.pop(i)
            if hi - lo > 1024:
                raise EgressRuleError(f"{what}: more than {max_ranges} wide port ranges after merging")
            ports.update(range(lo, hi + 1))
        ranges = tuple((lo, hi) for lo, hi in merged)
        ports = {p for p in ports if not any(lo <= p <= hi for lo, hi in ranges)}
        return False, ranges, tuple(sorted(ports))


@dataclass(frozen=True)
class CompiledRules:
    """Map entries for one generation."""

    generation: int
    trie4: tuple[tuple[bytes, bytes], ...]
    trie6: tuple[tuple[bytes, bytes], ...]
    ports: tuple[bytes, ...]  # exact ports beyond the inline ones
    names: tuple[tuple[bytes, bytes], ...] = ()
    name_ids: dict = field(default_factory=dict)  # name_id -> pattern
    count: int = 0  # address entries (both families)

    @property
    def trie(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.trie4 + self.trie6


def _net_of(rule) -> tuple[str, ipaddress._BaseNetwork, PortSet]:
    net = ipaddress.ip_network(rule.cidr, strict=False)
    ps = PortSet()
    if rule.port_range is not None:
        ps.ranges.add(tuple(rule.port_range))
    else:
        ps.ports.update(rule.ports)
    return rule.proto, net, ps


def _pack_ports(ps: PortSet, rule_id: int, limits: Limits, what: str, spill: list,
                allow_spill: bool = True) -> list:
    """The fields of one struct egress_ports; exact ports past the inline ones go to ``spill``."""
    any_port, ranges, ports = ps.normalised(limits.max_ranges, what)
    inline, more = ports[:EGRESS_INLINE_PORTS], ports[EGRESS_INLINE_PORTS:]
    if more and not allow_spill:
        raise EgressRuleError(f"{what}: more than {EGRESS_INLINE_PORTS} exact ports; give a "
                              f"port range")
    flags = (EGRESS_PORTS_ANY if any_port else 0) | (EGRESS_PORTS_MORE if more else 0)
    spill.extend(EgressPortKey.pack_tuple(rule_id, p, 0) for p in more)
    flat: list[int] = [rule_id, flags, len(inline), len(ranges), 0]
    flat += list(inline) + [0] * (EGRESS_INLINE_PORTS - len(inline))
    for lo, hi in ranges:
        flat += [lo, hi]
    flat += [0, 0] * (limits.max_ranges - len(ranges))
    return flat


def _name_ports(p: Ports) -> PortSet:
    return PortSet(False, set(p.ranges), set(p.exact))


def compile_rules(rules: Iterable, generation: int, limits: Limits = Limits(),
                  names: Iterable[NameRule] = ()) -> CompiledRules:
    """Lay out address rules and name rules as map entries for ``generation`` (0 or 1).

    Each (family, network) gets one trie entry whose port sets also hold the ports of every
    shorter prefix that covers it, so the kernel's single longest-prefix match decides alone.
    Output is sorted and deterministic.
    """
    if generation not in (0, 1):
        raise ValueError(f"generation must be 0 or 1, got {generation}")
    table: dict[tuple[int, int, int], dict[str, PortSet]] = {}
    for r in rules:
        proto, net, ps = _net_of(r)
        if proto not in PROTO_NUMBERS:
            raise EgressRuleError(f"egress rule {r}: protocol {proto!r} is not tcp or udp")
        k = (net.version, int(net.network_address), net.prefixlen)
        table.setdefault(k, {"tcp": PortSet(), "udp": PortSet()})[proto].add(ps)
    # Fold covering prefixes in: for each entry look up every shorter prefix of itself.
    folded: dict[tuple[int, int, int], dict[str, PortSet]] = {}
    for (ver, addr, plen), per in table.items():
        total = {"tcp": PortSet(), "udp": PortSet()}
        width = 32 if ver == 4 else 128
        for shorter in range(plen + 1):
            mask = ((1 << shorter) - 1) << (width - shorter) if shorter else 0
            anc = table.get((ver, addr & mask, shorter))
            if anc is not None:
                for proto in total:
                    total[proto].add(anc[proto])
        folded[(ver, addr, plen)] = total
    for ver in (4, 6):
        n = sum(1 for k in folded if k[0] == ver)
        if n > limits.max_rules:
            raise EgressRuleError(f"{n} IPv{ver} egress CIDR entries exceed the map capacity "
                                  f"({limits.max_rules} per generation; raise Limits.max_rules)")
    rs = egress_rule_struct(limits.max_ranges)
    trie4: list[tuple[bytes, bytes]] = []
    trie6: list[tuple[bytes, bytes]] = []
    spill: list[bytes] = []
    idx = 0
    for k in sorted(folded, key=lambda k: (k[0], k[2], k[1])):
        ver, addr, plen = k
        flat: list[int] = []
        for proto in ("tcp", "udp"):
            idx += 1
            rule_id = (generation << 24) | idx
            flat += _pack_ports(folded[k][proto], rule_id, limits,
                                f"{proto} {ipaddress.ip_address(addr)}/{plen}", spill)
        if ver == 4:
            trie4.append((EgressKey4.pack_tuple(plen, addr.to_bytes(4, "big")), rs.pack(*flat)))
        else:
            trie6.append((EgressKey6.pack_tuple(plen, addr.to_bytes(16, "big")), rs.pack(*flat)))
    if len(spill) * 2 > limits.max_ports:
        raise EgressRuleError(f"{len(spill)} exact egress ports exceed the map capacity "
                              f"({limits.max_ports // 2} per generation; raise Limits.max_ports)")
    name_entries, name_ids = _compile_names(names, generation, limits)
    return CompiledRules(generation, tuple(trie4), tuple(trie6), tuple(spill),
                         name_entries, name_ids, len(folded))


def _compile_names(names: Iterable[NameRule], generation: int, limits: Limits
                   ) -> tuple[tuple[tuple[bytes, bytes], ...], dict]:
    nt = NameTable(names)
    if len(nt.entries) > limits.max_names:
        raise EgressRuleError(f"{len(nt.entries)} name entries exceed the map capacity "
                              f"({limits.max_names} per generation; raise Limits.max_names)")
    ns = egress_name_rule_struct(limits.max_ranges)
    out: list[tuple[bytes, bytes]] = []
    ids: dict[int, str] = {}
    for i, e in enumerate(sorted(nt.entries, key=lambda e: reversed_key(e.pattern)), 1):
        key = reversed_key(e.pattern)
        if len(key) > EGRESS_NAME_LEN - 1:
            raise EgressRuleError(f"name {e.pattern!r} is too long for the names trie")
        name_id = (generation << 24) | i
        flat: list[int] = []
        for proto in ("tcp", "udp"):
            flat += _pack_ports(_name_ports(e.ports[proto]), name_id, limits,
                                f"{proto} name {e.pattern}", [], allow_spill=False)
        kind = EGRESS_NAME_SUFFIX if e.wildcard else EGRESS_NAME_EXACT
        flat += [name_id, kind, e.max_labels if e.wildcard else 0,
                 e.base.count(".") + 1 if e.wildcard else 0]
        out.append((EgressNameKey.pack_tuple(len(key) * 8, key.ljust(EGRESS_NAME_LEN, b"\0")),
                    ns.pack(*flat)))
        ids[name_id] = e.pattern
    return tuple(out), ids


def state_word(generation: int, mode: str, names: bool = False) -> int:
    return (STATE_NAMES if names else 0) | (MODE_CODES[mode] << 8) | generation


def split_state_word(word: int) -> tuple[int, str]:
    return word & 0xFF, MODE_NAMES.get((word >> 8) & 0xFF, "observe")


# ---- what a policy asks of the egress programs ----------------------------------------------


def exception_rules(exceptions: Iterable) -> list[EgressRule]:
    """Egress rules for active exceptions whose key is a network behaviour or an egress entry."""
    out: list[EgressRule] = []
    for e in exceptions:
        allow = e.allow
        if allow.startswith("egress:"):
            out.append(parse_entry(allow)[1])
            continue
        if allow.startswith("name:"):
            continue
        if not allow.startswith(("connect:", "send:")):
            continue
        try:
            net = parse_net_key(allow)
        except BehaviourKeyError:
            continue
        width = 32 if net.addr.version == 4 else 128
        out.append(EgressRule(net.proto, f"{net.addr.compressed}/{width}", (net.port,)))
    return out


def egress_mode(policy: Policy, mode: str) -> str:
    """A substrate the policy leaves out is not constrained: its programs only observe."""
    check_mode(mode, "mode", PolicyError)
    return mode if "egress" in policy.substrates else "observe"


def exception_names(exceptions: Iterable) -> list[NameRule]:
    """Name rules for active exceptions given as a name entry or a name behaviour."""
    out: list[NameRule] = []
    for e in exceptions:
        allow = e.allow
        if allow.startswith("name:"):
            out.append(parse_entry(allow)[1])
        elif allow.startswith("dns:"):
            out.append(NameRule(allow[4:]))
        elif allow.startswith(("connect:", "send:")):
            try:
                n = parse_name_key(allow)
            except BehaviourKeyError:
                continue
            out.append(NameRule(n.name, n.proto, (n.port,)))
    return out


def effective_rules(policy: Policy, exceptions: Iterable = ()) -> list[EgressRule]:
    """What the programs let through: the policy's rules, review items its review action lets
    through (literal destinations, reported from the watch list), and active exceptions."""
    admitted = policy.review_admitted()
    review = list(admitted.egress) if admitted is not None else []
    return list(policy.egress) + review + exception_rules(exceptions)


def effective_names(policy: Policy, exceptions: Iterable = ()) -> list[NameRule]:
    return list(policy.names) + exception_names(exceptions)
