"""URL patterns: hosts and path templates derived from observed URLs (pure).

Shared by every substrate that bounds URLs (MCP tool arguments and resource URIs now, HTTP
requests later). A pattern is ``scheme://host[:port]/seg/seg/...`` where a segment is

- a literal, matched exactly;
- ``{id}``: one identifier-like segment: a number, a UUID, a hexadecimal hash of at least 7
  characters with a digit in it, or an opaque token of at least 20 letters, digits, ``-`` and
  ``_`` mixing letters and digits;
- ``*``: any one non-empty segment, written when more than ``max_siblings`` distinct literal
  segments were seen in the same place (the rule is named ``url-sibling-wildcard`` and flagged).

The scheme and host must match exactly (hosts case-insensitively; default ports dropped), so a
pattern never crosses to another host. Queries and fragments are not part of a pattern. Paths are
normalised (``.`` and ``..`` resolved) before they are matched.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

ID = "{id}"
ANY = "*"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_NUMBER = re.compile(r"^\d+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^[0-9a-fA-F]{7,128}$")
_OPAQUE = re.compile(r"^[A-Za-z0-9_-]{20,}$")


def identifier_class(text: str) -> str | None:
    """``number``, ``uuid``, ``hash`` or ``opaque`` for an identifier-like string, else None."""
    if _NUMBER.match(text):
        return "number"
    if _UUID.match(text):
        return "uuid"
    if _HEX.match(text) and any(c.isdigit() for c in text) and any(c.isalpha() for c in text):
        return "hash"
    if _OPAQUE.match(text) and any(c.isdigit() for c in text) and any(c.isalpha() for c in text):
        return "opaque"
    return None


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str
    port: int | None
    segments: tuple[str, ...]

    @property
    def origin(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"


def parse_url(text: str) -> ParsedUrl | None:
    """Scheme, host, port and normalised path segments of an absolute URL with a host, else None."""
    if not isinstance(text, str) or "://" not in text or len(text) > 8192:
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    scheme = parts.scheme.lower()
    if port is not None and DEFAULT_PORTS.get(scheme) == port:
        port = None
    path = posixpath.normpath("/" + parts.path) if parts.path else "/"
    segments = tuple(s for s in path.split("/") if s)
    return ParsedUrl(scheme, host.lower(), port, segments)


@dataclass(frozen=True)
class UrlPattern:
    scheme: str
    host: str
    port: int | None
    segments: tuple[str, ...]

    @property
    def text(self) -> str:
        return ParsedUrl(self.scheme, self.host, self.port, ()).origin + "/" + "/".join(self.segments)

    @classmethod
    def parse(cls, text: str) -> "UrlPattern":
        p = parse_url(text.replace(ID, "0").replace(ANY, "x"))
        if p is None:
            raise ValueError(f"{text!r} is not a URL pattern (scheme://host/path)")
        raw = urlsplit(text).path
        segments = tuple(s for s in raw.split("/") if s)
        if len(segments) != len(p.segments):
            raise ValueError(f"{text!r}: path segments must not be '.' or '..'")
        for s in segments:
            if ("{" in s or "*" in s) and s not in (ID, ANY):
                raise ValueError(f"{text!r}: {{id}} and * must be whole path segments")
        return cls(p.scheme, p.host, p.port, segments)

    def matches(self, url: str | ParsedUrl) -> bool:
        p = parse_url(url) if isinstance(url, str) else url
        if p is None or (p.scheme, p.host, p.port) != (self.scheme, self.host, self.port):
            return False
        if len(p.segments) != len(self.segments):
            return False
        for want, got in zip(self.segments, p.segments):
            if want == ANY:
                continue
            if want == ID:
                if identifier_class(got) is None:
                    return False
            elif want != got:
                return False
        return True


@dataclass(frozen=True)
class DerivedPattern:
    pattern: UrlPattern
    members: tuple[str, ...]  # the observed URLs it covers
    rule: str  # url-template or url-template+url-sibling-wildcard
    wildcards: int  # how many segments were widened to *


def derive(urls: Iterable[str], max_siblings: int) -> tuple[list[DerivedPattern], list[str]]:
    """Patterns covering ``urls`` (sorted), and the inputs that are not URLs with a host."""
    groups: dict[tuple, list[tuple[tuple[str, ...], str]]] = {}
    rejected: list[str] = []
    for u in sorted(set(urls)):
        p = parse_url(u)
        if p is None:
            rejected.append(u)
            continue
        segs = tuple(ID if identifier_class(s) else s for s in p.segments)
        groups.setdefault((p.scheme, p.host, p.port or 0), []).append((segs, u))
    out: list[DerivedPattern] = []
    for (scheme, host, port), items in sorted(groups.items()):
        for segs, members, wild in _build(items, 0, max_siblings):
            pat = UrlPattern(scheme, host, port or None, segs)
            rule = "url-template+url-sibling-wildcard" if wild else "url-template"
            out.append(DerivedPattern(pat, tuple(sorted(members)), rule, wild))
    out.sort(key=lambda d: d.pattern.text)
    return out, rejected


def _build(items: list[tuple[tuple[str, ...], str]], depth: int, k: int):
    ends = [u for segs, u in items if len(segs) == depth]
    if ends:
        yield (), ends, 0
    children: dict[str, list] = {}
    for segs, u in items:
        if len(segs) > depth:
            children.setdefault(segs[depth], []).append((segs, u))
    literals = sorted(s for s in children if s != ID)
    widened = len(literals) > k
    if widened:
        merged = [it for s in literals for it in children.pop(s)]
        children[ANY] = [(segs[:depth] + (ANY,) + segs[depth + 1:], u) for segs, u in merged]
    for seg in sorted(children):
        for rest, members, wild in _build(children[seg], depth + 1, k):
            yield (seg,) + rest, members, wild + (1 if seg == ANY and widened else 0)
