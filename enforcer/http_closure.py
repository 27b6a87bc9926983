"""The http substrate's closure: observed requests become request patterns (pure).

Keys are ``http:METHOD host/path status`` (:mod:`sensor.httpkeys`); the status is evidence, so
every status of one request is one behaviour group. Rules, each named in provenance:

- ``exact-request`` (literal closure, or a request nothing widened): ``http:METHOD host/path``;
- ``path-template``: identifier-like segments (numbers, UUIDs, hashes, opaque tokens) become
  ``{id}`` (:func:`enforcer.urlpattern.derive`), so a new document id is inside the envelope;
- ``path-template+sibling-wildcard``: more than ``max_siblings`` distinct literal segments in one
  place become ``*`` (flagged ``sibling-wildcard``).

Every pattern keeps its method and its host: a GET never admits a POST or a DELETE, and one host
never admits another. Hosts are the names the requests carried in their Host header. A request
the probe cannot judge by its parts (a ``..`` in its path, a segment or host longer than it
compares) is an element that cannot be encoded: it goes to review, never into the allowed set.
"""

from __future__ import annotations

from collections import Counter

from sensor.httpkeys import HttpKeyError, judgeable, literal_segment_ok, parse_key, segments

from .elements import Element
from .http_patterns import HttpPattern, segment_class
from .urlpattern import ANY, ID, derive

RULES = {"literal": "exact-request", "template": "path-template",
         "wildcard": "path-template+sibling-wildcard"}


def _statuses(members: list[str]) -> str:
    c = Counter(parse_key(m).status for m in members)
    return ", ".join(f"{s} ×{n}" if s != "-" else f"no response ×{n}" for s, n in sorted(c.items()))


def _encodable(method: str, host: str, path: str) -> bool:
    if judgeable(method, host, path) is not None:
        return False
    return all(literal_segment_ok(s) or segment_class(s) is not None for s in segments(path) or ())


def elements(keys: list[str], closure: str, max_siblings: int) -> tuple[list[Element], list[str]]:
    """Elements for the http behaviours ``keys``, and the keys that do not parse."""
    bad: list[str] = []
    requests: dict[tuple[str, str, str], list[str]] = {}
    for k in sorted(keys):
        try:
            b = parse_key(k)
        except HttpKeyError:
            bad.append(k)
            continue
        requests.setdefault((b.method, b.host, b.path), []).append(k)
    out: list[Element] = []
    groups: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
    for (method, host, path), members in sorted(requests.items()):
        if not _encodable(method, host, path):
            out.append(Element(f"http:{method} {host}{path}", "http", RULES["literal"], members,
                               detail=f"the probe cannot judge this request by its parts: "
                                      f"{judgeable(method, host, path) or 'a segment longer than it compares'}",
                               encodable=False))
            continue
        if closure == "literal":
            p = HttpPattern(method, host, segments(path))
            out.append(Element(p.entry, "http", RULES["literal"], members,
                               detail=f"responses: {_statuses(members)}", entries=(p.entry,)))
            continue
        groups.setdefault((method, host), []).append((path, members))
    for (method, host), items in sorted(groups.items()):
        # urlpattern works on URLs: the method and host stay fixed, only the path is templated
        by_url = {f"http://envelope.invalid/{'/'.join(segments(path))}": (path, members)
                  for path, members in items}
        derived, _rejected = derive(by_url, max_siblings)
        for d in derived:
            segs = d.pattern.segments
            members = sorted(m for u in d.members for m in by_url[u][1])
            paths = sorted(by_url[u][0] for u in d.members)
            p = HttpPattern(method, host, segs)
            wild = d.wildcards > 0
            templated = any(s in (ID, ANY) for s in segs)
            rule = RULES["wildcard"] if wild else RULES["template"] if templated else RULES["literal"]
            ids = [s for path in paths for s, t in zip(segments(path), segs) if t == ID]
            classes = Counter(segment_class(s) for s in ids)
            detail = f"responses: {_statuses(members)}"
            if ids:
                detail = (f"{{id}} from {len(set(ids))} value(s) ("
                          + ", ".join(f"{c} ×{n}" for c, n in sorted(classes.items())) + f"); {detail}")
            if wild:
                detail = f"more than {max_siblings} sibling segments widened to *; {detail}"
            out.append(Element(p.entry, "http", rule, members, detail=detail,
                               flags=("sibling-wildcard",) if wild else (), entries=(p.entry,)))
    return sorted(out, key=lambda e: e.id), bad


def rules(closure: str, max_siblings: int) -> dict:
    """How the closure treats http, as recorded in the policy's closure decision."""
    if closure == "literal":
        return {"rule": "exact-request", "methods": "never widened", "hosts": "never widened"}
    return {"path": {"rule": "path-template", "identifiers": "number, uuid, hash, opaque -> {id}",
                     "siblingsAbove": max_siblings},
            "methods": "never widened", "hosts": "exact, from the requests' Host header"}


__all__ = ["RULES", "elements", "rules"]
