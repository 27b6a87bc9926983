"""JSON-RPC framing, validation and the revisions the gateway speaks (pure)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import mcp_protocol as proto


def test_revisions_are_the_ones_the_official_sdk_speaks():
    version = pytest.importorskip("mcp_types.version")
    assert proto.HANDSHAKE_REVISIONS == tuple(version.HANDSHAKE_PROTOCOL_VERSIONS)
    assert proto.STATELESS_REVISIONS == tuple(version.MODERN_PROTOCOL_VERSIONS)
    import mcp_types

    assert proto.PROTOCOL_VERSION_META == mcp_types.PROTOCOL_VERSION_META_KEY
    assert proto.HEADER_MISMATCH == mcp_types.HEADER_MISMATCH


@pytest.mark.parametrize("body,kind", [
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, "request"),
    ({"jsonrpc": "2.0", "id": "a", "method": "tools/call", "params": {"name": "x"}}, "request"),
    ({"jsonrpc": "2.0", "method": "notifications/initialized"}, "notification"),
    ({"jsonrpc": "2.0", "id": 3, "result": {}}, "response"),
    ({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "x"}}, "error"),
])
def test_valid_messages(body, kind):
    m = proto.parse(json.dumps(body).encode())
    assert isinstance(m, proto.Message) and m.kind == kind and m.body == body


@pytest.mark.parametrize("raw,code,needle", [
    (b"{not json", proto.PARSE_ERROR, "parse error"),
    (b"\xff\xfe{}", proto.PARSE_ERROR, "UTF-8"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":NaN}}', proto.PARSE_ERROR, "parse error"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}', proto.PARSE_ERROR, "twice"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"x"}]', proto.INVALID_REQUEST, "batches"),
    (b'"hello"', proto.INVALID_REQUEST, "object"),
    (b'{"jsonrpc":"1.0","id":1,"method":"x"}', proto.INVALID_REQUEST, "jsonrpc"),
    (b'{"jsonrpc":"2.0","id":true,"method":"x"}', proto.INVALID_REQUEST, "id"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"x"}', proto.INVALID_REQUEST, "id"),
    (b'{"jsonrpc":"2.0","id":null,"method":"x"}', proto.INVALID_REQUEST, "id"),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', proto.INVALID_REQUEST, "method"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}', proto.INVALID_REQUEST, "params"),
    (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}', proto.INVALID_REQUEST, "exactly one"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}', proto.INVALID_REQUEST, "error"),
    (b'{"jsonrpc":"2.0","result":{}}', proto.INVALID_REQUEST, "neither"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":' + b"9" * 5000 + b"}}", proto.PARSE_ERROR, "parse error"),
])
def test_malformed_messages_name_the_problem(raw, code, needle):
    m = proto.parse(raw)
    assert isinstance(m, proto.Malformed)
    assert m.code == code and needle in m.message


def test_the_id_of_a_malformed_request_is_kept_for_the_answer():
    m = proto.parse(b'{"jsonrpc":"2.0","id":7,"method":"x","params":[1]}')
    assert isinstance(m, proto.Malformed) and m.id == 7


def test_oversized_and_deeply_nested_messages_are_refused_before_use():
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"p": "a" * 2000}}).encode()
    m = proto.parse(big, limit=1000)
    assert isinstance(m, proto.Malformed) and "exceeds" in m.message and m.size == len(big)
    deep = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + b"[" * 100 + b"]" * 100 + b"}}"
    m = proto.parse(deep)
    assert isinstance(m, proto.Malformed) and "nested" in m.message
    very_deep = b"[" * 100_000 + b"]" * 100_000
    assert isinstance(proto.parse(very_deep), proto.Malformed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_never_raises_on_arbitrary_bytes(data):
    assert isinstance(proto.parse(data), (proto.Message, proto.Malformed))


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.text(max_size=10)), st.text(min_size=1, max_size=20),
       st.dictionaries(st.text(max_size=8), _json, max_size=5))
def test_encode_parse_round_trip(rid, method, params):
    body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
    data = proto.encode(body)
    assert b"\n" not in data
    m = proto.parse(data)
    assert isinstance(m, proto.Message) and m.body == body


def test_line_framer_splits_chunks_and_skips_blank_lines():
    f = proto.LineFramer(limit=100)
    assert f.feed(b'{"a":1}\r\n\n{"b"') == [b'{"a":1}']
    assert f.feed(b':2}\n{"c":3}') == [b'{"b":2}']
    assert f.close() == [b'{"c":3}']


def test_line_framer_skips_an_oversized_line_without_holding_it():
    f = proto.LineFramer(limit=100)
    out = f.feed(b'{"jsonrpc":"2.0","id":42,' + b"x" * 150)
    assert len(out) == 1 and isinstance(out[0], proto.Oversized)
    assert out[0].prefix.startswith(b'{"jsonrpc":"2.0","id":42,')
    for _ in range(50):  # 5 MB more of the same line: nothing kept, nothing returned
        assert f.feed(b"y" * 100_000) == []
        assert len(f._buf) == 0
    assert f.feed(b'tail"}\n{"ok":1}\n') == [b'{"ok":1}']


def test_routing_headers_must_agree_with_the_body():
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "git_log", "_meta": {proto.PROTOCOL_VERSION_META: "2026-07-28"}}}
    msg = proto.parse(json.dumps(body).encode())
    good = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "git_log"}
    assert proto.routing_mismatch(msg, good) is None
    assert proto.routing_mismatch(msg, dict(good, **{"mcp-name": "=?base64?Z2l0X2xvZw==?="})) is None
    assert "mcp-name" in proto.routing_mismatch(msg, dict(good, **{"mcp-name": "git_status"}))
    assert "mcp-name" in proto.routing_mismatch(msg, {k: v for k, v in good.items() if k != "mcp-name"})
    assert "mcp-method" in proto.routing_mismatch(msg, dict(good, **{"mcp-method": "tools/list"}))
    assert "mcp-protocol-version" in proto.routing_mismatch(msg, dict(good, **{"mcp-protocol-version": "2025-11-25"}))
