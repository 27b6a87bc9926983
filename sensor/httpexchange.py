"""Exchanges: captured bytes of a connection put back together as requests with their responses.

The capture (``bpf/http.c``) sends, per connection, bounded records: a request head (the request
line and headers first, then what fitted of the body), later parts of the request's body, the
first bytes of the response, and what a connection is (its socket and destination). The
:class:`ExchangeAssembler` pairs them in order, as HTTP/1.1 does: one request, then its response.
A request is finished when its response arrives, when the next request on its connection starts,
or when it waited longer than ``response_timeout`` (then its status is unknown).

What leaves the assembler is redacted (:func:`sensor.credentials.redact`): raw captured bytes stay
inside it, only while a request waits for its response, and nothing here writes them anywhere.

Things the capture saw but cannot turn into requests are :class:`Finding`\\ s, never guesses: an
HTTP/2 connection, a connection that carries another protocol, TLS written by a TLS stack no
probe is on (with the server name from its ClientHello), a head that does not parse.

Pure: events in (with their kernel times), exchanges and findings out.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from . import credentials
from .events import (HTTP_F_BODY, HTTP_F_H2, HTTP_F_HEAD, HTTP_F_RESPONSE, HTTP_F_TLS_RECORD,
                     HTTP_F_TRUNCATED, HTTP_F_UNPARSED, HttpCaptureEvent, HttpConnEvent)
from .httprequest import CapturedRequest, DuplicateHeader

BODY_MAX = 8192            # body bytes kept per request (the capture sends at most two calls' worth)
MAX_CONNS = 4096           # connections remembered (destinations, pending requests)
RESPONSE_TIMEOUT = 30.0    # seconds a request waits for its response before it is finished without
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: |\r|$)")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Exchange:
    """One request (redacted) and the status of its response (None: no response was seen)."""

    ktime: int
    cgroup_id: int
    pid: int
    tls: bool
    request: CapturedRequest
    status: int | None
    dest: tuple[str, int] | None = None  # the socket's destination, when known


@dataclass(frozen=True)
class Finding:
    """What the capture saw and cannot decode: ``kind`` is one of ``http2``, ``other-protocol``,
    ``tls-unhooked``, ``unparsed``; ``detail`` names the destination or server when known."""

    ktime: int
    cgroup_id: int
    pid: int
    kind: str
    detail: str


@dataclass
class _Pending:
    ktime: int
    cgroup_id: int
    pid: int
    tls: bool
    head: bytes
    head_truncated: bool
    body: bytearray = field(default_factory=bytearray)
    body_truncated: bool = False


@dataclass
class _Conn:
    tls: bool
    dest: tuple[str, int] | None = None
    pending: _Pending | None = None
    http: bool = False  # a request head was seen on it
    reported: set = field(default_factory=set)


class HeadError(ValueError):
    """A request head that does not parse as HTTP/1.x."""


def parse_head(data: bytes) -> tuple[str, str, tuple[tuple[str, str], ...], bytes, bool]:
    """``(method, target, headers, body bytes after the head, head complete)`` of a request head.

    Bytes become text one character per byte (Latin-1), as the probe compares them. Raises
    :class:`HeadError` when the request line or a header line does not parse."""
    start = 0
    while start < len(data) and start < 8 and data[start] in b"\r\n":
        start += 1
    end = data.find(b"\r\n\r\n", start)
    complete = end >= 0
    head = data[start:end] if complete else data[start:]
    body = data[end + 4:] if complete else b""
    lines = head.split(b"\r\n")
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HeadError("the request line is not METHOD TARGET HTTP/1.x")
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    if not _TOKEN.match(method) or not target:
        raise HeadError("the request line is not METHOD TARGET HTTP/1.x")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HeadError("obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN.match(name.decode("latin-1")):
            raise HeadError("a header line is not NAME: VALUE")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return method, target, tuple(headers), body, complete


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """A chunked body's data, and whether it is complete in what was captured."""
    out = bytearray()
    i = 0
    while True:
        eol = body.find(b"\r\n", i)
        if eol < 0:
            return bytes(out), False
        size_text = body[i:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return bytes(out), False
        if size == 0:
            return bytes(out), True
        chunk = body[eol + 2:eol + 2 + size]
        out += chunk
        if len(chunk) < size:
            return bytes(out), False
        i = eol + 2 + size + 2


def response_status(data: bytes) -> int | None:
    m = _STATUS.match(data)
    return int(m.group(1)) if m else None


def server_name(hello: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello record prefix, or None."""
    try:
        if len(hello) < 44 or hello[0] != 0x16 or hello[5] != 0x01:
            return None
        i = 9 + 2 + 32  # record header 5, handshake header 4, version 2, random 32
        sid = hello[i]
        i += 1 + sid
        cs = int.from_bytes(hello[i:i + 2], "big")
        i += 2 + cs
        cm = hello[i]
        i += 1 + cm
        ext_end = i + 2 + int.from_bytes(hello[i:i + 2], "big")
        i += 2
        while i + 4 <= min(ext_end, len(hello)):
            etype = int.from_bytes(hello[i:i + 2], "big")
            elen = int.from_bytes(hello[i + 2:i + 4], "big")
            if etype == 0:
                j = i + 4 + 2
                if hello[j] == 0:
                    n = int.from_bytes(hello[j + 1:j + 3], "big")
                    name = hello[j + 3:j + 3 + n]
                    if len(name) == n and re.fullmatch(rb"[A-Za-z0-9.-]{1,253}", name):
                        return name.decode("ascii").lower()
                return None
            i += 4 + elen
    except IndexError:
        return None
    return None


class ExchangeAssembler:
    """Pairs capture records into :class:`Exchange`\\ s; see the module docstring.

    ``key`` is the sensor's key for hashing AWS access key ids (:func:`sensor.sigv4.redact`)."""

    def __init__(self, key: bytes, response_timeout: float = RESPONSE_TIMEOUT, max_conns: int = MAX_CONNS):
        self.key = key
        self.timeout_ns = int(response_timeout * 1e9)
        self.max_conns = max_conns
        self._conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self.exchanges: list[Exchange] = []
        self.findings: list[Finding] = []
        self.unparsed = 0  # heads that did not parse

    # -- input --

    @staticmethod
    def _conn_key(pid: int, conn: int, tls: bool) -> tuple:
        # an SSL object's address is per process; a socket cookie is unique on the host
        return (pid, conn, True) if tls else (0, conn, False)

    def _conn(self, key: tuple, tls: bool) -> _Conn:
        c = self._conns.get(key)
        if c is None:
            c = self._conns[key] = _Conn(tls)
            while len(self._conns) > self.max_conns:
                _, old = self._conns.popitem(last=False)
                if old.pending is not None:
                    self._finish(old.pending, None, old.dest)
        else:
            self._conns.move_to_end(key)
        return c

    def on_conn(self, ev: HttpConnEvent) -> None:
        c = self._conn(self._conn_key(ev.pid, ev.conn, ev.tls), ev.tls)
        c.dest = (ev.addr, ev.port)

    def on_capture(self, ev: HttpCaptureEvent) -> None:
        c = self._conn(self._conn_key(ev.pid, ev.conn, ev.tls), ev.tls)
        f = ev.flags
        if f & HTTP_F_RESPONSE:
            status = response_status(ev.data)
            if c.pending is not None and not (status is not None and 100 <= status < 200):
                # a 1xx answer is interim (100 Continue): the request and its body go on
                self._finish(c.pending, status, c.dest)
                c.pending = None
        elif f & HTTP_F_HEAD:
            if c.pending is not None:
                self._finish(c.pending, None, c.dest)
            c.http = True
            c.pending = _Pending(ev.ktime, ev.cgroup_id, ev.pid, ev.tls, ev.data,
                                 bool(f & HTTP_F_TRUNCATED))
        elif f & HTTP_F_BODY:
            p = c.pending
            if p is not None:
                room = BODY_MAX - len(p.body)
                p.body += ev.data[:max(room, 0)]
                p.body_truncated = p.body_truncated or bool(f & HTTP_F_TRUNCATED) or len(ev.data) > room
        elif f & HTTP_F_H2:
            self._find(c, ev, "http2", "HTTP/2: its requests are not decoded")
        elif f & HTTP_F_TLS_RECORD:
            name = server_name(ev.data)
            self._find(c, ev, "tls-unhooked", f"TLS to {name or 'an unnamed server'} written by a TLS stack "
                                              "no probe is on: its requests are not observable")
        elif f & HTTP_F_UNPARSED:
            if c.http:
                self._find(c, ev, "unparsed", "bytes on an HTTP connection that are not a request the "
                                              "probe can judge (a request line cut short, a smuggled request)")
            else:
                self._find(c, ev, "other-protocol", "a TCP connection that does not carry HTTP/1.x")

    def _find(self, c: _Conn, ev: HttpCaptureEvent, kind: str, text: str) -> None:
        if kind in c.reported:
            return
        c.reported.add(kind)
        where = f" ({c.dest[0]}:{c.dest[1]})" if c.dest else ""
        self.findings.append(Finding(ev.ktime, ev.cgroup_id, ev.pid, kind, text + where))

    # -- output --

    def _finish(self, p: _Pending, status: int | None, dest) -> None:
        try:
            method, target, headers, body, complete = parse_head(p.head)
        except HeadError as e:
            self.unparsed += 1
            self.findings.append(Finding(p.ktime, p.cgroup_id, p.pid, "unparsed", f"a request head: {e}"))
            return
        body = bytes(body) + bytes(p.body)
        truncated = not complete or p.body_truncated
        req = CapturedRequest(method, "", target, headers)
        try:
            host = req.header("Host")
            length = req.header("Content-Length")
            chunked = "chunked" in (req.header("Transfer-Encoding") or "").lower()
        except DuplicateHeader as e:
            self.unparsed += 1
            self.findings.append(Finding(p.ktime, p.cgroup_id, p.pid, "unparsed", f"a request head: {e}"))
            return
        if chunked:
            body, done = dechunk(body)
            truncated = truncated or not done
        elif length is not None and length.isdigit():
            want = int(length)
            truncated = truncated or len(body) < want
            body = body[:want]
        else:
            truncated = truncated or (p.head_truncated and not complete)
        req = req.with_changes(host=host or "", body=body, truncated=truncated)
        red = credentials.redact(req, self.key)
        self.exchanges.append(Exchange(p.ktime, p.cgroup_id, p.pid, p.tls, red, status, dest))

    def expire(self, now_ktime: int) -> None:
        """Finish requests that waited longer than the response timeout."""
        for c in self._conns.values():
            p = c.pending
            if p is not None and now_ktime - p.ktime > self.timeout_ns:
                self._finish(p, None, c.dest)
                c.pending = None

    def flush(self) -> None:
        """Finish every waiting request (the capture is closing)."""
        for c in self._conns.values():
            if c.pending is not None:
                self._finish(c.pending, None, c.dest)
                c.pending = None

    def take(self) -> tuple[list[Exchange], list[Finding]]:
        out, self.exchanges = self.exchanges, []
        found, self.findings = self.findings, []
        return out, found


__all__ = ["Exchange", "ExchangeAssembler", "Finding", "HeadError", "dechunk", "parse_head",
           "response_status", "server_name"]
