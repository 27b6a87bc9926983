"""The MCP substrate's closure: tool, prompt and resource elements from behaviour keys (a
registered closure builder), and per allowed tool or prompt its argument envelope from the
profile's argument evidence (pure and deterministic).

Key level (:func:`elements`, registered in :data:`enforcer.closure.BUILDERS`):

* ``mcp:tools/list``, ``mcp:tools/call:NAME``, ``mcp:prompts/get:NAME``: one element each
  (rule ``exact``, or ``literal``): a tool is allowed by name, never by similarity to another;
* ``mcp:resources/read:URI``: a URI template the server declared stays one element
  (``uri-template``); under structural closure, URLs become host and path templates
  (``url-pattern``, :mod:`enforcer.urlpattern`; ``*`` segments flagged ``url-sibling-wildcard``),
  never crossing to another host; any other URI stays exact.

Argument level (:func:`arguments`), for every tool and prompt that passed confidence: per
argument path, the values seen become elements, each named by its rule and judged by the same
confidence rule as every element (N occurrences over M distinct sessions, the union of its
values' session samples by default):

* ``secret``: a credential-like argument (values never recorded): any value;
* ``range``: numbers from the smallest to the largest seen (integers only when only integers);
* ``path-prefix``: an absolute path and everything under it; more than ``max_siblings`` paths in
  one directory widen to the directory (flagged ``directory-prefix``);
* ``url``: URLs as scheme, host and path template;
* ``pattern``: identifiers that all share one class (``hash``, ``uuid``, ``number``, ``opaque``);
* ``enum``: each value, while at most ``max_values`` distinct strings were seen (booleans and
  null always);
* ``free-text``: more distinct strings with no shared structure: any string up to the longest
  length seen, rounded up to a power of two (flagged ``free-text``).

Under ``literal`` closure every value is its own ``enum`` element and paths do not cover what lies
below them. Elements below the threshold go to review and their entries to watch. What the
evidence could not show (calls cut at the evidence bounds, values or paths past the caps) is
listed in review as a ``blind-spot``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

from sensor.mcp_evidence import REDACTED, ArgumentEvidence, PathEvidence, decode_token, split_key, token
from sensor.profile import BehaviourStats

from . import urlpattern
from .elements import Element, provenance_record, shortfall
from .mcp_envelope import RULES, ArgElement, ResourceElement, _norm_path, _num

DEFAULT_MAX_VALUES = 8
SUBSTRATE = "mcp"
CHANGED = "changed-during-observation"


# ---- key level: the registered builder -----------------------------------------------------


def elements(mode: str, keys: list[str], max_siblings: int) -> list[Element]:
    """Elements for ``mcp:`` behaviour keys under ``mode`` (literal or structural)."""
    out: list[Element] = []
    urls: dict[str, str] = {}  # uri -> key
    for key in keys:
        try:
            method, name = split_key(key)
        except ValueError:
            out.append(Element(key, SUBSTRATE, "exact", [key], encodable=False))
            continue
        rule = "literal" if mode == "literal" else "exact"
        if method != "resources/read":
            detail = "the tool listing" if method == "tools/list" else f"{method} of {name}"
            out.append(Element(key, SUBSTRATE, rule, [key], detail=detail, entries=(key,)))
        elif "{" in (name or ""):
            out.append(Element(key, SUBSTRATE, "uri-template", [key], detail="a URI template the server declared",
                               entries=(key,)))
        elif mode != "literal" and urlpattern.parse_url(name) is not None:
            urls[name] = key
        else:
            out.append(Element(key, SUBSTRATE, rule, [key], entries=(key,)))
    derived, _ = urlpattern.derive(urls, max_siblings)
    for dp in derived:
        entry = ResourceElement("url", dp.pattern.text).entry
        out.append(Element(entry, SUBSTRATE, "url-pattern", sorted(urls[u] for u in dp.members),
                           detail=f"{len(dp.members)} URIs on {dp.pattern.host}" + (
                               f"; {dp.wildcards} segment(s) widened to * (more than {max_siblings} siblings)"
                               if dp.wildcards else ""),
                           flags=("url-sibling-wildcard",) if dp.wildcards else (), entries=(entry,)))
    return out


def rules(mode: str, max_siblings: int, max_values: int) -> dict:
    """How ``mode`` treats the mcp substrate, as recorded in the policy's closure decision."""
    if mode == "literal":
        return {"rule": "literal", "arguments": {"rules": ["enum", "secret"]}}
    return {"rule": "exact-tools+argument-envelopes",
            "resources": {"rule": "uri-template+url-pattern", "siblingsAbove": max_siblings},
            "arguments": {"rules": list(RULES), "enumAbove": max_values, "siblingsAbove": max_siblings,
                          "sessionRule": "as the confidence decision's, over the values an element covers"}}


# ---- argument level -------------------------------------------------------------------------


@dataclass
class ArgumentDecision:
    """The argument envelopes of the allowed tools and prompts, with their provenance and
    review, the entries to watch, and the admits used."""

    calls: dict[str, dict[str, tuple[ArgElement, ...]]] = field(default_factory=dict)
    provenance: list[dict] = field(default_factory=list)
    review: list[dict] = field(default_factory=list)
    watch: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)


@dataclass
class _Candidate:
    el: ArgElement
    members: list[tuple[str, BehaviourStats]]  # (shown value, stats)
    detail: str = ""
    flags: tuple[str, ...] = ()


def _cand(el: ArgElement, members, detail: str = "", flags=()) -> _Candidate:
    return _Candidate(el, list(members), detail, tuple(flags))


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _candidates(path: str, pe: PathEvidence, closure: str, max_values: int, max_siblings: int) -> list[_Candidate]:
    out: list[_Candidate] = []
    secrets: list[tuple[str, BehaviourStats]] = []
    numbers: list[tuple[Any, BehaviourStats]] = []
    paths: list[tuple[str, BehaviourStats]] = []
    urls: list[tuple[str, BehaviourStats]] = []
    strings: list[tuple[str, BehaviourStats]] = []
    literal_tokens: list[tuple[str, BehaviourStats]] = []
    long_: list[tuple[int, BehaviourStats]] = []
    for tok, st in sorted(pe.values.items()):
        kind, v = decode_token(tok)
        if kind == "redacted":
            secrets.append((REDACTED, st))
        elif kind == "long":
            long_.append((v, st))
        elif closure == "literal" or not isinstance(v, (str, int, float)) or isinstance(v, bool):
            literal_tokens.append((tok, st))
        elif isinstance(v, str):
            if _norm_path(v) is not None:
                paths.append((v, st))
            elif urlpattern.parse_url(v) is not None:
                urls.append((v, st))
            else:
                strings.append((v, st))
        else:
            numbers.append((v, st))

    if secrets:
        out.append(_cand(ArgElement(path, "secret"), secrets, "credential-like argument: values are never recorded"))
    for tok, st in literal_tokens:
        out.append(_cand(ArgElement(path, "enum", value=tok), [(tok, st)]))
    if numbers:
        lo, hi = min(v for v, _ in numbers), max(v for v, _ in numbers)
        if pe.overflow is not None and pe.num_min is not None:
            lo, hi = min(lo, pe.num_min), max(hi, pe.num_max)
        integer = all(float(v).is_integer() for v, _ in numbers)
        out.append(_cand(ArgElement(path, "range", min=lo, max=hi, integer=integer),
                         [(token(v), st) for v, st in numbers],
                         f"{len(numbers)} distinct numbers seen, from {_num(lo)} to {_num(hi)}"))
    if paths:
        by_dir: dict[str, list[tuple[str, BehaviourStats]]] = {}
        for v, st in paths:
            p = _norm_path(v)
            by_dir.setdefault(posixpath.dirname(p), []).append((p, st))
        for d, members in sorted(by_dir.items()):
            distinct = sorted({p for p, _ in members})
            if len(distinct) > max_siblings and d != "/":
                out.append(_cand(ArgElement(path, "path-prefix", prefix=d), members,
                                 f"{len(distinct)} sibling paths in {d} (more than {max_siblings})",
                                 ("directory-prefix",)))
                continue
            for p in distinct:
                out.append(_cand(ArgElement(path, "path-prefix", prefix=p), [(q, st) for q, st in members if q == p],
                                 "the observed path and everything below it"))
    if urls:
        stats = dict(urls)
        derived, _ = urlpattern.derive(stats, max_siblings)
        for dp in derived:
            out.append(_cand(ArgElement(path, "url", url=dp.pattern.text), [(u, stats[u]) for u in dp.members],
                             f"{len(dp.members)} URLs on {dp.pattern.host}" + (
                                 f"; {dp.wildcards} segment(s) widened to * (more than {max_siblings} siblings)"
                                 if dp.wildcards else ""),
                             ("url-sibling-wildcard",) if dp.wildcards else ()))
    if strings or long_ or (pe.overflow is not None and pe.max_length and not numbers):
        classes = {urlpattern.identifier_class(v) for v, _ in strings}
        overflowing = pe.overflow is not None or bool(long_)
        if strings and not overflowing and len(classes) == 1 and None not in classes:
            cls = classes.pop()
            out.append(_cand(ArgElement(path, "pattern", pattern=cls), [(token(v), st) for v, st in strings],
                             f"{len(strings)} distinct {cls} identifiers"))
        elif strings and not overflowing and len(strings) <= max_values:
            for v, st in strings:
                out.append(_cand(ArgElement(path, "enum", value=token(v)), [(token(v), st)]))
        else:
            longest = max([pe.max_length] + [n for n, _ in long_] + [len(v) for v, _ in strings])
            members = [(token(v), st) for v, st in strings] + [(f"<long:{n}>", st) for n, st in long_]
            if pe.overflow is not None:
                members.append((f"<{pe.overflow.count} more values not kept>", pe.overflow))
            out.append(_cand(ArgElement(path, "free-text", max_length=_pow2(longest)), members,
                             f"{len(members)} distinct strings with no shared structure (more than {max_values}); "
                             f"longest {longest} characters", ("free-text",)))
    return out


_SHOWN_VALUES = 8


def _evidence(owner: str, c: _Candidate, session_rule: str) -> dict:
    """The confidence evidence of an argument element: the element rule of every substrate
    (:meth:`enforcer.elements.Element.evidence`) over the values it covers."""
    stats = {f"{i}": st for i, (_, st) in enumerate(c.members)}
    ev = Element(c.el.entry(owner), SUBSTRATE, c.el.rule, sorted(stats)).evidence(stats, session_rule)
    values = sorted({v for v, _ in c.members})
    ev["behaviours"] = [owner]
    ev["values"] = values[:_SHOWN_VALUES] + ([f"... {len(values) - _SHOWN_VALUES} more"]
                                             if len(values) > _SHOWN_VALUES else [])
    return ev


def arguments(allowed: list[str], evidence: ArgumentEvidence, *, closure: str, min_count: int, min_sessions: int,
              max_values: int, max_siblings: int, session_rule: str,
              admits: Mapping[str, str]) -> ArgumentDecision:
    """The argument envelope of every allowed ``tools/call`` and ``prompts/get`` key."""
    out = ArgumentDecision()
    mode = "literal" if closure == "literal" else "structural"
    for key in sorted(allowed):
        try:
            method, _ = split_key(key)
        except ValueError:
            continue
        if method not in ("tools/call", "prompts/get"):
            continue
        ce = evidence.calls.get(key)
        paths: dict[str, list[ArgElement]] = {}
        for path in sorted(ce.paths) if ce else ():
            for c in _candidates(path, ce.paths[path], mode, max_values, max_siblings):
                entry = c.el.entry(key)
                ev = _evidence(key, c, session_rule)
                reason = None
                if not (ev["count"] >= min_count and ev["sessions"] >= min_sessions):
                    if entry not in admits:
                        item = {"key": entry, "substrate": SUBSTRATE, "rule": c.el.rule, "evidence": ev,
                                "threshold": {"minCount": min_count, "minSessions": min_sessions},
                                "why": shortfall(ev, min_count, min_sessions)}
                        if c.detail:
                            item["detail"] = c.detail
                        out.review.append(item)
                        out.watch.add(entry)
                        continue
                    reason = admits[entry]
                    out.used.add(entry)
                out.provenance.append({"entry": entry, "observed": True,
                                       **provenance_record(SUBSTRATE, c.el.rule, ev, reason, c.detail, c.flags)})
                paths.setdefault(path, []).append(c.el)
        out.calls[key] = {p: tuple(es) for p, es in paths.items()}
        out.review += _blind_spots(key, ce)
    out.provenance.sort(key=lambda p: p["entry"])
    out.review.sort(key=lambda r: r["key"])
    return out


def _blind_spots(key: str, ce) -> list[dict]:
    """What the evidence of ``key`` could not show: review items, never silently ignored."""
    if ce is None:
        return []
    out = []
    base = {"substrate": SUBSTRATE, "rule": "blind-spot", "evidence": {"behaviours": [key]}}
    if ce.cut:
        out.append({"key": f"{key}#<cut>", **base, "why": f"{ce.cut} call(s) had more argument values than the evidence "
                                                    f"keeps; the envelope is derived from the values kept"})
    if ce.paths_over:
        out.append({"key": f"{key}#<paths-over-cap>", **base, "why": f"{ce.paths_over} argument path(s) past the evidence's cap "
                                                     f"were not kept; they are outside the envelope"})
    for path in sorted(ce.paths):
        o = ce.paths[path].overflow
        if o is not None:
            out.append({"key": f"{key}#{path}", **base,
                        "why": f"more distinct values than kept per path; {o.count} not kept"})
    return out


def catalog(evidence: ArgumentEvidence) -> dict[str, str]:
    """Each tool's definition hash from the catalogs seen while observing; a tool whose
    definition changed during observation is recorded as such and never matches."""
    tools: dict[str, str] = {}
    fingerprints = sorted(evidence.catalogs)
    for fp in fingerprints:
        for name, h in evidence.catalogs[fp]["tools"].items():
            if tools.get(name, h) != h:
                tools[name] = CHANGED
            elif name not in tools:
                tools[name] = h
    return dict(sorted(tools.items()))
