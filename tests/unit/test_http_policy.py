"""The http substrate's policy side: entries, the probe's rule graph, closure, derivation,
violations and exceptions (pure; no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.derive import DeriveOptions, derive
from enforcer.exceptions import ExceptionError, PolicyException, normalise_key
from enforcer.http_closure import elements
from enforcer.http_enforce import effective_patterns
from enforcer.http_patterns import HttpPattern, HttpPatternError, compile_graph, parse_entry, walk
from enforcer.policy import Policy, PolicyError, dump_policy, parse_policy
from enforcer.violations import from_record
from sensor.mirrors import HTTP_EDGE_ANY, HTTP_EDGE_END, HTTP_EDGE_ID, HttpEdgeKey
from sensor.profile import Profile
from sensor.workload import Workload
from tests.unit.test_events import read_hex

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "events"
W = Workload.host("agent")


# ---- entries --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "http:GET", "http:GET /x", "http:GET API.example.com/x", "http:GET h/a/../b", "http:GET h/a//b",
    "http:GET h/a{id}", "http:GET h/x*", "http:get me h/x", "http:GET h/" + "x" * 65, "egress:GET h/x",
])
def test_bad_entries_are_refused(bad):
    with pytest.raises(HttpPatternError):
        parse_entry(bad)


def test_entry_matching_follows_the_probe():
    p = parse_entry("http:GET api.example.com/v1/docs/{id}")
    assert p.matches("GET", "api.example.com", "/v1/docs/8812")
    assert p.matches("GET", "api.example.com", "/v1//docs/./5f1b2c3d4e")  # hash, skipped segments
    assert not p.matches("POST", "api.example.com", "/v1/docs/8812")      # methods never widened
    assert not p.matches("GET", "api.example.org", "/v1/docs/8812")
    assert not p.matches("GET", "api.example.com", "/v1/docs/readme")     # not an identifier
    assert not p.matches("GET", "api.example.com", "/v1/docs/8812/raw")   # segment count is exact
    assert not p.matches("GET", "api.example.com", "/v1/x/../docs/8812")  # '..' is not resolved
    assert parse_entry("http:GET h/").matches("GET", "h", "/")


# ---- the rule graph ---------------------------------------------------------------------------------

SEGS = st.sampled_from(["v1", "docs", "8812", "9313", "a" * 8 + "1", "readme", "x", "{id}", "*",
                        "123e4567-e89b-12d3-a456-426614174000"])
METHODS = st.sampled_from(["GET", "POST", "DELETE"])
HOSTS = st.sampled_from(["api.example.com", "127.0.0.1:8443"])


@st.composite
def patterns(draw):
    return HttpPattern(draw(METHODS), draw(HOSTS), tuple(draw(st.lists(SEGS, max_size=4))))


@st.composite
def requests(draw):
    segs = draw(st.lists(SEGS.filter(lambda s: s not in ("{id}", "*")), max_size=4))
    return draw(METHODS), draw(HOSTS), "/" + "/".join(segs)


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), max_size=6), st.lists(requests(), min_size=1, max_size=8))
def test_the_graph_decides_as_the_entries_do(pats, reqs):
    """The probe walks the graph without going back; it must decide exactly as the entries."""
    g = compile_graph(pats, 2)
    for method, host, path in reqs:
        assert walk(g, method, host, path) == any(p.matches(method, host, path) for p in pats)


def test_graph_is_deterministic_and_its_keys_fit_the_map():
    pats = [parse_entry(e) for e in ("http:GET h/v1/docs/{id}", "http:GET h/v1/docs/readme",
                                     "http:POST h/v1/*", "http:GET h/")]
    a, b = compile_graph(pats, 10), compile_graph(list(reversed(pats)), 10)
    assert a == b and a.root == 10
    for e in a.edges:
        assert len(e.key()) == HttpEdgeKey.size()
        if not isinstance(e.label, bytes):
            assert e.label in (HTTP_EDGE_ID, HTTP_EDGE_ANY, HTTP_EDGE_END)
    assert walk(a, "GET", "h", "/v1/docs/readme") and walk(a, "GET", "h", "/v1/docs/42")
    assert walk(a, "POST", "h", "/v1/readme") and not walk(a, "POST", "h", "/v1/docs/42")
    assert walk(a, "GET", "h", "/") and not walk(a, "DELETE", "h", "/")
    assert walk(compile_graph([], 3), "GET", "h", "/") is False


# ---- closure ----------------------------------------------------------------------------------------


def _keys(method, host, paths, status=200):
    return [f"http:{method} {host}{p} {status}" for p in paths]


def test_templates_keep_methods_and_hosts_apart():
    keys = (_keys("GET", "api.example.com", ["/v1/docs/8812", "/v1/docs/9313", "/v1/docs/17"])
            + _keys("GET", "api.example.com", ["/v1/docs/8812"], 404)
            + _keys("DELETE", "api.example.com", ["/v1/docs/8812"])
            + _keys("GET", "other.example.com", ["/v1/docs/1"]))
    els, bad = elements(keys, "structural", 3)
    assert not bad
    by_id = {e.id: e for e in els}
    get = by_id["http:GET api.example.com/v1/docs/{id}"]
    assert get.rule == "path-template" and len(get.members) == 4
    assert "200 ×3" in get.detail and "404 ×1" in get.detail and "number ×3" in get.detail
    assert "http:DELETE api.example.com/v1/docs/{id}" in by_id      # its own element, its own method
    assert "http:GET other.example.com/v1/docs/{id}" in by_id


def test_more_than_k_siblings_become_a_flagged_wildcard():
    keys = _keys("GET", "h", [f"/repos/{n}/commits" for n in ("alpha", "beta", "gamma", "delta")])
    (el,), _ = elements(keys, "structural", 3)
    assert el.id == "http:GET h/repos/*/commits" and el.flags == ("sibling-wildcard",)
    lit, _ = elements(keys, "literal", 3)
    assert sorted(e.id for e in lit) == sorted(f"http:GET h/repos/{n}/commits" for n in ("alpha", "beta", "gamma", "delta"))


def test_requests_the_probe_cannot_judge_are_not_encodable():
    els, _ = elements(_keys("GET", "h", ["/a/../etc/passwd", "/" + "x" * 70]), "structural", 3)
    assert els and not any(e.encodable for e in els)


# ---- derivation -------------------------------------------------------------------------------------


def _profile() -> Profile:
    p = Profile(W)
    c = p.node("n1")
    t = 1_700_000_000.0
    for s in range(4):
        sid = f"s{s}"
        c.open_session(sid, t)
        for doc in (8812 + s, 9000 + s):
            c.observe(sid, f"http:GET api.example.com/v1/docs/{doc} 200", 2, t + 1)
        c.observe(sid, "http:POST api.example.com/v1/chat/completions 200", 3, t + 2)
        c.observe(sid, "syscall:read", 10, t + 2)
        c.close_session(sid, t + 3)
    c.observe("s0", "http:DELETE api.example.com/v1/docs/8812 204", 1, t + 3)
    c.add_fingerprint("model", "gpt-test-1", t + 2)
    c.add_blind_spot("http", "/usr/local/bin/fetcher: go TLS: its requests over TLS are not observable", t + 2)
    c.add_tls_stack("/usr/bin/python3.11", "openssl-dynamic:/usr/lib/x86_64-linux-gnu/libssl.so.3", t + 2)
    return p


def test_derive_http_substrate():
    opts = DeriveOptions(substrates=("syscall", "http"), force=True, min_sessions={"syscall": 3, "http": 3,
                         **{s: 3 for s in ("egress", "exec", "file", "mcp", "iam")}})
    pol = derive(_profile(), opts)
    assert pol.http == ("http:GET api.example.com/v1/docs/{id}", "http:POST api.example.com/v1/chat/completions")
    assert pol.allows("http:GET api.example.com/v1/docs/777777 200")     # a held-out document id
    assert not pol.allows("http:DELETE api.example.com/v1/docs/8812 204")
    assert "http:DELETE api.example.com/v1/docs/8812 204" in pol.watch
    (rv,) = [r for r in pol.review if r["substrate"] == "http"]
    assert rv["key"] == "http:DELETE api.example.com/v1/docs/{id}"  # the template it would have earned
    assert rv["evidence"]["behaviours"] == ["http:DELETE api.example.com/v1/docs/8812 204"]
    prov = {p["entry"]: p for p in pol.provenance}
    assert prov["http:GET api.example.com/v1/docs/{id}"]["rule"] == "path-template"
    gran = pol.decisions["granularity"]
    assert gran["enforcement"]["http"]["action"] == "kill-process"
    assert gran["blindSpots"]["http"] == ["/usr/local/bin/fetcher: go TLS: its requests over TLS are not observable"]
    assert pol.validity["fingerprint"]["model"] == ["gpt-test-1"]
    assert {"name": "model-version-change", "key": "model", "source": "fingerprint"} in pol.validity["triggers"]
    assert pol.decisions["closure"]["rules"]["http"]["methods"] == "never widened"
    text = dump_policy(pol)
    assert text == dump_policy(derive(_profile(), opts))                   # byte-identical
    back = parse_policy(text)
    assert back.http == pol.http and dump_policy(back) == text


def test_policy_refuses_bad_http_entries_naming_the_field():
    doc = Policy(W, substrates=("http",), http=("http:GET h/x",)).to_dict()
    doc["spec"]["allow"]["http"] = ["http:GET h/x", "http:GET H/y"]
    with pytest.raises(PolicyError, match=r"spec.allow.http\[1\]"):
        Policy.from_dict(doc)


def test_profile_keeps_blind_spots_and_tls_stacks_across_a_pack():
    p = _profile()
    back = Profile.unpack(json.loads(json.dumps(p.pack())))
    assert back.blind_spots() == p.blind_spots() and back.tls_stacks() == p.tls_stacks()
    js = p.to_json()
    assert js["tls"] == {"/usr/bin/python3.11": ["openssl-dynamic:/usr/lib/x86_64-linux-gnu/libssl.so.3"]}
    empty = Profile(W)
    empty.node("n1")
    assert "blind_spots" not in empty.pack()["nodes"][0]  # old profiles stay byte-identical


# ---- violations and exceptions ----------------------------------------------------------------------


def test_a_violation_record_names_method_host_path_and_process():
    v = from_record(read_hex(GOLDEN / "http_violation.hex"), lambda cg: "host/Unit/agent/main", 5.0)
    assert v.substrate == "http" and v.action == "denied"
    assert v.behaviour == "http:DELETE api.example.com/v1/repos/agent"
    assert v.detail["comm"] == "python3" and v.detail["pid"] == 1001 and "killed" in v.detail["enforced"]


def test_http_exceptions_are_entries_and_widen_the_rules():
    assert normalise_key("http:GET api.example.com/v1/x/7 200") == "http:GET api.example.com/v1/x/7"
    assert normalise_key("http:GET api.example.com/v1/x/{id}") == "http:GET api.example.com/v1/x/{id}"
    with pytest.raises(ExceptionError):
        normalise_key("http:GET API/x")
    exc = PolicyException("e1", W.key, "http:GET api.example.com/v1/x/{id}", 0, 10, "trial", "me")
    assert exc.allows("http:GET api.example.com/v1/x/5 200") and not exc.allows("http:POST api.example.com/v1/x/5 200")
    pol = Policy(W, substrates=("http",), http=("http:GET api.example.com/v1/docs/{id}",))
    pats = effective_patterns(pol, [exc])
    assert [p.entry for p in pats] == ["http:GET api.example.com/v1/docs/{id}", "http:GET api.example.com/v1/x/{id}"]
