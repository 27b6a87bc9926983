"""Egress rules as the enforcement programs read them: the pure compile layer of ``bpf/egress.c``.

:func:`compile_rules` lays out a policy's :class:`enforcer.policy.EgressRule`\\ s as the map
entries of one rule generation (trie keys and values, exact-port keys), packed with the mirrors
of ``bpf/egress.h`` (:mod:`sensor.mirrors`). It is pure and deterministic: the same rules give
byte-identical entries, sorted. Loading, pinning and writing the entries into the kernel is
:mod:`enforcer.egress`.

Layout. ``rules`` is an LPM trie keyed by ``{prefixlen, generation, protocol, family, pad,
addr[16]}``: the 32 bits after ``prefixlen`` are always part of the prefix, the address bits
follow. Each (protocol, network) gets one entry whose port set also holds the ports of every
shorter prefix that covers it, so the kernel's single longest-prefix match decides alone.
Exact ports live in the ``ports`` hash keyed by ``{rule id, port}``; port ranges and "any port"
sit in the trie value. The state word (generation | mode << 8) selects the active generation
and the mode in one 32-bit map value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from sensor.mirrors import (
    EGRESS_FIXED_BITS, EGRESS_MAX_RANGES, EGRESS_MODE_ALERT, EGRESS_MODE_ENFORCE,
    EGRESS_MODE_OBSERVE, EgressKey, EgressPortKey, egress_rule_struct,
)
from sensor.workload import BehaviourKeyError, parse_net_key

from .modes import check_mode
from .policy import EgressRule, Policy, PolicyError, parse_entry

MODE_CODES = {"observe": EGRESS_MODE_OBSERVE, "alert": EGRESS_MODE_ALERT,
              "enforce": EGRESS_MODE_ENFORCE}
MODE_NAMES = {v: k for k, v in MODE_CODES.items()}
PROTO_NUMBERS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
FIXED_BITS = EGRESS_FIXED_BITS


class EgressRuleError(ValueError):
    """Rules that cannot be laid out (a protocol the programs do not judge, capacity)."""


@dataclass(frozen=True)
class Limits:
    """Map capacities; passed to the C file as ``-D`` flags."""

    max_rules: int = 32768  # trie entries, both generations together
    max_ports: int = 262144  # exact (rule, port) entries, both generations (allocated on use)
    max_ranges: int = EGRESS_MAX_RANGES  # port ranges per trie entry
    max_cgroups: int = 1024
    ringbuf_pages: int = 16  # 64 KiB: ~1,000 violation records between drains; mapped twice per set

    def cflags(self) -> list[str]:
        return [f"-DEGRESS_MAX_RULES={self.max_rules}", f"-DEGRESS_MAX_PORTS={self.max_ports}",
                f"-DEGRESS_MAX_RANGES={self.max_ranges}", f"-DEGRESS_MAX_CGROUPS={self.max_cgroups}",
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
    """Map entries for one generation: trie (key, value) bytes and exact-port keys."""

    generation: int
    trie: tuple[tuple[bytes, bytes], ...]
    ports: tuple[bytes, ...]
    count: int  # number of CIDR entries per generation


def _net_of(rule) -> tuple[str, ipaddress._BaseNetwork, PortSet]:
    net = ipaddress.ip_network(rule.cidr, strict=False)
    ps = PortSet()
    if rule.port_range is not None:
        ps.ranges.add(tuple(rule.port_range))
    else:
        ps.ports.update(rule.ports)
    return rule.proto, net, ps


def compile_rules(rules: Iterable, generation: int, limits: Limits = Limits()) -> CompiledRules:
    """Lay out :class:`enforcer.policy.EgressRule`\\ s as map entries for ``generation`` (0 or 1).

    Each (proto, network) gets one trie entry whose port set also holds the ports of every
    shorter prefix that covers it, so the kernel's single longest-prefix match decides alone.
    Output is sorted and deterministic.
    """
    if generation not in (0, 1):
        raise ValueError(f"generation must be 0 or 1, got {generation}")
    table: dict[tuple[str, int, int, int], PortSet] = {}
    for r in rules:
        proto, net, ps = _net_of(r)
        if proto not in PROTO_NUMBERS:
            raise EgressRuleError(f"egress rule {r}: protocol {proto!r} is not tcp or udp")
        k = (proto, net.version, int(net.network_address), net.prefixlen)
        table.setdefault(k, PortSet()).add(ps)
    # Fold covering prefixes in: for each entry look up every shorter prefix of itself.
    folded: dict[tuple[str, int, int, int], PortSet] = {}
    for (proto, ver, addr, plen), ps in table.items():
        total = PortSet()
        total.add(ps)
        width = 32 if ver == 4 else 128
        for shorter in range(plen):
            mask = ((1 << shorter) - 1) << (width - shorter) if shorter else 0
            anc = table.get((proto, ver, addr & mask, shorter))
            if anc is not None:
                total.add(anc)
        folded[(proto, ver, addr, plen)] = total
    if len(folded) * 2 > limits.max_rules:
        raise EgressRuleError(f"{len(folded)} egress CIDR entries exceed the map capacity "
                          f"({limits.max_rules // 2} per generation; raise Limits.max_rules)")
    rs = egress_rule_struct(limits.max_ranges)
    trie: list[tuple[bytes, bytes]] = []
    port_keys: list[bytes] = []
    for idx, k in enumerate(sorted(folded, key=lambda k: (k[0], k[1], k[3], k[2]))):
        proto, ver, addr, plen = k
        any_port, ranges, ports = folded[k].normalised(limits.max_ranges, f"{proto} {addr}/{plen}")
        rule_id = (generation << 24) | (idx + 1)
        raw = addr.to_bytes(4 if ver == 4 else 16, "big").ljust(16, b"\0")
        key = EgressKey.pack_tuple(FIXED_BITS + plen, generation, PROTO_NUMBERS[proto], ver, 0, raw)
        flat: list[int] = []
        for lo, hi in ranges:
            flat += [lo, hi]
        flat += [0, 0] * (limits.max_ranges - len(ranges))
        value = rs.pack(rule_id, 1 if any_port else 0, len(ranges), 0, *flat)
        trie.append((key, value))
        port_keys.extend(EgressPortKey.pack_tuple(rule_id, p, 0) for p in ports)
    if len(port_keys) * 2 > limits.max_ports:
        raise EgressRuleError(f"{len(port_keys)} exact egress ports exceed the map capacity "
                          f"({limits.max_ports // 2} per generation; raise Limits.max_ports)")
    return CompiledRules(generation, tuple(trie), tuple(port_keys), len(folded))


def state_word(generation: int, mode: str) -> int:
    return (MODE_CODES[mode] << 8) | generation


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


def effective_rules(policy: Policy, exceptions: Iterable = ()) -> list[EgressRule]:
    """What the programs let through: the policy's rules, review items its review action lets
    through (literal destinations, reported from the watch list), and active exceptions."""
    admitted = policy.review_admitted()
    review = list(admitted.egress) if admitted is not None else []
    return list(policy.egress) + review + exception_rules(exceptions)
