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
from enforcer.egress_rules import (FIXED_BITS, EgressRuleError, Limits, compile_rules,
                                   split_state_word, state_word)
from sensor.mirrors import EgressKey, EgressPortKey, egress_rule_struct
from enforcer.policy import EgressRule

PROTO = {"tcp": 6, "udp": 17}
LIMITS = Limits()


class Reference:
    """What the BPF program does with the compiled maps, in Python."""

    def __init__(self, compiled, limits=LIMITS):
        rs = egress_rule_struct(limits.max_ranges)
        self.trie = {}
        for k, val in compiled.trie:
            plen, gen, proto, fam, _pad, addr = EgressKey.unpack_tuple(k)
            vals = rs.unpack(val)
            rule_id, any_port, nranges = vals[0], vals[1], vals[2]
            ranges = [(vals[4 + 2 * i], vals[5 + 2 * i]) for i in range(nranges)]
            self.trie[(gen, proto, fam, addr, plen - FIXED_BITS)] = (rule_id, any_port, ranges)
        self.ports = {EgressPortKey.unpack_tuple(p)[:2] for p in compiled.ports}
        self.gen = compiled.generation

    def allows(self, proto, addr, port):
        ip = ipaddress.ip_address(addr)
        width = 32 if ip.version == 4 else 128
        raw = int(ip)
        for plen in range(width, -1, -1):
            masked = raw & (((1 << plen) - 1) << (width - plen)) if plen else 0
            key = (self.gen, PROTO[proto], ip.version, masked.to_bytes(width // 8, "big").ljust(16, b"\0"), plen)
            hit = self.trie.get(key)
            if hit is None:
                continue
            rule_id, any_port, ranges = hit
            return bool(any_port or any(lo <= port <= hi for lo, hi in ranges) or (rule_id, port) in self.ports)
        return False


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
    assert ref.allows("udp", "::1", 5005) and not ref.allows("udp", "::1", 5011)
    assert ref.allows("tcp", "fd12::1", 9)
    assert not ref.allows("tcp", "fe80::1", 9)
    assert all(EgressKey.unpack_tuple(k)[1] == 1 for k, _ in c.trie)  # generation 1 in every key
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
        compile_rules(rules, 0, Limits(max_rules=300))
    assert compile_rules(rules, 0, Limits(max_rules=400)).count == 200


def test_deterministic():
    rules = [EgressRule("tcp", "10.0.0.0/8", (443, 80)), EgressRule("udp", "::/0", (53,))]
    assert compile_rules(rules, 0) == compile_rules(list(reversed(rules)), 0)


def test_state_word_and_safe_name():
    assert split_state_word(state_word(1, "enforce")) == (1, "enforce")
    assert split_state_word(state_word(0, "alert")) == (0, "alert")
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
