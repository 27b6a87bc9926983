"""MCP wire protocol: JSON-RPC 2.0 framing and validation, and the revisions the gateway speaks.

Pure: bytes in, a :class:`Message` or a :class:`Malformed` out; no I/O, no clock.

Revisions. The official Python SDK (``mcp`` 2.3, ``mcp_types.version``) speaks two eras:

- **handshake** revisions ``2024-11-05``, ``2025-03-26``, ``2025-06-18``, ``2025-11-25``: an
  ``initialize`` request negotiates the version; streamable HTTP carries a server-minted
  ``Mcp-Session-Id``, a GET stream for server messages and DELETE to end the session;
- the **stateless** revision ``2026-07-28``: no handshake and no session; every request carries
  ``params._meta["io.modelcontextprotocol/protocolVersion"]`` and the client capabilities, over
  HTTP also the ``MCP-Protocol-Version``, ``Mcp-Method`` and ``Mcp-Name`` routing headers; a
  ``server/discover`` request replaces ``initialize``; results carry ``resultType``.

The SDK's client (``mode="auto"``, its default) probes ``server/discover`` at 2026-07-28 and
falls back to ``initialize`` at 2025-11-25. The gateway relays both unchanged.

Framing limits. A message larger than ``limit`` bytes is refused before it is parsed. JSON that
does not parse, uses ``NaN``/``Infinity``, repeats a key in one object (two readers could see two
different messages), nests too deeply, or is a batch (an array; MCP removed batching in
2025-06-18 and the SDK never sends one) is :class:`Malformed` with the JSON-RPC code to answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

HANDSHAKE_REVISIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
STATELESS_REVISIONS = ("2026-07-28",)
REVISIONS = HANDSHAKE_REVISIONS + STATELESS_REVISIONS

PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
HEADER_PROTOCOL_VERSION = "mcp-protocol-version"
HEADER_METHOD = "mcp-method"
HEADER_NAME = "mcp-name"
HEADER_SESSION = "mcp-session-id"
# Request params mirrored into the Mcp-Name header (stateless revision).
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the SDK's own request-body limit
MAX_NESTING = 64

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # spec-defined (2026-07-28)
# Implementation-defined server errors live in -32000..-32019; the SDK uses -32000 and -32001.
REFUSED = -32010  # a request Envelope's policy refused
UPSTREAM_FAILED = -32011  # the server's answer could not be relayed (too large, malformed, gone)


@dataclass(frozen=True)
class Message:
    """One valid JSON-RPC 2.0 message. ``kind`` is request, notification, response or error."""

    kind: str
    body: dict
    size: int

    @property
    def id(self) -> Any:
        return self.body.get("id")

    @property
    def method(self) -> str | None:
        return self.body.get("method")

    @property
    def params(self) -> dict:
        p = self.body.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def result(self) -> Any:
        return self.body.get("result")

    @property
    def is_request(self) -> bool:
        return self.kind == "request"

    @property
    def is_reply(self) -> bool:
        return self.kind in ("response", "error")


@dataclass(frozen=True)
class Malformed:
    """A message that is not valid JSON-RPC 2.0, with the error to answer it with."""

    code: int
    message: str
    id: Any = None  # the request id, when it could be read
    size: int = 0


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(v: Any, limit: int) -> bool:
    """True when ``v`` nests no deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(v, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            return False
        if isinstance(node, dict):
            stack.extend((x, d + 1) for x in node.values())
        elif isinstance(node, list):
            stack.extend((x, d + 1) for x in node)
    return True


def _valid_id(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def parse(data: bytes | str, limit: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message | Malformed:
    """Decode and validate one JSON-RPC 2.0 message."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    size = len(raw)
    if size > limit:
        return Malformed(INVALID_REQUEST, f"message of {size} bytes exceeds the gateway's limit of {limit} bytes",
                         size=size)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Malformed(PARSE_ERROR, f"parse error: not UTF-8 (byte {e.start})", size=size)
    try:
        body = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as e:
        return Malformed(PARSE_ERROR, f"parse error: key {str(e)[:64]!r} appears twice in one object", size=size)
    except RecursionError:
        return Malformed(PARSE_ERROR, "parse error: nested too deeply", size=size)
    except ValueError as e:  # JSONDecodeError, oversized integer literals, NaN/Infinity
        return Malformed(PARSE_ERROR, f"parse error: {str(e)[:120]}", size=size)
    return validate(body, size)


def validate(body: Any, size: int = 0) -> Message | Malformed:
    """Check the JSON-RPC 2.0 envelope of a decoded message."""
    if isinstance(body, list):
        return Malformed(INVALID_REQUEST, "JSON-RPC batches are not supported (MCP removed them in 2025-06-18)",
                         size=size)
    if not isinstance(body, dict):
        return Malformed(INVALID_REQUEST, f"invalid request: a JSON-RPC message is an object, not "
                                          f"{type(body).__name__}", size=size)
    mid = body.get("id")
    rid = mid if _valid_id(mid) else None
    if not _depth(body, MAX_NESTING):
        return Malformed(INVALID_REQUEST, f"invalid request: nested deeper than {MAX_NESTING} levels", rid, size)
    if body.get("jsonrpc") != "2.0":
        return Malformed(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', rid, size)
    if "method" in body:
        method = body["method"]
        if not isinstance(method, str) or not method:
            return Malformed(INVALID_REQUEST, 'invalid request: "method" must be a non-empty string', rid, size)
        if "result" in body or "error" in body:
            return Malformed(INVALID_REQUEST, "invalid request: a request carries no result or error", rid, size)
        if "params" in body and not isinstance(body["params"], dict):
            return Malformed(INVALID_REQUEST, 'invalid request: "params" must be an object', rid, size)
        if "id" not in body:
            return Message("notification", body, size)
        if not _valid_id(mid):
            return Malformed(INVALID_REQUEST, 'invalid request: "id" must be a string or an integer', None, size)
        return Message("request", body, size)
    if "id" not in body:
        return Malformed(INVALID_REQUEST, "invalid request: neither a request (method) nor a response (id)",
                         None, size)
    has_result, has_error = "result" in body, "error" in body
    if has_result == has_error:
        return Malformed(INVALID_REQUEST, "invalid response: exactly one of result and error is required", rid,
                         size)
    if has_error:
        err = body["error"]
        if not (isinstance(err, dict) and isinstance(err.get("code"), int) and not isinstance(err.get("code"), bool)
                and isinstance(err.get("message"), str)):
            return Malformed(INVALID_REQUEST, "invalid response: error needs an integer code and a string message",
                             rid, size)
        if mid is not None and not _valid_id(mid):
            return Malformed(INVALID_REQUEST, 'invalid response: "id" must be a string, an integer or null', None,
                             size)
        return Message("error", body, size)
    if not _valid_id(mid):
        return Malformed(INVALID_REQUEST, 'invalid response: "id" must be a string or an integer', None, size)
    return Message("response", body, size)


def encode(body: Any) -> bytes:
    """Compact UTF-8 JSON for the wire (one line: JSON escapes every newline inside strings)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def id_key(v: Any) -> tuple[str, Any]:
    """A dictionary key for a request id that keeps ``1`` and ``"1"`` apart."""
    return ("s", v) if isinstance(v, str) else ("i", v)


def error_response(req_id: Any, code: int, message: str, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


def stateless_version(msg: Message) -> str | None:
    """The per-request protocol version of a stateless-revision request, else None."""
    meta = msg.params.get("_meta")
    if isinstance(meta, dict):
        v = meta.get(PROTOCOL_VERSION_META)
        if isinstance(v, str):
            return v
    return None


def routing_mismatch(msg: Message, headers: dict[str, str]) -> str | None:
    """For a stateless-revision HTTP request: which routing header disagrees with the body, if any.

    A gateway that judged the body while something downstream routed by the headers could be
    told one thing and do another, so a disagreement is refused (the SDK's server refuses it too).
    """
    version = stateless_version(msg)
    if version is None:
        return None
    if headers.get(HEADER_PROTOCOL_VERSION) != version:
        return f"{HEADER_PROTOCOL_VERSION} header does not match params._meta protocol version {version!r}"
    if headers.get(HEADER_METHOD) != msg.method:
        return f"{HEADER_METHOD} header does not match method {msg.method!r}"
    name_param = NAME_PARAMS.get(msg.method or "")
    if name_param is not None:
        value = msg.params.get(name_param)
        header = headers.get(HEADER_NAME)
        if value is not None and (header is None or _decode_header(header) != value):
            return f"{HEADER_NAME} header does not match params.{name_param}"
    return None


def _decode_header(value: str) -> str | None:
    """The SDK's header value codec: ``=?base64?...?=`` wraps values that are not plain ASCII."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


# ---- stdio framing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Oversized:
    """A line longer than the limit: only its first bytes were kept, the rest was skipped."""

    size: int  # bytes seen when the limit was passed
    prefix: bytes


class LineFramer:
    """Newline-delimited messages (the stdio transport) with a bound on a line's length.

    ``feed(chunk)`` returns complete lines (without the newline; a trailing ``\\r`` is dropped,
    blank lines are skipped) and, for a line over ``limit`` bytes, one :class:`Oversized` as
    soon as the limit is passed. The rest of such a line is skipped without being buffered, so a
    peer can never make the gateway hold more than ``limit`` bytes of one line.
    """

    PREFIX = 4096

    def __init__(self, limit: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.limit = limit
        self._buf = bytearray()
        self._skipping = 0  # bytes of an oversized line seen so far, 0 when not skipping

    def feed(self, chunk: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        start = 0
        while start < len(chunk):
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl
            piece = chunk[start:end]
            if self._skipping:
                self._skipping += len(piece)
            elif len(self._buf) + len(piece) > self.limit:
                self._skipping = len(self._buf) + len(piece)
                head = bytes(self._buf[:self.PREFIX]) + piece[:max(0, self.PREFIX - len(self._buf))]
                self._buf.clear()
                out.append(Oversized(self._skipping, head))
            else:
                self._buf += piece
            if nl < 0:
                break
            if self._skipping:
                self._skipping = 0
            else:
                line = bytes(self._buf).rstrip(b"\r")
                self._buf.clear()
                if line.strip():
                    out.append(line)
            start = nl + 1
        return out

    def close(self) -> list[bytes]:
        """The last line if the stream ended without a newline."""
        line = bytes(self._buf).rstrip(b"\r")
        self._buf.clear()
        skipping, self._skipping = self._skipping, 0
        return [line] if line.strip() and not skipping else []
