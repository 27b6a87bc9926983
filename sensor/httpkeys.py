"""HTTP behaviour keys: requests as the profile records them, and paths as the probe compares them.

Key grammar (substrate ``http``)::

    key    = "http:" method " " host path [ " " status ]
    method = the request method as sent                     GET, POST, DELETE, ...
    host   = the Host header, lower-cased, without the scheme's default port (443 over TLS, 80
             in plaintext); another port stays: ``127.0.0.1:8443``
    path   = the request path, percent-encoded as sent, without the query: the query is never
             part of a key (it may carry tokens)
    status = the response's status code, or ``-`` when no response was seen; the status is
             evidence of the request, not part of what a policy allows

Examples::

    http:GET api.example.com/v1/docs/8812 200
    http:POST api.openai.com/v1/chat/completions 200
    http:DELETE 127.0.0.1:8443/repos/agent -

Captured bytes become key text one character per byte (Latin-1), so a key names exactly the
bytes that were sent and the probe compares. Paths are judged segment by segment, exactly as the probe in ``bpf/http.c`` does: empty
segments and ``.`` are skipped; a ``..`` segment is never resolved, so a path holding one
matches nothing but itself literally and cannot be templated. Everything here is pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .mirrors import HTTP_HOST_MAX, HTTP_METHOD_MAX, HTTP_SEGMENT_MAX, HTTP_SEGMENTS_MAX

KIND = "http"
NO_STATUS = "-"
DEFAULT_PORT = {True: ":443", False: ":80"}

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(r"^(\d{3}|-)$")


class HttpKeyError(ValueError):
    """A key that is not an ``http:`` behaviour key."""


def normalize_host(host: str, tls: bool) -> str:
    """The Host value as keys and the probe compare it: lower-cased (ASCII), the scheme's default
    port dropped."""
    h = host.strip().translate(_LOWER)
    suffix = DEFAULT_PORT[bool(tls)]
    if h.endswith(suffix) and len(h) > len(suffix):
        h = h[: -len(suffix)]
    return h


_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def request_path(target: str) -> str:
    """The path of a request-target (``/a/b?q`` -> ``/a/b``); ``#`` ends it too."""
    return re.split(r"[?#]", target, 1)[0]


def segments(path: str) -> tuple[str, ...] | None:
    """The path's segments as the probe walks them; None when a ``..`` makes it unjudgeable."""
    out = []
    for s in path.split("/"):
        if s in ("", "."):
            continue
        if s == "..":
            return None
        out.append(s)
    return tuple(out)


def judgeable(method: str, host: str, path: str) -> str | None:
    """Why the probe cannot judge such a request by its parts (None: it can)."""
    if not _TOKEN.match(method) or len(method) > HTTP_METHOD_MAX:
        return f"method {method[:20]!r} is not a token of at most {HTTP_METHOD_MAX} characters"
    if not host or len(host) > HTTP_HOST_MAX or any(c in host for c in " \t/"):
        return f"host {host[:40]!r} is empty, longer than {HTTP_HOST_MAX} characters or not a host"
    if not path.startswith("/"):
        return "the path is not origin-form (/...)"
    segs = segments(path)
    if segs is None:
        return "the path holds a '..' segment, which the probe does not resolve"
    if len(segs) > HTTP_SEGMENTS_MAX:
        return f"more than {HTTP_SEGMENTS_MAX} path segments"
    return None


@dataclass(frozen=True)
class HttpBehaviour:
    method: str
    host: str
    path: str
    status: str = NO_STATUS

    @property
    def request(self) -> str:
        """``METHOD host/path``: what a policy entry allows (the key without its status)."""
        return f"{self.method} {self.host}{self.path}"

    @property
    def key(self) -> str:
        return f"{KIND}:{self.request} {self.status}"


def http_key(method: str, host: str, path: str, status: int | None) -> str:
    return HttpBehaviour(method, host, path, NO_STATUS if status is None else f"{status:03d}").key


def parse_key(key: str) -> HttpBehaviour:
    """Parse ``http:METHOD host/path [status]`` (violations carry no status)."""
    if not key.startswith(f"{KIND}:"):
        raise HttpKeyError(f"bad http behaviour key {key!r} (want http:METHOD HOST/PATH [STATUS])")
    parts = key[len(KIND) + 1:].split(" ")
    if len(parts) not in (2, 3):
        raise HttpKeyError(f"bad http behaviour key {key!r} (want http:METHOD HOST/PATH [STATUS])")
    method, target = parts[0], parts[1]
    status = parts[2] if len(parts) == 3 else NO_STATUS
    if not _TOKEN.match(method):
        raise HttpKeyError(f"bad http behaviour key {key!r}: {method!r} is not a method")
    if not _STATUS.match(status):
        raise HttpKeyError(f"bad http behaviour key {key!r}: {status!r} is not a status code")
    slash = target.find("/")
    if slash <= 0:
        raise HttpKeyError(f"bad http behaviour key {key!r}: want HOST/PATH")
    return HttpBehaviour(method, target[:slash], target[slash:], status)


def wire(text: str) -> bytes | None:
    """The bytes the probe compares for ``text`` (keys hold captured bytes one character per
    byte, Latin-1); None for text that no captured byte string gives."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return None


def literal_segment_ok(segment: str) -> bool:
    """Whether the probe can compare this segment literally (its bytes fit the rule graph)."""
    b = wire(segment)
    return b is not None and 0 < len(b) <= HTTP_SEGMENT_MAX


__all__ = ["HttpBehaviour", "HttpKeyError", "http_key", "judgeable", "literal_segment_ok",
           "normalize_host", "parse_key", "request_path", "segments", "wire"]
