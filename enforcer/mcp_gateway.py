"""The MCP gateway's core: messages in, decisions out (pure), and the driver that hands its
events to a sink and a reporter.

:class:`GatewayCore` sees every message between one MCP client and one MCP server, per session,
and returns a :class:`Decision`: the bytes to pass on (the original bytes unless the gateway had
to change them), an answer to send back to the sender instead, and the events it produced. It
never does I/O and takes the time as an argument; the transports (:mod:`enforcer.mcp_stdio`,
:mod:`enforcer.mcp_http`) do the rest.

What it does with each message:

- **Framing.** Anything that is not valid JSON-RPC 2.0 or is larger than the limit (from either
  side) is not relayed. A client gets a JSON-RPC error naming the problem; a broken server reply
  is turned into an error reply for the client's pending request when its id can be known.
- **Sessions and revisions.** ``initialize`` marks a session as handshake-era and records the
  negotiated version; ``server/discover`` or a request carrying the per-request protocol version
  marks it stateless-era. Refusals are written in the session's era (stateless results carry
  ``resultType``).
- **Observation.** ``tools/list``, ``tools/call`` (name and arguments), ``resources/read`` (the
  URI, or the server-declared URI template it matches) and ``prompts/get`` (name and arguments)
  become :class:`Observed` events; a complete tool listing becomes a :class:`CatalogSeen` event
  with each tool's definition hash and the catalog fingerprint. A call is observed when it is
  relayed to the server: a refused call is a finding, never evidence.
- **Modes.** ``observe`` relays everything. ``alert`` relays everything and reports calls
  outside the envelope (:class:`Finding`, action ``alerted``). ``enforce`` answers an
  out-of-envelope ``tools/call`` in-band with an error result the agent can read (``isError``
  with the reason), answers a refused ``tools/list``, ``resources/read`` or ``prompts/get`` with
  a JSON-RPC error, leaves tools outside the allowlist out of ``tools/list``, and fails closed: a
  call it cannot evaluate is refused, and a call sent as a notification (no id, so nothing to
  answer) is not relayed. The mode can change while the gateway runs (:meth:`GatewayCore.set_mode`,
  driven by ``envelope mode``), and so can the active exceptions the judge honours; a request
  inside the envelope only thanks to an exception is an :class:`Admitted` event.
- **Validity.** A listed tool whose definition hash differs from the one the policy recorded
  is a :class:`Stale` event (a rug pull or a poisoned tool); in enforce mode that tool is left out
  of listings and its calls are refused until the policy is re-derived. The catalog fingerprint
  of every complete listing goes out as :class:`CatalogSeen`, for the validity check at the edge.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import structlog

from sensor.mcp_evidence import (
    TOOLS_LIST,
    catalog_fingerprint,
    flatten,
    prompt_get_key,
    resource_read_key,
    tool_call_key,
    tool_hash,
)

from . import mcp_protocol as proto
from .mcp_envelope import EvaluationError, McpJudge, Verdict
from .modes import MODES

log = structlog.get_logger("envelope.mcp")

REFUSAL_META = "dev.envelope/refusal"
JUDGED = ("tools/call", "prompts/get", "resources/read")
_PREFIX_ID = re.compile(rb'^\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,256}")')


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = proto.DEFAULT_MAX_MESSAGE_BYTES
    max_pending: int = 4096  # requests in flight per session
    max_templates: int = 256  # resource templates remembered per session
    max_listing: int = 10_000  # tools remembered while a paginated listing is walked


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    session: str
    key: str
    arguments: dict  # {path: [tokens]} (sensor.mcp_evidence.flatten)
    cut: bool
    ts: float


@dataclass(frozen=True)
class CatalogSeen:
    session: str
    fingerprint: str
    tools: dict  # {name: tool hash}
    ts: float


@dataclass(frozen=True)
class Finding:
    """A call outside the envelope: refused (``denied``) or relayed and reported (``alerted``)."""

    session: str
    behaviour: str
    action: str
    reason: str
    entry: str
    ts: float
    watch: bool = False
    detail: dict = field(default_factory=dict)

    def violation(self, workload: str) -> dict:
        """The record in :class:`enforcer.violations.Violation` shape (substrate ``mcp``)."""
        return {"time": self.ts, "workload": workload, "substrate": "mcp", "behaviour": self.behaviour,
                "action": self.action, "count": 1,
                "detail": {"session": self.session, "reason": self.reason, "entry": self.entry,
                           "watch": self.watch, **self.detail}}


@dataclass(frozen=True)
class Stale:
    """A listed tool's definition differs from the one the envelope was derived with."""

    session: str
    tool: str
    recorded: str
    current: str
    ts: float


@dataclass(frozen=True)
class Admitted:
    """A request allowed only because an active exception covers it."""

    session: str
    behaviour: str
    exception: str
    ts: float


@dataclass(frozen=True)
class Problem:
    """A message the gateway would not relay."""

    session: str
    direction: str  # client | server
    code: int
    message: str
    size: int
    ts: float


@dataclass
class Decision:
    forward: bytes | None = None  # pass on to the other side
    reply: bytes | None = None  # answer the sender with this instead
    events: list = field(default_factory=list)
    status: int = 200  # the HTTP status to answer with when ``reply`` is set


@dataclass
class _Pending:
    method: str
    key: str | None = None


@dataclass
class _Shared:
    """What one session knows across its exchanges."""

    era: str | None = None  # handshake | stateless
    version: str | None = None
    templates: tuple = ()
    changed: dict = field(default_factory=dict)  # tool name -> current hash, differing from the envelope


@dataclass
class SessionState:
    """One stream of messages: a whole session (stdio, an HTTP MCP session) or one exchange of it
    (a stateless HTTP POST), which shares what the session knows but keeps its own pending ids."""

    id: str
    label: str  # the session its observations and findings belong to
    shared: _Shared = field(default_factory=_Shared)
    pending: dict = field(default_factory=dict)
    listing: dict = field(default_factory=dict)  # tools of the tools/list walk in progress


# ---- the core -------------------------------------------------------------------------------


class GatewayCore:
    def __init__(self, judge: McpJudge | None, mode: str, limits: Limits | None = None):
        self.judge = judge
        self.mode = "observe"
        self.set_mode(mode)
        self.limits = limits or Limits()
        self.sessions: dict[str, SessionState] = {}

    def set_mode(self, mode: str) -> None:
        """Judge from now on in ``mode`` (a running gateway follows ``envelope mode``)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if self.judge is None and mode != "observe":
            raise ValueError(f"mode {mode} needs a policy to judge calls against")
        self.mode = mode

    def session(self, sid: str) -> SessionState:
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = SessionState(sid, sid)
        return s

    def share(self, exchange: str, sid: str) -> None:
        """Start ``exchange``: its own pending requests, everything else from session ``sid``."""
        parent = self.session(sid)
        self.sessions[exchange] = SessionState(exchange, parent.label, parent.shared)

    def adopt(self, old: str, new: str) -> None:
        """Session ``new`` begins with what exchange ``old`` started (an initialize answered with a
        session id): its pending requests and era move over."""
        s = self.sessions.pop(old, None)
        target = self.session(new)
        if s is not None:
            target.pending.update(s.pending)
            target.shared.era = target.shared.era or s.shared.era
            target.shared.version = target.shared.version or s.shared.version

    def end_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    # ---- client -> server ----------------------------------------------------------------

    def from_client(self, sid: str, data: bytes, now: float, headers: dict[str, str] | None = None) -> Decision:
        s = self.session(sid)
        msg = proto.parse(data, self.limits.max_message_bytes)
        if isinstance(msg, proto.Malformed):
            status = 413 if msg.size > self.limits.max_message_bytes else 400
            return Decision(reply=proto.encode(proto.error_response(msg.id, msg.code, msg.message)),
                            events=[Problem(sid, "client", msg.code, msg.message, msg.size, now)], status=status)
        if msg.kind == "notification":
            if msg.method in JUDGED and self.mode == "enforce":
                # a call without an id gets no answer, but a server could still act on it: not relayed
                message = f"{msg.method} without an id is not relayed (a call must be a request)"
                return Decision(events=[Problem(s.label, "client", proto.INVALID_REQUEST, message, msg.size, now)])
            if msg.method == "notifications/cancelled":
                rid = msg.params.get("requestId")
                if proto._valid_id(rid):
                    s.pending.pop(proto.id_key(rid), None)
            return Decision(forward=data)
        if msg.kind != "request":
            return Decision(forward=data)  # the client's answer to a server request
        return self._request(s, msg, data, now, headers)

    def _request(self, s: SessionState, msg: proto.Message, data: bytes, now: float,
                 headers: dict[str, str] | None) -> Decision:
        k = proto.id_key(msg.id)
        if k in s.pending:
            return self._error(msg, proto.INVALID_REQUEST, f"request id {msg.id!r} is already in use in this session",
                               s, now)
        if len(s.pending) >= self.limits.max_pending:
            return self._error(msg, proto.INVALID_REQUEST,
                               f"more than {self.limits.max_pending} requests in flight in this session", s, now)
        method = msg.method or ""
        version = proto.stateless_version(msg)
        sh = s.shared
        if method == "initialize":
            sh.era = "handshake"
            v = msg.params.get("protocolVersion")
            sh.version = v if isinstance(v, str) else None
        elif method == "server/discover" or version is not None:
            sh.era, sh.version = "stateless", version or sh.version
        if headers is not None and self.mode == "enforce":
            mismatch = proto.routing_mismatch(msg, headers)
            if mismatch:
                return self._error(msg, proto.HEADER_MISMATCH, mismatch, s, now)

        events: list = []
        key: str | None = None
        if method == "tools/list":
            key = TOOLS_LIST
            if self.mode != "observe":
                refused = self._verdict(s, msg, key, self.judge.judge_method(method), now, method, events)
                if refused is not None:
                    return refused
            events.append(Observed(s.label, key, {}, False, now))
        elif method in ("tools/call", "prompts/get"):
            name = msg.params.get("name")
            arguments = msg.params.get("arguments")
            if not isinstance(name, str) or not name:
                if self.mode == "enforce":
                    return self._error(msg, proto.INVALID_PARAMS, f"{method}: params.name must be a non-empty string",
                                       s, now)
                return Decision(forward=data)
            key = tool_call_key(name) if method == "tools/call" else prompt_get_key(name)
            verdict = self._judge(s, method, name, key, arguments)
            if verdict is not None:
                refused = self._verdict(s, msg, key, verdict, now, name, events)
                if refused is not None:
                    return refused
            flat, cut = flatten(arguments)
            events.append(Observed(s.label, key, flat, cut, now))
        elif method == "resources/read":
            uri = msg.params.get("uri")
            if not isinstance(uri, str) or not uri:
                if self.mode == "enforce":
                    return self._error(msg, proto.INVALID_PARAMS, "resources/read: params.uri must be a string", s, now)
                return Decision(forward=data)
            template = next((t for t in s.shared.templates if _template_matches(t, uri)), None)
            key = resource_read_key(template or uri)
            if self.mode != "observe":
                refused = self._verdict(s, msg, key, self.judge.judge_resource(uri, template, key), now, uri, events)
                if refused is not None:
                    return refused
            events.append(Observed(s.label, key, {}, False, now))
        s.pending[k] = _Pending(method, key)
        return Decision(forward=data, events=events)

    def _verdict(self, s: SessionState, msg: proto.Message, key: str, verdict: Verdict, now: float, name: str,
                 events: list) -> Decision | None:
        """Act on a verdict: the refusal to answer with (enforce), or None with the finding or the
        exception that admitted the request added to ``events``."""
        if not verdict.allowed:
            finding = self._finding(s, key, verdict, now, msg.method or "", name)
            if self.mode == "enforce":
                return self._refuse(msg, s, verdict, finding)
            events.append(finding)
        elif verdict.exception:
            events.append(Admitted(s.label, key, verdict.exception, now))
        return None

    def _judge(self, s: SessionState, method: str, name: str, key: str, arguments: Any) -> Verdict | None:
        if self.mode == "observe":
            return None
        if method == "tools/call" and name in s.shared.changed:
            return Verdict(False, f"the definition of tool {name!r} changed since the policy was derived "
                                  f"(now {s.shared.changed[name]}, recorded {self.judge.tool_hash(name)}); the policy "
                                  f"is stale for it", key)
        try:
            return self.judge.judge_call(key, arguments)
        except EvaluationError as e:
            return Verdict(False, f"cannot evaluate the call: {e}", key)
        except Exception as e:  # noqa: BLE001 - a bug in evaluation must fail closed, not open
            log.error("mcp evaluation failed", key=key, error=f"{type(e).__name__}: {e}")
            return Verdict(False, f"cannot evaluate the call ({type(e).__name__})", key)

    def _finding(self, s: SessionState, key: str, verdict: Verdict, now: float, method: str, name: str) -> Finding:
        action = "denied" if self.mode == "enforce" else "alerted"
        return Finding(s.label, key, action, verdict.reason, verdict.entry, now, verdict.watch,
                       {"method": method, "era": s.shared.era})

    def _refuse(self, msg: proto.Message, s: SessionState, verdict: Verdict, finding: Finding) -> Decision:
        if msg.method == "tools/call":
            result: dict[str, Any] = {
                "content": [{"type": "text", "text": f"Envelope refused this tool call: {verdict.reason}"}],
                "isError": True,
                "_meta": {REFUSAL_META: {"entry": verdict.entry, "reason": verdict.reason}},
            }
            if s.shared.era == "stateless":
                result["resultType"] = "complete"
            body = {"jsonrpc": "2.0", "id": msg.id, "result": result}
        else:
            body = proto.error_response(msg.id, proto.REFUSED, f"Envelope refused this request: {verdict.reason}",
                                        {"entry": verdict.entry})
        return Decision(reply=proto.encode(body), events=[finding])

    def _error(self, msg: proto.Message, code: int, message: str, s: SessionState, now: float) -> Decision:
        return Decision(reply=proto.encode(proto.error_response(msg.id, code, message)),
                        events=[Problem(s.label, "client", code, message, msg.size, now)], status=400)

    # ---- server -> client ----------------------------------------------------------------

    def from_server(self, sid: str, data: bytes, now: float) -> Decision:
        s = self.session(sid)
        msg = proto.parse(data, self.limits.max_message_bytes)
        if isinstance(msg, proto.Malformed):
            return self._broken_reply(s, msg.id, f"the server sent a message the gateway cannot relay: {msg.message}",
                                      msg.code, msg.size, now)
        if not msg.is_reply:
            return Decision(forward=data)  # server requests and notifications pass unchanged
        pending = s.pending.pop(proto.id_key(msg.id), None) if msg.id is not None else None
        result = msg.result
        if msg.kind != "response" or not isinstance(result, dict):
            return Decision(forward=data)
        method = pending.method if pending else None
        if method == "initialize":
            v = result.get("protocolVersion")
            s.shared.version = v if isinstance(v, str) else s.shared.version
        elif method == "resources/templates/list":
            ts = [t.get("uriTemplate") for t in result.get("resourceTemplates") or [] if isinstance(t, dict)]
            s.shared.templates = tuple(sorted({t for t in ts if isinstance(t, str)} | set(s.shared.templates)))[
                :self.limits.max_templates]
        if method == "tools/list" or (method is None and isinstance(result.get("tools"), list)):
            return self._listing(s, msg, data, now)
        return Decision(forward=data)

    def _listing(self, s: SessionState, msg: proto.Message, data: bytes, now: float) -> Decision:
        result = msg.result
        tools = result.get("tools")
        if not isinstance(tools, list):
            if self.mode == "enforce":
                return self._broken_reply(s, msg.id, "the server's tools/list result has no tools list",
                                          proto.INVALID_REQUEST, msg.size, now)
            return Decision(forward=data)
        events: list = []
        kept: list = []
        env = self.judge
        for t in tools:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                if self.mode != "enforce":
                    kept.append(t)
                continue
            name, h = t["name"], tool_hash(t)
            if len(s.listing) < self.limits.max_listing:
                s.listing[name] = h
            recorded = env.tool_hash(name) if env is not None else None
            if env is not None and self.mode != "observe" and env.allows_tool(name) and recorded is not None \
                    and recorded != h:
                if s.shared.changed.get(name) != h:
                    events.append(Stale(s.label, name, recorded, h, now))
                s.shared.changed[name] = h
            if self.mode == "enforce" and (not env.allows_tool(name) or name in s.shared.changed):
                continue
            kept.append(t)
        if not isinstance(result.get("nextCursor"), str):
            events.append(CatalogSeen(s.label, catalog_fingerprint(s.listing), dict(sorted(s.listing.items())), now))
            s.listing = {}
        if len(kept) == len(tools):
            return Decision(forward=data, events=events)
        body = dict(msg.body)
        body["result"] = dict(result, tools=kept)
        return Decision(forward=proto.encode(body), events=events)

    def _broken_reply(self, s: SessionState, rid: Any, message: str, code: int, size: int, now: float) -> Decision:
        """The server's message cannot be relayed: answer the client's request it belonged to."""
        events = [Problem(s.label, "server", code, message, size, now)]
        if rid is None or proto.id_key(rid) not in s.pending:
            if len(s.pending) != 1:
                return Decision(events=events)
            rid = next(iter(s.pending))[1]
        s.pending.pop(proto.id_key(rid), None)
        return Decision(forward=proto.encode(proto.error_response(rid, proto.UPSTREAM_FAILED, message)),
                        events=events)

    def client_oversized(self, sid: str, size: int, prefix: bytes, now: float) -> Decision:
        """A client message longer than the limit, of which only ``prefix`` was read."""
        message = f"message of {size} bytes or more exceeds the gateway's limit of {self.limits.max_message_bytes} bytes"
        return Decision(reply=proto.encode(proto.error_response(_prefix_id(prefix), proto.INVALID_REQUEST, message)),
                        events=[Problem(sid, "client", proto.INVALID_REQUEST, message, size, now)], status=413)

    def server_oversized(self, sid: str, size: int, prefix: bytes, now: float) -> Decision:
        """A server message longer than the limit, of which only ``prefix`` was read."""
        s = self.session(sid)
        return self._broken_reply(s, _prefix_id(prefix), f"the server sent a message of {size} bytes or more, over the gateway's "
                                          f"limit of {self.limits.max_message_bytes} bytes", proto.UPSTREAM_FAILED,
                                  size, now)

    def server_failed(self, sid: str, data: bytes, message: str, now: float) -> Decision:
        """The server could not be reached or answered at the transport level for request ``data``."""
        s = self.session(sid)
        msg = proto.parse(data, self.limits.max_message_bytes)
        rid = msg.id if isinstance(msg, proto.Message) else None
        if rid is None:
            return Decision(events=[Problem(s.label, "server", proto.UPSTREAM_FAILED, message, 0, now)])
        return self._broken_reply(s, rid, message, proto.UPSTREAM_FAILED, 0, now)


def _prefix_id(prefix: bytes) -> Any:
    """The id of a message from its first bytes, when it leads (as the SDK and most encoders write it)."""
    m = _PREFIX_ID.match(prefix)
    if not m:
        return None
    raw = m.group(1)
    if raw[:1] != b'"':
        return int(raw)
    parsed = proto.parse(b'{"jsonrpc":"2.0","id":' + raw + b',"result":{}}')
    return parsed.id if isinstance(parsed, proto.Message) else None


def _template_matches(template: str, uri: str) -> bool:
    """RFC 6570 level-1 match: each ``{var}`` matches one or more characters other than ``/``
    (``{+var}`` and ``{/var*}``-style expansions match across ``/``)."""
    if len(template) > 2048 or len(uri) > 8192:
        return False
    parts = re.split(r"(\{[^}]*\})", template)
    rx = "".join(("(.+)" if p[1:2] in "+#/" and len(p) > 2 else "([^/]+)") if p.startswith("{") else re.escape(p)
                 for p in parts)
    return re.fullmatch(rx, uri) is not None


# ---- the driver -----------------------------------------------------------------------------


def new_session_id() -> str:
    """A session id for one gateway run: time, pid and a random suffix."""
    return f"mcp-{int(time.time())}-{os.getpid()}-{os.urandom(3).hex()}"


class McpSink(Protocol):
    """Where observations go (see :mod:`sensor.mcp_sink`)."""

    def open_session(self, session: str, ts: float, meta: dict) -> None: ...
    def observe(self, session: str, key: str, evidence: dict, ts: float) -> None: ...
    def catalog(self, session: str, fingerprint: str, tools: dict, ts: float) -> None: ...
    def close_session(self, session: str, ts: float) -> None: ...
    def flush(self) -> None: ...


Reporter = Callable[[object], None]  # receives Finding, Admitted, Stale, CatalogSeen and Problem events


class Gateway:
    """A :class:`GatewayCore` with its edges: observations to a sink, findings to a reporter,
    the wall clock. A failing sink or reporter is logged and never stops the relay."""

    def __init__(self, core: GatewayCore, sink: McpSink | None, report: Reporter | None = None,
                 clock: Callable[[], float] = time.time,
                 follow: Callable[[GatewayCore, float], None] | None = None):
        self.core = core
        self.sink = sink
        self.report = report
        self.clock = clock
        self.follow = follow  # brings mode and exceptions up to date before each client message
        self.errors = 0

    def open(self, sid: str, meta: dict | None = None) -> None:
        self.core.session(sid)
        self._call(self.sink and self.sink.open_session, sid, self.clock(), dict(meta or {}))

    def close(self, sid: str) -> None:
        self.core.end_session(sid)
        self._call(self.sink and self.sink.close_session, sid, self.clock())

    def client(self, sid: str, data: bytes, headers: dict[str, str] | None = None) -> Decision:
        now = self.clock()
        self._call(self.follow, self.core, now)
        return self._dispatch(self.core.from_client(sid, data, now, headers))

    def server(self, sid: str, data: bytes) -> Decision:
        return self._dispatch(self.core.from_server(sid, data, self.clock()))

    def server_oversized(self, sid: str, size: int, prefix: bytes) -> Decision:
        return self._dispatch(self.core.server_oversized(sid, size, prefix, self.clock()))

    def server_failed(self, sid: str, data: bytes, message: str) -> Decision:
        return self._dispatch(self.core.server_failed(sid, data, message, self.clock()))

    def client_oversized(self, sid: str, size: int, prefix: bytes) -> Decision:
        return self._dispatch(self.core.client_oversized(sid, size, prefix, self.clock()))

    def flush(self) -> None:
        self._call(self.sink and self.sink.flush)

    async def flush_periodically(self, every: float) -> None:
        """Write what has been recorded every ``every`` seconds (transports flush once more at the end)."""
        while True:
            await asyncio.sleep(every)
            self.flush()

    def _dispatch(self, d: Decision) -> Decision:
        for e in d.events:
            if isinstance(e, Observed):
                self._call(self.sink and self.sink.observe, e.session, e.key,
                           {"arguments": e.arguments, "cut": e.cut}, e.ts)
            elif isinstance(e, CatalogSeen):
                self._call(self.sink and self.sink.catalog, e.session, e.fingerprint, e.tools, e.ts)
                self._call(self.report, e)  # the validity check
            else:
                self._call(self.report, e)
        return d

    def _call(self, fn, *args) -> None:
        if not fn:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - recording must never break the relay
            self.errors += 1
            log.error("mcp gateway output failed", error=f"{type(e).__name__}: {e}")
