"""The egress rule layout that the enforcement programs read (enforcer.egress_rules.compile_rules).

Pure: the map entries are rebuilt here into a reference longest-prefix matcher and compared,
behaviour by behaviour, with the policy's own EgressRule.matches.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.egress import safe_name
from enforcer.egress_rules import (EgressRuleError, Limits, compile_rules, split_state_word,
                                   state_word)
from enforcer.names import NameRule, NameTable
from enforcer.policy import EgressRule, Policy
from sensor.mirrors import (EGRESS_INLINE_PORTS, EGRESS_NAME_SUFFIX, EGRESS_PORTS_ANY,
                            EGRESS_PORTS_MORE, EgressKey4, EgressKey6, EgressNameKey,
                            EgressPortKey, egress_name_rule_struct, egress_ports_format,
                            egress_rule_struct)
from sensor.workload import Workload

LIMITS = Limits()


def _ports(vals, max_ranges):
    """One struct egress_ports from its flat fields."""
    rule_id, flags, nports, nranges = vals[0], vals[1], vals[2], vals[3]
    inline = vals[5:5 + EGRESS_INLINE_PORTS][:nports]
    r0 = 5 + EGRESS_INLINE_PORTS
    ranges = [(vals[r0 + 2 * i], vals[r0 + 2 * i + 1]) for i in range(nranges)]
    return rule_id, flags, inline, ranges


class Reference:
    """What the BPF programs do with the compiled maps, in Python."""

    def __init__(self, compiled, limits=LIMITS):
        rs = egress_rule_struct(limits.max_ranges)
        half = len(egress_ports_format(limits.max_ranges))
        self.trie = {}
        for k, val in compiled.trie4 + compiled.trie6:
            key = (EgressKey4 if len(k) == EgressKey4.size() else EgressKey6).unpack_tuple(k)
            vals = rs.unpack(val)
            self.trie[(len(key[1]), key[1], key[0])] = {
                "tcp": _ports(vals[:half], limits.max_ranges),
                "udp": _ports(vals[half:], limits.max_ranges)}
        self.ports = {EgressPortKey.unpack_tuple(p)[:2] for p in compiled.ports}
        ns = egress_name_rule_struct(limits.max_ranges)
        self.names = {}
        for k, val in compiled.names:
            plen, raw = EgressNameKey.unpack_tuple(k)
            vals = ns.unpack(val)
            self.names[raw[:plen // 8]] = {
                "tcp": _ports(vals[:half], limits.max_ranges),
                "udp": _ports(vals[half:2 * half], limits.max_ranges),
                "kind": vals[2 * half + 1], "max_labels": vals[2 * half + 2],
                "base_labels": vals[2 * half + 3]}

    def _port_ok(self, ports, port):
        rule_id, flags, inline, ranges = ports
        return bool(flags & EGRESS_PORTS_ANY or port in inline
                    or any(lo <= port <= hi for lo, hi in ranges)
                    or (flags & EGRESS_PORTS_MORE and (rule_id, port) in self.ports))

    def allows(self, proto, addr, port):
        ip = ipaddress.ip_address(addr)
        width = 32 if ip.version == 4 else 128
        raw = int(ip)
        for plen in range(width, -1, -1):
            masked = raw & (((1 << plen) - 1) << (width - plen)) if plen else 0
            hit = self.trie.get((width // 8, masked.to_bytes(width // 8, "big"), plen))
            if hit is not None:
                return self._port_ok(hit[proto], port)
        return False

    def name_entry(self, name):
        """The longest stored key that prefixes the reversed, NUL-terminated name; then the
        label limit, as dns_name does."""
        key = name[::-1].encode() + b"\0"
        best = None
        for stored in self.names:
            if key.startswith(stored) and (best is None or len(stored) > len(best)):
                best = stored
        if best is None:
            return None
        e = self.names[best]
        if e["kind"] == EGRESS_NAME_SUFFIX:
            extra = name.count(".") + 1 - e["base_labels"]
            if not 1 <= extra <= e["max_labels"]:
                return None
        return e

    def name_allows(self, name, proto, port):
        e = self.name_entry(name)
        return e is not None and self._port_ok(e[proto], port)


def test_longest_prefix_folds_covering_ports():
    rules = [EgressRule("tcp", "10.0.0.0/8", (443,)), EgressRule("tcp", "10.0.3.0/24", (80,))]
    ref = Reference(compile_rules(rules, 0))
    assert ref.allows("tcp", "10.0.3.7", 443)  # /24 wins the match but carries /8's port
    assert ref.allows("tcp", "10.0.3.7", 80)
    assert not ref.allows("tcp", "10.9.0.1", 80)  # /24's port does not leak upwards
    assert ref.allows("tcp", "10.9.0.1", 443)
    assert not ref.allows("udp", "10.0.3.7", 443)
    assert not ref.allows("tcp", "11.0.0.1", 443)


def test_ranges_any_port_and_ipv6():
    rules = [EgressRule("udp", "::1/128", (), (5000, 5010)), EgressRule("tcp", "fd00::/8", (), (1, 65535))]
    c = compile_rules(rules, 1)
    ref = Reference(c)
    assert c.trie4 == () and len(c.trie6) == 2
    assert ref.allows("udp", "::1", 5005) and not ref.allows("udp", "::1", 5011)
    assert ref.allows("tcp", "fd12::1", 9)
    assert not ref.allows("tcp", "fe80::1", 9)
    assert all(struct.unpack_from("=I", v)[0] >> 24 == 1 for _, v in c.trie)  # generation 1 ids
    assert all(struct.unpack_from("=I", p)[0] >> 24 == 1 for p in c.ports)


def test_many_ranges_fall_back_to_exact_ports():
    rules = [EgressRule("tcp", "10.0.0.1/32", (), (p, p + 1)) for p in range(1000, 1040, 4)]
    ref = Reference(compile_rules(rules, 0))
    for p in range(1000, 1040, 4):
        assert ref.allows("tcp", "10.0.0.1", p) and ref.allows("tcp", "10.0.0.1", p + 1)
        assert not ref.allows("tcp", "10.0.0.1", p + 2)


def test_capacity_is_checked_before_anything_is_written():
    rules = [EgressRule("tcp", f"10.{i // 256}.{i % 256}.0/24", (443,)) for i in range(200)]
    with pytest.raises(EgressRuleError, match="capacity"):
        compile_rules(rules, 0, Limits(max_rules=150))
    assert compile_rules(rules, 0, Limits(max_rules=400)).count == 200


def test_deterministic():
    rules = [EgressRule("tcp", "10.0.0.0/8", (443, 80)), EgressRule("udp", "::/0", (53,))]
    assert compile_rules(rules, 0) == compile_rules(list(reversed(rules)), 0)


def test_state_word_and_safe_name():
    assert split_state_word(state_word(1, "enforce")) == (1, "enforce")
    assert split_state_word(state_word(0, "alert")) == (0, "alert")
    assert state_word(1, "enforce", names=True) == 1 | 2 << 8 | 1 << 16
    n = safe_name("default/Deployment/agent.v2/main")
    assert "." not in n and "/" not in n  # bpffs refuses dots
    assert n != safe_name("default/Deployment/agent-v2/main")


nets4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: ipaddress.ip_network((t[0] >> (32 - t[1]) << (32 - t[1]) if t[1] else 0, t[1])))
rule_st = st.builds(lambda net, proto, ports: EgressRule(proto, str(net), tuple(ports)),
                    nets4, st.sampled_from(["tcp", "udp"]),
                    st.lists(st.integers(1, 20), min_size=1, max_size=3))


@settings(max_examples=60, deadline=None)
@given(st.lists(rule_st, min_size=1, max_size=8), st.lists(
    st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(0, 2**32 - 1), st.integers(1, 20)), max_size=20))
def test_layout_matches_policy_semantics(rules, probes):
    ref = Reference(compile_rules(rules, 0))
    # probe both random addresses and each rule's own network address
    probes = list(probes) + [(r.proto, int(ipaddress.ip_network(r.cidr).network_address), r.ports[0]) for r in rules]
    for proto, a, port in probes:
        addr = str(ipaddress.IPv4Address(a))
        want = any(r.matches(proto, addr, port) for r in rules)
        assert ref.allows(proto, addr, port) == want, (proto, addr, port)


def test_one_lookup_answers_address_and_port_together():
    """Up to EGRESS_INLINE_PORTS exact ports sit in the trie value; more spill to `ports`."""
    few = compile_rules([EgressRule("tcp", "10.0.0.0/24", tuple(range(1, 9)))], 0)
    assert few.ports == ()
    many = compile_rules([EgressRule("tcp", "10.0.0.0/24", tuple(range(1, 12)))], 0)
    assert len(many.ports) == 3
    ref = Reference(many)
    assert all(ref.allows("tcp", "10.0.0.9", p) for p in range(1, 12))
    assert not ref.allows("tcp", "10.0.0.9", 12) and not ref.allows("udp", "10.0.0.9", 1)


def test_names_layout():
    names = [NameRule("api.example.com", "tcp", (443,)),
             NameRule("*.svc.example.com", "tcp", (8443,), max_labels=2),
             NameRule("a.svc.example.com", "udp", (53,)),
             NameRule("resolve-only.example.com")]
    ref = Reference(compile_rules([], 0, names=names))
    assert ref.name_allows("api.example.com", "tcp", 443)
    assert not ref.name_allows("api.example.com", "tcp", 80)
    assert not ref.name_allows("x.api.example.com", "tcp", 443)
    assert ref.name_allows("b.c.svc.example.com", "tcp", 8443)
    assert not ref.name_allows("b.c.d.svc.example.com", "tcp", 8443)  # label limit
    assert ref.name_allows("a.svc.example.com", "tcp", 8443)  # the covering pattern folded in
    assert ref.name_entry("resolve-only.example.com") is not None
    assert not ref.name_allows("resolve-only.example.com", "tcp", 443)
    assert ref.name_entry("svc.example.com") is None  # a pattern never covers its own suffix


def test_name_with_too_many_exact_ports_is_refused():
    with pytest.raises(EgressRuleError, match="port range"):
        compile_rules([], 0, names=[NameRule("a.example.com", "tcp", tuple(range(1, 10)))])


label = st.sampled_from(["a", "b", "svc", "x1", "api"])
name_st = st.lists(label, min_size=1, max_size=5).map(lambda ls: ".".join(ls + ["example", "com"]))
name_rule_st = st.builds(
    lambda name, wild, proto, ports, ml: NameRule(("*." if wild else "") + name, proto, tuple(ports),
                                                  max_labels=ml),
    name_st, st.booleans(), st.sampled_from(["tcp", "udp"]),
    st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(1, 3))


@settings(max_examples=80, deadline=None)
@given(st.lists(name_rule_st, min_size=1, max_size=6),
       st.lists(st.tuples(name_st, st.sampled_from(["tcp", "udp"]), st.integers(1, 6)), max_size=20))
def test_name_layout_matches_policy_semantics(rules, probes):
    """The kernel's view of the names (longest reversed-key match, label limit) and the
    policy's (enforcer.names.NameTable) agree on every probe."""
    ref = Reference(compile_rules([], 0, names=rules))
    policy = Policy(Workload.host("t"), names=tuple(rules))
    probes = list(probes) + [(r.pattern.replace("*", "q"), r.proto, r.ports[0]) for r in rules]
    for name, proto, port in probes:
        want = policy.allows(f"connect:{proto}:{name}:{port}")
        assert ref.name_allows(name, proto, port) == want, (name, proto, port)
        assert (ref.name_entry(name) is not None) == policy.allows(f"dns:{name}"), name


@settings(max_examples=40, deadline=None)
@given(st.lists(name_rule_st, min_size=1, max_size=6), st.lists(name_st, max_size=10))
def test_name_folding_never_widens(rules, names):
    """A name the table allows on a port is allowed there by some rule that matches it."""
    table = NameTable(rules)
    for name in names + [r.pattern.replace("*", "q") for r in rules]:
        for proto in ("tcp", "udp"):
            for port in range(1, 7):
                if table.allows_connect(name, proto, port):
                    assert any(NameTable([r]).allows_connect(name, proto, port) for r in rules)
