"""Names in the egress substrate: DNS parsing, attribution of connects to resolved names,
the name closure (exact names, suffix patterns under the Public Suffix List, label caps),
resolvers as exact entries, policy semantics and the network exports. Pure, no root."""

from __future__ import annotations

import struct

import jsonschema
import pytest

from enforcer import netexport
from enforcer.derive import DeriveOptions, derive
from enforcer.name_closure import NameOptions, elements, public_suffix, suffix_allowed
from enforcer.names import NameRule, NameRuleError, NameTable, parse_name_entry
from enforcer.policy import EgressRule, Policy, PolicyError, dump_policy, parse_policy
from sensor import dnsmessage
from sensor.dns import NameAttributor
from sensor.dnsmessage import Answer, DnsParseError
from sensor.events import DnsMessageEvent
from sensor.profile import Profile
from sensor.workload import Workload, dns_key

from tests.unit.test_netexport import CILIUM_SCHEMA, validate

T0 = 1_767_225_600.0
DAY = 86400.0
W = Workload("agents", "Deployment", "research-agent", "agent")


# ---- DNS messages ----------------------------------------------------------------------------


def test_parse_an_answer_with_a_cname_chain():
    q = dnsmessage.query("API.Example.com")
    r = dnsmessage.response(q, [Answer("api.example.com", 5, 300, "edge.cdn.example.net"),
                                Answer("edge.cdn.example.net", 1, 30, "198.51.100.7"),
                                Answer("edge.cdn.example.net", 28, 30, "2001:db8::7")])
    m = dnsmessage.parse(r)
    assert m.response and m.rcode == 0 and m.qname == "api.example.com"
    assert m.addresses() == [("198.51.100.7", 30, "edge.cdn.example.net"),
                             ("2001:db8::7", 30, "edge.cdn.example.net")]
    assert m.chain() == ["api.example.com", "edge.cdn.example.net"]


def test_parse_cut_short_keeps_what_parsed_and_rejects_garbage():
    q = dnsmessage.query("a.example.com")
    full = dnsmessage.response(q, [Answer("a.example.com", 1, 5, f"10.0.0.{i}") for i in range(1, 5)])
    m = dnsmessage.parse(full[:-6])
    assert m.truncated and [a for a, _, _ in m.addresses()] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    with pytest.raises(DnsParseError):
        dnsmessage.parse(b"\x00" * 5)
    loop = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    with pytest.raises(DnsParseError, match="loop"):
        dnsmessage.parse(loop)


def test_top_bit_ttl_is_zero():
    q = dnsmessage.query("a.example.com")
    r = bytearray(dnsmessage.response(q, [Answer("a.example.com", 1, 5, "10.0.0.1")]))
    struct.pack_into("!I", r, len(r) - 10, 0x80000001)
    assert dnsmessage.parse(bytes(r)).addresses()[0][1] == 0


# ---- attribution -----------------------------------------------------------------------------


def answer_event(cgroup, name, addrs, ttl=30, rcode=0):
    q = dnsmessage.query(name)
    m = dnsmessage.parse(dnsmessage.response(q, [Answer(name, 1, ttl, a) for a in addrs], rcode))
    return DnsMessageEvent(0, cgroup, "answer", "udp", 4, "10.96.0.10", 53, m)


def test_connects_to_answered_addresses_carry_the_name():
    a = NameAttributor(grace=10)
    a.on_event(answer_event(7, "api.example.com", ["198.51.100.7", "198.51.100.8"]), T0)
    assert a.attribute(7, "connect:tcp:198.51.100.8:443", T0 + 1) == (
        "connect:tcp:api.example.com:443", "198.51.100.8")
    # another cgroup never received that answer; an unanswered address stays an address
    assert a.attribute(8, "connect:tcp:198.51.100.8:443", T0 + 1) == ("connect:tcp:198.51.100.8:443", None)
    assert a.attribute(7, "connect:tcp:203.0.113.9:443", T0 + 1)[1] is None
    # past TTL + grace, and before the answer, the answer explains nothing
    assert a.attribute(7, "connect:tcp:198.51.100.7:443", T0 + 41)[1] is None
    assert a.attribute(7, "connect:tcp:198.51.100.7:443", T0 - 5)[1] is None
    # resolver traffic is never attributed; an IPv4-mapped peer is the IPv4 address
    assert a.attribute(7, "send:udp:198.51.100.7:53", T0 + 1)[1] is None
    assert a.attribute(7, "connect:tcp:[::ffff:198.51.100.7]:443", T0 + 1)[0] == "connect:tcp:api.example.com:443"


def test_the_latest_answer_names_a_shared_address():
    a = NameAttributor()
    a.on_event(answer_event(7, "cdn-a.example.com", ["198.51.100.7"]), T0)
    a.on_event(answer_event(7, "cdn-b.example.com", ["198.51.100.7"]), T0 + 2)
    assert a.attribute(7, "connect:tcp:198.51.100.7:443", T0 + 3)[0] == "connect:tcp:cdn-b.example.com:443"
    a.on_event(answer_event(7, "gone.example.com", ["198.51.100.9"], rcode=3), T0 + 4)  # NXDOMAIN
    assert a.attribute(7, "connect:tcp:198.51.100.9:443", T0 + 5)[1] is None


def test_aggregation_records_the_name_and_keeps_the_address():
    from sensor.aggregate import Aggregator
    from sensor.events import NetEvent
    agg = Aggregator("n1", None, str)
    agg.attributors.append(NameAttributor())
    agg.bind(7, W, "s1", start=T0)
    agg.on_event(answer_event(7, "api.example.com", ["198.51.100.7"]), T0)
    agg.on_event(NetEvent(0, 1, 7, "connect", "tcp", 4, "198.51.100.7", 443), T0 + 1)
    agg.on_event(NetEvent(0, 1, 7, "connect", "tcp", 4, "203.0.113.9", 443), T0 + 1)
    p = agg.profiles[W]
    assert set(p.behaviours()) == {"connect:tcp:api.example.com:443", "connect:tcp:203.0.113.9:443"}
    assert p.evidence() == {"connect:tcp:api.example.com:443": {"198.51.100.7": 1}}
    assert Profile.unpack(p.pack()).evidence() == p.evidence()


# ---- closure ----------------------------------------------------------------------------------


def test_public_suffixes_come_from_the_list():
    assert public_suffix("a.b.example.co.uk") == "co.uk"
    assert not suffix_allowed("co.uk") and not suffix_allowed("uk")
    assert suffix_allowed("example.co.uk") and suffix_allowed("svc.example.com")
    assert not suffix_allowed("cloudfront.net")  # the list's private section: shared by tenants


def keys_under(suffix, n, port=443):
    return [f"connect:tcp:n{i}.{suffix}:{port}" for i in range(n)]


def test_a_suffix_pattern_needs_more_than_k_names():
    opts = NameOptions(max_siblings=3)
    els = elements(keys_under("svc.example.com", 3), opts, structural=True)
    assert sorted(e.id for e in els) == [f"name:tcp:n{i}.svc.example.com:443" for i in range(3)]
    els = elements(keys_under("svc.example.com", 4), opts, structural=True)
    assert [e.id for e in els] == ["name:tcp:*.svc.example.com:443"]
    assert els[0].rule == "name-suffix+exact-ports" and "name-suffix" in els[0].flags
    assert len(elements(keys_under("svc.example.com", 4), opts, structural=False)) == 4


def test_never_at_or_above_a_public_suffix():
    # 10 registrable domains under co.uk: *.co.uk would admit every .co.uk site
    els = elements([f"connect:tcp:site{i}.co.uk:443" for i in range(10)], NameOptions(), True)
    assert all("*" not in e.id for e in els) and len(els) == 10
    els = elements(keys_under("a.cloudfront.net", 5), NameOptions(), True)
    assert [e.id for e in els] == ["name:tcp:*.a.cloudfront.net:443"]


def test_extra_labels_are_capped():
    deep = [f"connect:tcp:x{i}.y{i}.svc.example.com:443" for i in range(5)]
    els = elements(deep, NameOptions(max_labels=1), True)
    assert all("*" not in e.id for e in els)  # two labels in front: more than the cap
    els = elements(deep, NameOptions(max_labels=2), True)
    assert [e.id for e in els] == ["name:tcp:*.svc.example.com:443"]
    rule = parse_name_entry(els[0].entries[0])
    assert rule.pattern == "*.svc.example.com"


def rotation_profile(addresses=("198.51.100.7", "198.51.100.8", "198.51.100.9", "198.51.100.10")):
    p = Profile(W)
    node = p.node("n1")
    for i, addr in enumerate(addresses):
        s, t = f"s{i}", T0 + i * DAY
        node.open_session(s, t)
        node.observe(s, "dns:api.example.com", 2, t + 1)
        node.observe(s, "connect:udp:10.96.0.10:53", 2, t + 1)
        node.observe(s, "connect:tcp:api.example.com:443", 3, t + 2)
        node.add_evidence("connect:tcp:api.example.com:443", addr, 3, t + 2)
        node.close_session(s, t + 3600)
    node.touch(T0 + 6 * DAY)
    return p


def test_rotation_derives_one_name_entry_and_an_exact_resolver():
    pol = derive(rotation_profile(), DeriveOptions(substrates=("egress",)))
    assert pol.names == (NameRule("api.example.com", "tcp", (443,)),)
    assert pol.egress == (EgressRule("udp", "10.96.0.10/32", (53,)),)
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["name:tcp:api.example.com:443"]["addresses"] == [
        "198.51.100.7", "198.51.100.8", "198.51.100.9", "198.51.100.10"]
    assert prov["name:tcp:api.example.com:443"]["rule"] == "exact-name+exact-ports"
    assert "dns:api.example.com" in prov["name:tcp:api.example.com:443"]["evidence"]["behaviours"]
    assert prov["egress:udp:10.96.0.10/32:53"]["rule"] == "dns-resolver"
    # a held-out address is nobody's business here: the name decides
    assert pol.allows("connect:tcp:api.example.com:443") and pol.allows("dns:api.example.com")
    assert not pol.allows("connect:tcp:evil.example.com:443") and not pol.allows("dns:evil.example.com")
    assert "egress" not in pol.decisions["granularity"].get("blindSpots", {})
    assert parse_policy(dump_policy(pol)).names == pol.names
    assert dump_policy(derive(rotation_profile(), DeriveOptions(substrates=("egress",))))  == dump_policy(pol)


def test_blind_spots_are_stated():
    p = rotation_profile()
    node = p.node("n1")
    for i in range(4):
        node.open_session(f"t{i}", T0 + i * DAY + 10)
        node.observe(f"t{i}", "connect:tcp:203.0.113.9:443", 2, T0 + i * DAY + 11)
        node.observe(f"t{i}", "connect:tcp:1.1.1.1:443", 1, T0 + i * DAY + 11)
        node.observe(f"t{i}", "connect:tcp:dns.example.net:853", 1, T0 + i * DAY + 11)
        node.close_session(f"t{i}", T0 + i * DAY + 20)
    pol = derive(p, DeriveOptions(substrates=("egress",)))
    spots = {s.split(":", 1)[0]: s for s in pol.decisions["granularity"]["blindSpots"]["egress"]}
    assert set(spots) == {"dns-over-tls", "dns-over-https", "address-without-answer"}
    assert spots["address-without-answer"].endswith(": connect:tcp:203.0.113.9:443")
    assert "hard-coded" in spots["address-without-answer"]


# ---- policy -----------------------------------------------------------------------------------


def test_name_entries_parse_and_refuse_nonsense():
    assert parse_name_entry("name:tcp:*.svc.example.com:8000-8100").port_range == (8000, 8100)
    assert parse_name_entry("name:api.example.com").proto is None
    for bad in ("name:tcp:*.com:443", "name:tcp:Api.example.com:443", "name:tcp:10.0.0.1:443",
                "name:sctp:a.example.com:1", "name:tcp:a.*.example.com:443"):
        with pytest.raises(NameRuleError):
            parse_name_entry(bad)
    doc = {"apiVersion": "envelope.dev/v1alpha1", "kind": "LeastPrivilegePolicy",
           "spec": {"workload": W.to_dict(), "allow": {"names": [{"name": "a.example.com", "proto": "tcp"}]}}}
    with pytest.raises(PolicyError, match=r"spec.allow.names\[0\].ports"):
        Policy.from_dict(doc)


def test_most_specific_entry_decides():
    t = NameTable([NameRule("*.example.com", "tcp", (443,)), NameRule("x.example.com", "tcp", (80,))])
    assert t.allows_connect("x.example.com", "tcp", 443)  # the covering pattern's ports fold in
    assert t.allows_connect("y.example.com", "tcp", 443) and not t.allows_connect("y.example.com", "tcp", 80)
    assert not t.allows_resolve("a.b.example.com")  # deeper than the pattern's one label


# ---- exports ----------------------------------------------------------------------------------


def names_policy() -> Policy:
    return Policy(W, mode="enforce", substrates=("egress",),
                  egress=(EgressRule("udp", "10.96.0.10/32", (53,)),),
                  names=(NameRule("api.example.com", "tcp", (443,)),
                         NameRule("*.svc.example.com", "tcp", (8443,), max_labels=2),
                         NameRule("resolve-only.example.com")),
                  provenance=({"entry": "name:tcp:api.example.com:443", "rule": "exact-name",
                               "addresses": ["198.51.100.7", "2001:db8::7"]},))


def test_cilium_gets_to_fqdns_and_the_dns_visibility_rule():
    doc = netexport.compile_cilium(names_policy())
    assert jsonschema.Draft7Validator(CILIUM_SCHEMA).is_valid(doc)
    egress = doc["spec"]["egress"]
    resolver = next(r for r in egress if r.get("toCIDR") == ["10.96.0.10/32"])
    assert sorted(map(str, resolver["toPorts"][0]["rules"]["dns"])) == sorted(map(str, [
        {"matchName": "api.example.com"}, {"matchPattern": "*.svc.example.com"},
        {"matchPattern": "*.*.svc.example.com"}, {"matchName": "resolve-only.example.com"}]))
    fqdn = [r for r in egress if "toFQDNs" in r]
    assert sorted(fqdn, key=str) == sorted([
        {"toFQDNs": [{"matchName": "api.example.com"}],
         "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        {"toFQDNs": [{"matchPattern": "*.svc.example.com"}, {"matchPattern": "*.*.svc.example.com"}],
         "toPorts": [{"ports": [{"port": "8443", "protocol": "TCP"}]}]}], key=str)
    assert netexport.name_warnings(names_policy(), "cilium") == []


def test_networkpolicy_falls_back_to_the_observed_addresses_and_says_so():
    pol = names_policy()
    doc = netexport.compile_networkpolicy(pol)
    assert validate(doc)
    blocks = [t["ipBlock"]["cidr"] for r in doc["spec"]["egress"] for t in r["to"]
              if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert blocks == ["198.51.100.7/32", "2001:db8::7/128"]
    note = doc["metadata"]["annotations"]["envelope.dev/names-as-addresses"]
    assert "api.example.com: 198.51.100.7, 2001:db8::7" in note and "*.svc.example.com: no address" in note
    warnings = netexport.name_warnings(pol, "networkpolicy")
    assert len(warnings) == 2 and all("cannot express names" in w for w in warnings)


def test_dns_key_is_lower_case_without_the_root():
    assert dns_key("API.Example.COM.") == "dns:api.example.com"
