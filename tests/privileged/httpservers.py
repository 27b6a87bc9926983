"""Local HTTP peers for the request capture's tests: Python's own http.server, over HTTPS with a
certificate from a test CA (trustme) and in plaintext, on 127.0.0.1. Every request that reaches a
server is recorded, so a test can tell a request that was stopped from one that was answered.

Routes: ``GET`` anything -> 200 JSON (``/missing/...`` -> 404); ``POST /v1/chat/completions`` -> an
OpenAI-shaped chat completion (the official SDK parses it); other ``POST``/``PUT`` -> 201;
``DELETE`` -> 204; ``GET /download/N`` -> N bytes.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from pathlib import Path

import trustme


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testpeer"
    disable_nagle_algorithm = True

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body: bytes = b"") -> None:
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": body, "peer": self.client_address})

    def do_GET(self):
        self._record()
        if self.path.startswith("/download/"):
            n = int(self.path.rsplit("/", 1)[1])
            self._send(200, b"x" * n, "application/octet-stream")
            return
        self._send(404 if self.path.startswith("/missing") else 200, json.dumps({"path": self.path}).encode())

    def do_POST(self):
        body = self._body()
        self._record(body)
        if self.path.endswith("/chat/completions"):
            model = json.loads(body or b"{}").get("model", "")
            self._send(200, json.dumps({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode())
            return
        self._send(201, b'{"created": true}')

    do_PUT = do_POST

    def do_DELETE(self):
        self._record()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Peers:
    """An HTTPS and a plaintext server; ``ca`` is the CA file clients verify against."""

    def __init__(self, workdir: Path):
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_alpn_protocols(["http/1.1"])
        cert.configure_cert(ctx)
        self.tls.socket = ctx.wrap_socket(self.tls.socket, server_side=True)
        self.plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        for s in (self.tls, self.plain):
            s.seen = []
            s.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.tls, self.plain)]
        for t in self._threads:
            t.start()

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.tls.server_address[1]}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.plain.server_address[1]}"

    def mark(self) -> tuple[int, int]:
        return len(self.tls.seen), len(self.plain.seen)

    def seen(self, since: tuple[int, int] = (0, 0)) -> list[tuple[str, str]]:
        """(method, path) of every request the servers received after ``since`` (a :meth:`mark`)."""
        return [(r["method"], r["path"]) for s, n in zip((self.tls, self.plain), since) for r in s.seen[n:]]

    def close(self) -> None:
        for s in (self.tls, self.plain):
            s.shutdown()
            s.server_close()
