"""The gateway on streamable HTTP: a reverse proxy in front of one MCP server endpoint.

``proxy`` listens on a loopback address and forwards to the upstream URL (an ASGI app served by
uvicorn; the upstream is reached with httpx2, the SDK's own HTTP client). The client connects
to the proxy with the upstream's path (``http://127.0.0.1:PORT/mcp`` for an upstream
``http://host:8000/mcp``). Requests under ``/.well-known/`` (OAuth metadata) are relayed as
they are; any other path is not served.

On the MCP endpoint:

- **POST** bodies are read up to the message limit (413 beyond) and judged by the gateway core.
  A refusal or a framing error is answered by the proxy itself (``application/json``); everything
  else is forwarded with the client's headers (credentials included, never logged or stored).
  The upstream's answer is relayed: a JSON body as one message, an SSE stream event by event
  (each event's JSON-RPC message through the core, its ``id``/``event``/``retry`` fields kept;
  an event over the limit ends the stream with an error for the pending request).
- **GET** (the handshake era's stream for server messages) is relayed as SSE through the core.
- **DELETE** ends the MCP session at the upstream and closes the gateway session.

Sessions. A handshake-era session is the upstream's ``Mcp-Session-Id`` (recorded only as a hash:
a session id is a bearer capability). Requests without one (the stateless revision, or a
handshake-era server without sessions) belong to the proxy run's own session, each POST its own
exchange, since every such request stands alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import signal
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx2
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import mcp_protocol as proto
from .mcp_gateway import Gateway, new_session_id

log = structlog.get_logger("envelope.mcp.http")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "content-encoding",
                        "accept-encoding"})
MAX_SESSIONS = 10_000  # MCP sessions tracked at once (the SDK's own server default)
SSE_HEADERS = {"cache-control": "no-cache, no-transform", "x-accel-buffering": "no"}


def _forward_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def _json_response(body: bytes, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _sse_frame(event, data: bytes) -> bytes:
    lines = []
    if event.event and event.event != "message":
        lines.append(f"event: {event.event}")
    else:
        lines.append("event: message")
    if event.id:
        lines.append(f"id: {event.id}")
    if event.retry is not None:
        lines.append(f"retry: {event.retry}")
    text = "\r\n".join(lines) + "\r\n"
    for line in data.decode("utf-8").split("\n"):
        text += f"data: {line}\r\n"
    return (text + "\r\n").encode("utf-8")


class HttpProxy:
    def __init__(self, gateway: Gateway, upstream: str, run_session: str,
                 client: httpx2.AsyncClient | None = None, flush_every: float = 30.0):
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream {upstream!r} is not an http(s) URL")
        self.gateway = gateway
        self.upstream = upstream
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.path = parts.path or "/"
        self.run_session = run_session
        self.limit = gateway.core.limits.max_message_bytes
        self._client = client
        self.flush_every = flush_every
        self._exchanges = itertools.count(1)
        self._open: set[str] = set()
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST", "DELETE", "OPTIONS"])],
                             lifespan=self._lifespan)

    # ---- lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app) -> AsyncIterator[None]:
        await self._startup()
        flusher = asyncio.create_task(self.gateway.flush_periodically(self.flush_every))
        try:
            yield
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._shutdown()

    async def _startup(self) -> None:
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=None), follow_redirects=False)
        self._session(self.run_session, {"transport": "streamable-http", "scope": "gateway run"})

    async def _shutdown(self) -> None:
        for sid in sorted(self._open):
            self.gateway.close(sid)
        self._open.clear()
        self.gateway.flush()
        if self._client is not None:
            await self._client.aclose()

    def _session(self, sid: str, meta: dict) -> str:
        if sid not in self._open:
            self._open.add(sid)
            self.gateway.open(sid, meta)
        return sid

    def _sid_name(self, mcp_session: str) -> str:
        """A session's name in the evidence: a hash, never the id itself (it is a bearer capability)."""
        digest = hashlib.sha256(f"{self.run_session}\0{mcp_session}".encode()).hexdigest()[:16]
        return f"{self.run_session}/http-{digest}"

    def _sid_for(self, mcp_session: str | None) -> str:
        if not mcp_session:
            return self.run_session
        return self._session(self._sid_name(mcp_session), {"transport": "streamable-http", "scope": "mcp session"})

    # ---- requests ------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        if path.startswith("/.well-known/"):
            return await self._relay_raw(request)
        if path.rstrip("/") != self.path.rstrip("/"):
            return Response(status_code=404)
        if request.method == "POST":
            return await self._post(request)
        if request.method == "GET":
            return await self._get(request)
        if request.method == "DELETE":
            return await self._delete(request)
        return await self._relay_raw(request)

    async def _read_body(self, request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return None
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > self.limit:
                return None
        return bytes(buf)

    async def _post(self, request: Request) -> Response:
        mcp_session = request.headers.get(proto.HEADER_SESSION)
        if mcp_session and len(self._open) >= MAX_SESSIONS and self._sid_name(mcp_session) not in self._open:
            return Response(status_code=503)
        sid = self._sid_for(mcp_session)
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        if body is None:
            d = self.gateway.client_oversized(sid, self.limit + 1, b"")
            return _json_response(d.reply, 413)
        exchange = f"{sid}#{next(self._exchanges)}" if not mcp_session else sid
        if exchange != sid:
            self.gateway.core.share(exchange, sid)
        headers = {k.lower(): v for k, v in request.headers.items()}
        d = self.gateway.client(exchange, body, headers)
        if d.reply is not None:
            self._end_exchange(exchange, sid)
            return _json_response(d.reply, d.status)
        try:
            up = await self._client.send(
                self._client.build_request("POST", self.upstream, content=d.forward,
                                           headers=_forward_headers(request.headers), params=request.query_params),
                stream=True)
        except httpx2.HTTPError as e:
            failed = self.gateway.server_failed(exchange, body, f"the MCP server could not be reached: {type(e).__name__}")
            self._end_exchange(exchange, sid)
            return _json_response(failed.forward or b"", 502) if failed.forward else Response(status_code=502)
        if mcp_session and up.status_code == 404:  # a session the upstream does not know: nothing to keep
            self._open.discard(sid)
            self.gateway.close(sid)
        new_session = up.headers.get(proto.HEADER_SESSION)
        if new_session and not mcp_session:  # initialize answered with a session: it starts here
            target = self._sid_for(new_session)
            self.gateway.core.adopt(exchange, target)
            exchange = sid = target
        return await self._relay_answer(up, exchange, sid, body)

    def _end_exchange(self, exchange: str, sid: str) -> None:
        if exchange != sid:
            self.gateway.core.end_session(exchange)

    async def _relay_answer(self, up: httpx2.Response, exchange: str, sid: str, request_body: bytes | None) -> Response:
        headers = _forward_headers(up.headers)
        ctype = up.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "text/event-stream":
            headers.pop("content-type", None)
            headers.update(SSE_HEADERS)
            return StreamingResponse(self._relay_events(up, exchange, sid), status_code=up.status_code,
                                     headers=headers, media_type="text/event-stream")
        try:
            data = bytearray()
            async for chunk in up.aiter_bytes():
                data += chunk
                if len(data) > self.limit:
                    break
        finally:
            await up.aclose()
        if len(data) > self.limit:
            d = self.gateway.server_oversized(exchange, len(data), bytes(data[:4096]))
            self._end_exchange(exchange, sid)
            return _json_response(d.forward, 502) if d.forward else Response(status_code=502)
        if not data or ctype != "application/json":
            self._end_exchange(exchange, sid)
            return Response(bytes(data), status_code=up.status_code, headers=headers)
        d = self.gateway.server(exchange, bytes(data))
        self._end_exchange(exchange, sid)
        headers.pop("content-type", None)
        if d.forward is None:
            return _json_response(proto.encode(proto.error_response(
                None, proto.UPSTREAM_FAILED, "the MCP server's answer could not be relayed")), 502)
        return _json_response(d.forward, up.status_code, headers)

    async def _relay_events(self, up: httpx2.Response, exchange: str, sid: str) -> AsyncIterator[bytes]:
        try:
            async for event in httpx2.EventSource(up, max_event_size=self.limit):
                if not event.data.strip():
                    yield _sse_frame(event, b"") if event.id or event.retry is not None else b": \r\n\r\n"
                    continue
                d = self.gateway.server(exchange, event.data.encode("utf-8"))
                if d.forward is not None:
                    yield _sse_frame(event, d.forward)
        except httpx2.SSEError:
            d = self.gateway.server_oversized(exchange, self.limit + 1, b"")
            if d.forward is not None:
                yield _sse_frame(httpx2.ServerSentEvent(), d.forward)
        except httpx2.HTTPError as e:
            log.warning("mcp upstream stream ended", error=type(e).__name__)
        finally:
            await up.aclose()
            self._end_exchange(exchange, sid)

    async def _get(self, request: Request) -> Response:
        sid = self._sid_for(request.headers.get(proto.HEADER_SESSION))
        try:
            up = await self._client.send(
                self._client.build_request("GET", self.upstream, headers=_forward_headers(request.headers),
                                           params=request.query_params), stream=True)
        except httpx2.HTTPError:
            return Response(status_code=502)
        return await self._relay_answer(up, sid, sid, None)

    async def _delete(self, request: Request) -> Response:
        mcp_session = request.headers.get(proto.HEADER_SESSION)
        resp = await self._relay_raw(request)
        if mcp_session and resp.status_code < 300:
            sid = self._sid_for(mcp_session)
            self._open.discard(sid)
            self.gateway.close(sid)
            self.gateway.flush()
        return resp

    async def _relay_raw(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            return Response(status_code=413)
        url = self.upstream if not request.url.path.startswith("/.well-known/") else self.origin + request.url.path
        try:
            up = await self._client.request(request.method, url, content=body or None,
                                            headers=_forward_headers(request.headers), params=request.query_params)
        except httpx2.HTTPError:
            return Response(status_code=502)
        if len(up.content) > self.limit:
            return Response(status_code=502)
        return Response(up.content, status_code=up.status_code, headers=_forward_headers(up.headers))


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM and SIGINT ending it gracefully and the process exiting 0 (uvicorn's
    own handlers re-raise the signal after shutdown, so the exit status would be the signal)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def stop(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8931")
    return host.strip("[]") or "127.0.0.1", int(port)


def proxy(gateway: Gateway, workload, listen: str, upstream: str, *, session: str | None = None, ready=None,
          flush_every: float = 30.0) -> int:
    """Serve ``gateway`` on ``listen`` in front of ``upstream`` until SIGTERM or SIGINT."""
    host, port = parse_listen(listen)
    mode = gateway.core.mode
    p = HttpProxy(gateway, upstream, session or new_session_id(), flush_every=flush_every)
    config = uvicorn.Config(p.app, host=host, port=port, log_level="warning", lifespan="on",
                            access_log=False, timeout_graceful_shutdown=5)
    server = _Server(config)
    log.info("mcp gateway (streamable http)", workload=str(workload), mode=mode, listen=f"{host}:{port}",
             upstream=upstream, session=p.run_session)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            ready(server.servers[0].sockets[0].getsockname()[1])
        await task

    asyncio.run(main())
    return 0 if server.started else 1

