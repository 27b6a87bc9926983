"""The request capture's pure side: keys, redaction, model API requests, exchange assembly, TLS
stack classification, and the behaviours an exchange becomes (no root, no kernel)."""

from __future__ import annotations

import json
import ssl
import struct
import subprocess

import pytest

from sensor import credentials, events, sigv4
from sensor.events import (HTTP_F_BODY, HTTP_F_H2, HTTP_F_HEAD, HTTP_F_RESPONSE, HTTP_F_TLS,
                           HTTP_F_TLS_RECORD, HTTP_F_TRUNCATED, HTTP_F_UNPARSED, HttpCaptureRecord, decode)
from sensor.httpcapture import character_table, exchange_behaviours
from sensor.httpexchange import ExchangeAssembler, HeadError, dechunk, parse_head, server_name
from sensor.httpkeys import (HttpKeyError, http_key, judgeable, normalize_host, parse_key, request_path,
                             segments)
from sensor.httprequest import CapturedRequest
from sensor.mirrors import (HTTP_C_ALPHA, HTTP_C_DASH, HTTP_C_DIGIT, HTTP_C_END, HTTP_C_HEX, HTTP_C_OTHER,
                            HTTP_C_SLASH, HTTP_C_UNDER)
from sensor.modelapi import model_call, top_level_string
from sensor.tlsstack import ElfFacts, ProbeSite, classify, elf_facts, emulated, probe_sites

KEY = b"envelope-test-sensor-key-0123456789"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"


# ---- keys -----------------------------------------------------------------------------------------


def test_host_is_lowercased_and_loses_the_default_port_of_its_scheme():
    assert normalize_host("API.Example.com:443", tls=True) == "api.example.com"
    assert normalize_host("api.example.com:443", tls=False) == "api.example.com:443"
    assert normalize_host("Example.com:80", tls=False) == "example.com"
    assert normalize_host("127.0.0.1:8443", tls=True) == "127.0.0.1:8443"


def test_keys_hold_the_path_never_the_query():
    assert request_path("/v1/docs/8812?token=secret#x") == "/v1/docs/8812"
    key = http_key("GET", "api.example.com", "/v1/docs/8812", 200)
    assert key == "http:GET api.example.com/v1/docs/8812 200"
    b = parse_key(key)
    assert (b.method, b.host, b.path, b.status) == ("GET", "api.example.com", "/v1/docs/8812", "200")
    assert parse_key(http_key("POST", "h", "/", None)).status == "-"
    assert parse_key("http:DELETE h/x").request == "DELETE h/x"  # violations carry no status


@pytest.mark.parametrize("bad", ["http:GET", "http:GET nohost", "http:G ET h/x 200", "http:GET h/x 20",
                                 "dns:x", "http:GET /x 200"])
def test_bad_keys_are_refused(bad):
    with pytest.raises(HttpKeyError):
        parse_key(bad)


def test_segments_follow_the_probe():
    assert segments("/a//b/./c/") == ("a", "b", "c")
    assert segments("/") == ()
    assert segments("/a/../b") is None
    assert judgeable("GET", "h", "/a/../b")
    assert judgeable("GET", "h", "*") and judgeable("get me", "h", "/")
    assert judgeable("GET", "h", "/" + "/".join(["s"] * 17))
    assert judgeable("GET", "h", "/ok") is None


def test_character_table_matches_the_identifier_classes():
    t = character_table()
    assert t[ord("7")] == HTTP_C_DIGIT and t[ord("f")] == HTTP_C_HEX and t[ord("F")] == HTTP_C_HEX
    assert t[ord("g")] == HTTP_C_ALPHA and t[ord("-")] == HTTP_C_DASH and t[ord("_")] == HTTP_C_UNDER
    assert t[ord("/")] == HTTP_C_SLASH
    assert all(t[ord(c)] == HTTP_C_END for c in " ?#\r\n\0")
    assert t[ord(".")] == HTTP_C_OTHER and t[0xE9] == HTTP_C_OTHER


# ---- redaction ------------------------------------------------------------------------------------


def _raw(**headers) -> CapturedRequest:
    return CapturedRequest("GET", "api.example.com", "/v1/x?api_key=sk-live-123&page=2",
                           tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def test_credentials_are_gone_and_names_kept():
    req = _raw(Authorization="Bearer sk-live-123", Cookie="session=abc", X_Api_Key="sk-ant-xyz",
               X_Auth_Token="t0k", Accept="application/json")
    red = credentials.redact(req, KEY)
    text = repr(red)
    for secret in ("sk-live-123", "abc", "sk-ant-xyz", "t0k"):
        assert secret not in text
    assert red.header("Authorization") == "Bearer redacted"
    assert red.header("Cookie") == "redacted" and red.header("X-Api-Key") == "redacted"
    assert red.header("Accept") == "application/json"
    assert red.target == "/v1/x"  # the query of an unsigned request is dropped


def test_sigv4_requests_go_through_sigv4_redact_and_keep_their_scope():
    auth = (f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20250101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=" + "ab" * 32)
    req = CapturedRequest("GET", "s3.amazonaws.com", "/bucket/key?versionId=3",
                          (("Authorization", auth), ("X-Amz-Security-Token", "FwoGZXIvYXdz"),
                           ("Cookie", "c=1")))
    assert credentials.sigv4_signed(req)
    red = credentials.redact(req, KEY)
    assert ACCESS_KEY not in repr(red) and "FwoGZXIvYXdz" not in repr(red) and "ab" * 32 not in repr(red)
    cred = sigv4.credential(red)  # the scope survives as a keyed hash
    assert cred.service == "s3" and cred.region == "us-east-1" and cred.session_token
    assert cred.key_hash == sigv4.credential(sigv4.redact(req, KEY)).key_hash
    assert red.target == "/bucket/key?versionId=3"  # AWS decoding needs the query
    assert red.header("Cookie") == "redacted"


def test_secret_header_names():
    for name in ("Authorization", "Proxy-Authorization", "Set-Cookie", "x-api-key", "api-key",
                 "X-Goog-Api-Key", "X-Session-Token", "x-client-secret", "X-Amz-Security-Token"):
        assert credentials.secret_header(name), name
    for name in ("Accept", "Content-Type", "anthropic-version", "X-Amz-Date", "Host"):
        assert not credentials.secret_header(name), name


# ---- model API requests -------------------------------------------------------------------------


def _post(path: str, body: bytes, ctype="application/json") -> CapturedRequest:
    return CapturedRequest("POST", "api.example.com", path, (("Content-Type", ctype),), body)


def test_model_of_openai_and_anthropic_shapes():
    assert model_call(_post("/v1/chat/completions", b'{"messages": [], "model": "gpt-4o-mini"}')).model == "gpt-4o-mini"
    assert model_call(_post("/openai/deployments/x/embeddings", b'{"model":"text-emb-3","input":"a"}')).model == "text-emb-3"
    m = model_call(_post("/v1/messages", b'{"model": "claude-x-1", "max_tokens": 5}'))
    assert (m.api, m.model) == ("anthropic", "claude-x-1")
    assert model_call(_post("/v1/docs", b'{"model": "x"}')) is None
    assert model_call(CapturedRequest("GET", "h", "/v1/chat/completions")) is None


def test_model_is_never_guessed():
    cut = model_call(_post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hello'))
    assert cut.model is None and "cut" in cut.reason
    nested = model_call(_post("/v1/chat/completions", b'{"messages": [{"model": "inner"}], "n": 1}'))
    assert nested.model is None
    partial = model_call(_post("/v1/chat/completions", b'{"model": "gpt-4o-mi'))
    assert partial.model is None
    assert model_call(_post("/v1/chat/completions", b'{"model": 7}')).model is None
    assert model_call(_post("/v1/chat/completions", b'{"model": "a"}', "text/plain")).model is None


def test_top_level_string_skips_strings_with_braces_and_escapes():
    body = json.dumps({"prompt": 'a "quoted" {not: "model"}', "model": "m-\u00e9"}).encode()
    assert top_level_string(body, "model") == ("m-\u00e9", "")


# ---- exchange assembly ----------------------------------------------------------------------------


def _cap(data: bytes, flags: int, conn=7, pid=100, total=None, ktime=1_000) -> events.HttpCaptureEvent:
    rec = HttpCaptureRecord.pack(type=events.EV_HTTP_CAPTURE, version=1, size=64 + len(data), ktime=ktime,
                                 cgroup_id=42, conn=conn, cookie=conn, pid=pid, tid=pid,
                                 total=len(data) if total is None else total, len=len(data), flags=flags,
                                 source=1, data=data)
    ev = decode(rec[:64 + len(data)])
    assert isinstance(ev, events.HttpCaptureEvent), ev
    return ev


def test_a_request_and_its_response_make_one_redacted_exchange():
    a = ExchangeAssembler(KEY)
    a.on_capture(_cap(b"POST /v1/chat/completions?key=secret HTTP/1.1\r\nHost: API.example.com:443\r\n"
                      b"Authorization: Bearer sk-live-1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 27\r\n\r\n", HTTP_F_HEAD | HTTP_F_TLS))
    a.on_capture(_cap(b'{"model": "gpt-test", "n":1}'[:27], HTTP_F_BODY | HTTP_F_TLS))
    a.on_capture(_cap(b"HTTP/1.1 201 Created\r\nSet-Cookie: s=1\r\n\r\n", HTTP_F_RESPONSE | HTTP_F_TLS))
    (ex,), findings = a.take()
    assert not findings
    assert ex.status == 201 and ex.tls and not ex.request.truncated
    assert ex.request.target == "/v1/chat/completions" and "sk-live-1" not in repr(ex)
    obs, notes = exchange_behaviours(ex)
    assert obs.keys == ("http:POST api.example.com/v1/chat/completions 201",)
    assert obs.fingerprints() == {"model": "gpt-test"} and not notes


def test_next_request_finishes_the_previous_one_without_status():
    a = ExchangeAssembler(KEY)
    head = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    a.on_capture(_cap(head, HTTP_F_HEAD))
    a.on_capture(_cap(head.replace(b"/a", b"/b"), HTTP_F_HEAD))
    a.on_capture(_cap(b"HTTP/1.1 404 Not Found\r\n\r\n", HTTP_F_RESPONSE, pid=0))  # skb: no pid
    exs, _ = a.take()
    assert [(e.request.path, e.status) for e in exs] == [("/a", None), ("/b", 404)]


def test_a_request_waits_for_its_response_only_so_long():
    a = ExchangeAssembler(KEY, response_timeout=1.0)
    a.on_capture(_cap(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", HTTP_F_HEAD, ktime=0))
    a.expire(500_000_000)
    assert a.take() == ([], [])
    a.expire(2_000_000_000)
    (ex,), _ = a.take()
    assert ex.status is None


def test_cut_bodies_are_marked_and_chunked_bodies_decoded():
    a = ExchangeAssembler(KEY)
    a.on_capture(_cap(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc", HTTP_F_HEAD))
    a.flush()
    (ex,), _ = a.take()
    assert ex.request.truncated and ex.request.body == b"abc"
    assert dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n") == (b"abcde", True)
    assert dechunk(b"5\r\nab") == (b"ab", False)


def test_what_cannot_be_decoded_is_a_finding():
    a = ExchangeAssembler(KEY)
    a.on_conn(events.HttpConnEvent(1, 42, 100, 9, 9, 5, 4, "10.0.0.9", 443, False))
    a.on_capture(_cap(b"", HTTP_F_H2 | HTTP_F_TLS, conn=8))
    a.on_capture(_cap(b"", HTTP_F_UNPARSED, conn=9))
    a.on_capture(_cap(b"GARBAGE\r\n\r\n", HTTP_F_HEAD, conn=10))
    a.flush()
    exs, findings = a.take()
    assert not exs
    kinds = {f.kind: f.detail for f in findings}
    assert set(kinds) == {"http2", "other-protocol", "unparsed"}
    assert "10.0.0.9:443" in kinds["other-protocol"]


def test_parse_head_refuses_what_is_not_http1():
    for bad in (b"GET /x\r\n\r\n", b"GET /x HTTP/2\r\n\r\n", b"GET /x HTTP/1.1\r\n folded\r\n\r\n",
                b"GET /x HTTP/1.1\r\nno colon\r\n\r\n"):
        with pytest.raises(HeadError):
            parse_head(bad)
    method, target, headers, body, complete = parse_head(b"\r\nGET /x HTTP/1.1\r\nA: b\r\n\r\nrest")
    assert (method, target, headers, body, complete) == ("GET", "/x", (("A", "b"),), b"rest", True)


def test_server_name_of_a_real_client_hello(tmp_path):
    """A ClientHello made by OpenSSL itself (through Python's ssl, with a memory BIO)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="api.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert server_name(hello[:512]) == "api.example.com"
    assert server_name(b"\x16\x03\x01") is None and server_name(b"GET / HTTP/1.1") is None


# ---- TLS stacks -----------------------------------------------------------------------------------


def test_tls_stack_classification():
    lib = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    assert classify(["/usr/bin/python3.11", lib], "/usr/bin/python3.11", ElfFacts(), {lib}).kind == "openssl-dynamic"
    assert not classify([lib], "/x", ElfFacts(), set()).observable
    static = ElfFacts(symbols={"SSL_write": 1, "SSL_read": 2})
    assert classify([], "/usr/bin/node", static, set()).kind == "openssl-static"
    assert classify([], "/agent", ElfFacts(go=True), set()) .text == "go:/agent"
    assert not classify([], "/agent", ElfFacts(go=True), set()).observable
    assert classify(["/usr/lib/libnss3.so", "/usr/lib/libssl3.so"], "/ff", ElfFacts(), set()).kind == "nss"
    assert classify([], "/bin/sh", ElfFacts(), set()).kind == "none"


def test_elf_facts_of_the_system_libssl():
    out = subprocess.run(["/usr/bin/python3", "-c", "import ssl, _ssl; print(_ssl.__file__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    maps = [line.split()[-1] for line in open("/proc/self/maps") if "libssl.so" in line]
    assert maps, f"this interpreter maps no libssl ({out})"
    f = elf_facts(maps[0])
    assert f.hookable and {"SSL_write_ex", "SSL_read_ex", "SSL_write", "SSL_read"} <= set(f.symbols)
    assert not elf_facts("/bin/true").hookable
    # OpenSSL 3 here: the _ex forms' probes sit on the function they call, SSL_read/SSL_write call
    # it too and need none; every probed instruction is one the kernel emulates (no single step)
    sites = {s.function: s for s in f.sites}
    assert set(sites) == {"SSL_read_ex", "SSL_write_ex", "SSL_do_handshake"}, f.sites
    assert sites["SSL_read_ex"].body and sites["SSL_write_ex"].body
    with open(maps[0], "rb") as lib:
        for site in f.sites:
            assert not site.single_step
            lib.seek(site.offset)
            assert emulated(lib.read(16)), site


def _code(blobs: dict[int, bytes]):
    """A file of code: bytes at offsets, zeros elsewhere."""
    def read(off: int, n: int) -> bytes:
        out = bytearray(n)
        for at, b in blobs.items():
            for i, x in enumerate(b):
                if off <= at + i < off + n:
                    out[at + i - off] = x
        return bytes(out)
    return read


def _call(at: int, target: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)


SUB8 = b"\x48\x83\xec\x08"     # sub $8,%rsp: single-stepped
ENDBR = b"\xf3\x0f\x1e\xfa"    # endbr64: single-stepped
PUSH_R13 = b"\x41\x55"
STACK_GUARD = b"\x48\x83\xec\x18\x64\x48\x8b\x04\x25\x28\x00\x00\x00"  # sub $0x18,%rsp; mov %fs:0x28,%rax


def test_probe_sites_move_off_single_stepped_stubs_onto_the_body_they_call():
    body_r, body_w = 0x2000, 0x3000
    code = _code({
        0x100: SUB8 + _call(0x104, body_r),                  # SSL_read_ex: sub; call body
        0x200: STACK_GUARD + b"\x90" * 8 + _call(0x215, body_r),  # SSL_read calls the same body
        0x300: ENDBR + SUB8 + _call(0x308, body_w),          # SSL_write_ex, built with CET
        0x400: STACK_GUARD + _call(0x40d, 0x5000),           # SSL_write calls something else
        0x500: b"\x53\x48\x83\xec\x30",                    # SSL_do_handshake: push %rbx first
        body_r: PUSH_R13, body_w: ENDBR + PUSH_R13,
    })
    syms = {"SSL_read_ex": 0x100, "SSL_read": 0x200, "SSL_write_ex": 0x300, "SSL_write": 0x400,
            "SSL_do_handshake": 0x500}
    sites = {s.function: s for s in probe_sites(syms, code)}
    assert sites["SSL_read_ex"] == ProbeSite("SSL_read_ex", body_r, body=True)
    assert "SSL_read" not in sites  # seen through the body
    # SSL_write calls something else, which may reach the body: SSL_write_ex stays on its entry,
    # so no write is ever seen twice
    assert sites["SSL_write_ex"] == ProbeSite("SSL_write_ex", 0x300, single_step=True)
    assert sites["SSL_write"] == ProbeSite("SSL_write", 0x400, single_step=True)
    assert sites["SSL_do_handshake"] == ProbeSite("SSL_do_handshake", 0x500)


def test_probe_sites_never_probe_a_plain_function_and_the_body_it_may_call():
    body = 0x2000
    # SSL_write begins with a push (emulated) and calls the body SSL_write_ex's probes move to
    pushing = _code({0x100: SUB8 + _call(0x104, body), 0x200: b"\x53\x48\x83\xec\x10" + _call(0x205, body),
                     body: PUSH_R13})
    assert probe_sites({"SSL_write_ex": 0x100, "SSL_write": 0x200}, pushing) == (
        ProbeSite("SSL_write_ex", body, body=True),)
    # SSL_write's call of the body lies past the bytes read: not known, so both stay on their entries
    far = _code({0x100: SUB8 + _call(0x104, body), 0x200: SUB8 + b"\x90" * 200 + _call(0x2cc, body),
                 body: PUSH_R13})
    assert set(probe_sites({"SSL_write_ex": 0x100, "SSL_write": 0x200}, far)) == {
        ProbeSite("SSL_write_ex", 0x100, single_step=True), ProbeSite("SSL_write", 0x200, single_step=True)}


def test_probe_sites_keep_the_entry_when_nothing_better_is_known():
    # a stub whose body begins with a single-stepped instruction, and a plain function
    code = _code({0x100: SUB8 + _call(0x104, 0x2000), 0x2000: SUB8, 0x200: STACK_GUARD,
                  0x300: ENDBR + b"\x55"})
    sites = probe_sites({"SSL_read_ex": 0x100, "SSL_read": 0x200, "SSL_write_ex": 0x300}, code)
    assert sites == (ProbeSite("SSL_write_ex", 0x304), ProbeSite("SSL_read", 0x200, single_step=True),
                     ProbeSite("SSL_read_ex", 0x100, single_step=True))
    assert emulated(b"\x0f\x1f\x44\x00\x00") and emulated(b"\x0f\x84\0\0\0\0") and not emulated(b"\x31\xd2")


# ---- behaviours of an exchange --------------------------------------------------------------------


def test_unkeyable_requests_are_findings_not_keys():
    from sensor.httpexchange import Exchange
    ex = Exchange(1, 42, 100, False, CapturedRequest("GET", "", "/x"), 200)
    obs, notes = exchange_behaviours(ex)
    assert obs is None and notes


def test_variable_length_record_decodes_only_its_size():
    data = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    rec = HttpCaptureRecord.pack(type=24, version=1, size=64 + len(data), len=len(data), data=data)
    assert decode(rec[:64 + len(data) - 1]).kind == "decode_error"  # shorter than its header says
    bad = bytearray(rec[:64 + len(data)])
    struct.pack_into("<I", bad, 4, 63)  # smaller than the head
    assert decode(bytes(bad)).kind == "decode_error"
    assert decode(rec[:64 + len(data)]).data == data
    assert HTTP_F_TRUNCATED and HTTP_F_TLS_RECORD  # flags the kernel sets, mirrored


def test_a_model_observed_at_run_time_is_a_fingerprint_input_and_checked_as_one():
    """The aggregator keeps the model of each cgroup's requests (the profile's fingerprint, and
    the live values the stale check judges); a model the policy was not derived under fires."""
    from enforcer.policy import Policy
    from enforcer.validity import check
    from sensor.aggregate import Aggregator
    from sensor.httpcapture import RequestObserved
    from sensor.workload import Workload

    agg = Aggregator("n1", None, str)
    w = Workload.host("agent")
    agg.bind(7, w, "s1")
    agg.on_event(RequestObserved(1, 7, 100, ("http:POST api.example.com/v1/chat/completions 200",), "gpt-b"), 5.0)
    assert agg.profile(w).fingerprints()["model"] == ["gpt-b"]
    assert agg.runtime_fingerprints[7] == {"model": {"gpt-b"}}
    assert "http:POST api.example.com/v1/chat/completions 200" in agg.profile(w).behaviours()
    pol = Policy(w, validity={"fingerprint": {"model": ["gpt-a"]},
                              "triggers": [{"name": "model-version-change", "key": "model"}]})
    res = check(pol, {"model": "gpt-b"})
    assert res["stale"] and res["triggers"][0]["trigger"] == "model-version-change"
    agg.unbind(7)
    assert 7 not in agg.runtime_fingerprints
