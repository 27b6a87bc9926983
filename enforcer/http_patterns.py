"""HTTP policy entries: request patterns, how they match, and the rule graph the probe walks.

An entry allows one method on one host for a path template::

    http:GET api.example.com/v1/docs/{id}
    http:POST api.openai.com/v1/chat/completions
    http:GET 127.0.0.1:8443/repos/*/commits

- the method matches exactly (a GET never admits a POST or DELETE);
- the host matches exactly (lower-case, the scheme's default port dropped, as in the keys);
- the path matches segment by segment as the probe walks it (:func:`sensor.httpkeys.segments`):
  a literal matches itself, ``{id}`` any identifier-like segment (a number, a UUID, a hash, an
  opaque token: :func:`enforcer.urlpattern.identifier_class`), ``*`` any one segment; the
  number of segments is exact. ``/`` is the path with no segment.

:func:`compile_graph` turns a set of entries into a deterministic rule graph for the probe in
``bpf/http.c``: from the root, an edge per ``METHOD host``; from each state, an edge per literal
segment, an ``{id}`` class edge and a ``*`` class edge, and an end mark where a path may stop. The
graph is determinised (each state is the set of template positions a path can be at), so the
probe, which tries the literal edge, then ``{id}``, then ``*``, never has to go back. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from sensor.httpkeys import HttpKeyError, judgeable, literal_segment_ok, segments, wire
from sensor.mirrors import HTTP_EDGE_ANY, HTTP_EDGE_END, HTTP_EDGE_ID, HTTP_EDGE_TEXT, HttpEdgeKey

from .urlpattern import ANY, ID, identifier_class

KIND = "http"


class HttpPatternError(ValueError):
    """An entry that is not ``http:METHOD HOST/PATH-TEMPLATE``."""


def segment_class(segment: str) -> str | None:
    """The identifier class of a path segment as the probe sees it (ASCII only)."""
    return identifier_class(segment) if segment.isascii() else None


@dataclass(frozen=True, order=True)
class HttpPattern:
    method: str
    host: str
    segments: tuple[str, ...]

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)

    @property
    def entry(self) -> str:
        return f"{KIND}:{self.method} {self.host}{self.path}"

    @classmethod
    def parse(cls, entry: str) -> "HttpPattern":
        if not entry.startswith(f"{KIND}:"):
            raise HttpPatternError(f"bad http entry {entry!r} (want http:METHOD HOST/PATH)")
        body = entry[len(KIND) + 1:]
        method, sep, target = body.partition(" ")
        slash = target.find("/")
        if not sep or slash <= 0 or " " in target:
            raise HttpPatternError(f"bad http entry {entry!r} (want http:METHOD HOST/PATH)")
        host, path = target[:slash], target[slash:]
        concrete = path.replace(ID, "0").replace(ANY, "x")
        why = judgeable(method, host, concrete)
        if why:
            raise HttpPatternError(f"bad http entry {entry!r}: {why}")
        if host != host.lower():
            raise HttpPatternError(f"bad http entry {entry!r}: hosts are lower-case")
        segs = segments(path)
        raw = path.split("/")[1:] if path != "/" else []
        if segs is None or any(x in ("", ".", "..") for x in raw):
            raise HttpPatternError(f"bad http entry {entry!r}: no empty, '.' or '..' segments")
        for s in segs:
            if s in (ID, ANY):
                continue
            if "{" in s or "*" in s:
                raise HttpPatternError(f"bad http entry {entry!r}: {{id}} and * must be whole segments")
            if not literal_segment_ok(s):
                raise HttpPatternError(f"bad http entry {entry!r}: segment {s[:20]!r} is longer than the "
                                       "probe compares, or not bytes a request carries")
        if wire(f"{method} {host}") is None or len(wire(f"{method} {host}")) > HTTP_EDGE_TEXT:
            raise HttpPatternError(f"bad http entry {entry!r}: method and host are too long for the probe")
        return cls(method, host, segs)

    def matches(self, method: str, host: str, path: str) -> bool:
        if method != self.method or host != self.host:
            return False
        segs = segments(path)
        if segs is None or len(segs) != len(self.segments):
            return False
        for want, got in zip(self.segments, segs):
            if want == ANY:
                continue
            if want == ID:
                if segment_class(got) is None:
                    return False
            elif want != got:
                return False
        return True


def parse_entry(entry: str) -> HttpPattern:
    try:
        return HttpPattern.parse(entry)
    except HttpKeyError as e:
        raise HttpPatternError(str(e)) from None


# ---- the rule graph -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    state: int
    label: int | bytes  # HTTP_EDGE_ID / ANY / END, or the bytes of "METHOD host" or a segment
    next: int           # for END: 1

    def key(self) -> bytes:
        if isinstance(self.label, bytes):
            return HttpEdgeKey.pack(state=self.state, len=len(self.label), text=self.label)
        return HttpEdgeKey.pack(state=self.state, len=self.label, text=b"")

    def value(self) -> bytes:
        return self.next.to_bytes(4, "little")


@dataclass(frozen=True)
class Graph:
    root: int
    edges: tuple[Edge, ...]
    states: int  # how many state ids it uses, from the base it was built at


def compile_graph(patterns: list[HttpPattern] | tuple[HttpPattern, ...], base: int) -> Graph:
    """The probe's rule graph for ``patterns``, with state ids from ``base`` (``base`` is the
    root). Deterministic: the same patterns and base give the same edges, sorted."""
    pats = sorted(set(patterns))
    next_id = [base]
    ids: dict[frozenset, int] = {}

    def state_of(positions: frozenset) -> int:
        s = ids.get(positions)
        if s is None:
            next_id[0] += 1
            s = ids[positions] = next_id[0]
        return s

    root = base
    edges: list[Edge] = []
    by_origin: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(pats):
        by_origin.setdefault((p.method, p.host), []).append(i)
    work: list[frozenset] = []
    for (method, host), members in sorted(by_origin.items()):
        pos = frozenset((i, 0) for i in members)
        new = pos not in ids
        edges.append(Edge(root, wire(f"{method} {host}"), state_of(pos)))
        if new:
            work.append(pos)
    done: set[frozenset] = set()
    while work:
        pos = work.pop()
        if pos in done:
            continue
        done.add(pos)
        here = ids[pos]
        if any(len(pats[i].segments) == d for i, d in pos):
            edges.append(Edge(here, HTTP_EDGE_END, 1))
        lits: dict[str, set] = {}
        idn: set = set()
        anyn: set = set()
        for i, d in pos:
            segs = pats[i].segments
            if d >= len(segs):
                continue
            s = segs[d]
            if s == ANY:
                anyn.add((i, d + 1))
            elif s == ID:
                idn.add((i, d + 1))
            else:
                lits.setdefault(s, set()).add((i, d + 1))
        # A literal segment also takes the {id} and * continuations it would match.
        for s, nxt in sorted(lits.items()):
            target = set(nxt) | anyn | (idn if segment_class(s) is not None else set())
            fs = frozenset(target)
            new = fs not in ids
            edges.append(Edge(here, wire(s), state_of(fs)))
            if new:
                work.append(fs)
        for label, target in ((HTTP_EDGE_ID, idn | anyn), (HTTP_EDGE_ANY, anyn)):
            if not target:
                continue
            fs = frozenset(target)
            new = fs not in ids
            edges.append(Edge(here, label, state_of(fs)))
            if new:
                work.append(fs)
    return Graph(root, tuple(sorted(edges, key=lambda e: (e.state, e.key()))), next_id[0] - base + 1)


def walk(graph: Graph, method: str, host: str, path: str) -> bool:
    """What the probe decides for a request, on the graph (the same steps, in Python)."""
    table = {(e.state, e.label): e.next for e in graph.edges}
    state = table.get((graph.root, wire(f"{method} {host}")))
    segs = segments(path)
    if state is None or segs is None:
        return False
    for s in segs:
        b = wire(s)
        nxt = table.get((state, b)) if b is not None and 0 < len(b) <= 64 else None
        if nxt is None and segment_class(s) is not None:
            nxt = table.get((state, HTTP_EDGE_ID))
        if nxt is None:
            nxt = table.get((state, HTTP_EDGE_ANY))
        if nxt is None:
            return False
        state = nxt
    return (state, HTTP_EDGE_END) in table


__all__ = ["Edge", "Graph", "HttpPattern", "HttpPatternError", "compile_graph", "parse_entry",
           "segment_class", "walk"]
