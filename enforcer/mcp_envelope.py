"""The MCP envelope: which tools, prompts and resources a workload may use, and with which
arguments, derived from observed calls (pure and deterministic), and the matcher that judges a
live call against it.

Derivation takes :class:`sensor.mcp_evidence.ArgumentEvidence` (per behaviour key, the calls and
their argument values) and, optionally, the profile's per-behaviour stats for the same keys
(``Profile.behaviours()``), which then decide tool-level confidence.

Decisions, each recorded in the envelope:

- **Allowlist.** A tool (``mcp:tools/call:NAME``), prompt (``mcp:prompts/get:NAME``) or resource
  (``mcp:resources/read:URI``) is allowed with at least ``min_count`` calls over ``min_sessions``
  distinct sessions. Below that it goes to ``review`` with its evidence and to ``watch``.
- **Argument envelope** (per allowed tool or prompt, per argument path; every element is named by
  its rule and carries its evidence):

  * ``enum``: one observed value (strings that fit no structural rule when at most
    ``max_values`` distinct ones were seen; booleans, null, empty objects and lists always);
  * ``path-prefix``: an absolute path and everything below it; more than ``max_siblings``
    observed paths in one directory widen to that directory (``directory-prefix``, flagged);
    values are matched after normalisation, so ``..`` cannot climb out;
  * ``range``: numbers between the smallest and largest observed (integers only when only
    integers were seen);
  * ``url``: scheme, host and path template (:mod:`enforcer.urlpattern`);
  * ``pattern``: identifier-like strings of one class (``hash``, ``uuid``, ``number``,
    ``opaque``), e.g. git revisions;
  * ``free-text``: strings with no structure and more than ``max_values`` distinct values: any
    string up to the longest observed length rounded up to a power of two (flagged);
  * ``secret``: a credential-like argument, whose values are never recorded: any value.

  Under ``literal`` closure every value is its own ``enum`` element and paths do not cover what
  lies below them. An element enters the envelope with at least ``min_count`` occurrences over
  ``min_sessions`` distinct sessions (the union of its values' session samples); below, it goes
  to review and watch. An argument path never observed is outside the envelope.

- **Catalog.** The tool catalog fingerprints seen while the evidence was gathered, with each
  tool's definition hash. The gateway compares the live catalog against the tool hashes: a tool
  whose definition changed makes the envelope stale for that tool.

:meth:`McpEnvelope.judge_call` returns a :class:`Verdict` with the reason and the entry that
decided. It raises :class:`EvaluationError` when a call cannot be evaluated (the gateway then
fails closed in enforce mode).
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

from sensor.mcp_evidence import (
    REDACTED,
    ArgumentEvidence,
    PathEvidence,
    decode_token,
    path_part,
    secret_name,
    secret_value,
    split_key,
    token,
    tool_call_key,
)
from sensor.profile import BehaviourStats
from sensor.safeyaml import YamlError, load_yaml
from sensor.workload import Workload

from . import urlpattern
from .policy import API_VERSION, CLOSURES, MODES, dump_policy, iso_time, policy_name

KIND = "McpEnvelope"
DEFAULT_MIN_COUNT = 5
DEFAULT_MIN_SESSIONS = 3
DEFAULT_MAX_VALUES = 8
DEFAULT_MAX_SIBLINGS = 3
MATCH_MAX_LEAVES = 4096  # a call with more argument values than this cannot be evaluated
RULES = ("enum", "path-prefix", "range", "url", "pattern", "free-text", "secret")
_SHOWN = 8


class EnvelopeError(ValueError):
    """A malformed envelope document or bad derivation options; one line naming the field."""


class EvaluationError(Exception):
    """A call the envelope cannot evaluate."""


# ---- argument leaves (raw values, for matching) ------------------------------------------------


def leaves(arguments: Any) -> list[tuple[str, Any, bool]]:
    """``(path, value, secret)`` for every leaf of a call's arguments, with the same paths as
    :func:`sensor.mcp_evidence.flatten`. Raises :class:`EvaluationError` past
    :data:`MATCH_MAX_LEAVES` leaves or on arguments that are not an object."""
    if arguments is None:
        return []
    if not isinstance(arguments, dict):
        raise EvaluationError(f"arguments must be an object, not {type(arguments).__name__}")
    out: list[tuple[str, Any, bool]] = []
    stack = [(path_part(k), v, secret_name(k)) for k, v in reversed(list(arguments.items()))]
    while stack:
        path, v, secret = stack.pop()
        if len(out) > MATCH_MAX_LEAVES:
            raise EvaluationError(f"more than {MATCH_MAX_LEAVES} argument values")
        if isinstance(v, dict) and v and not secret:
            stack.extend((f"{path}.{path_part(k)}", x, secret_name(k)) for k, x in reversed(list(v.items())))
        elif isinstance(v, list) and v and not secret:
            stack.extend((f"{path}[]", x, False) for x in reversed(v))
        else:
            out.append((path, v, secret))
    return out


def shown(v: Any, secret: bool = False) -> str:
    """A value as it may appear in a reason or a violation: bounded, secrets redacted."""
    if secret or (isinstance(v, str) and secret_value(v)):
        return REDACTED
    t = token(v) if not isinstance(v, (dict, list)) else json.dumps(v)[:80]
    return t if len(t) <= 80 else t[:77] + "..."


# ---- elements -------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _norm_path(v: str) -> str | None:
    if not v.startswith("/") or v.startswith("//") or "\0" in v:
        return None
    return posixpath.normpath(v)


@dataclass(frozen=True)
class ArgElement:
    """One allowed shape for the values at one argument path."""

    path: str
    rule: str
    value: str = ""  # enum: the value's token (canonical JSON)
    prefix: str = ""  # path-prefix
    below: bool = True  # path-prefix: also everything below the prefix
    min: float | None = None  # range
    max: float | None = None
    integer: bool = False
    url: str = ""  # url: the pattern text
    pattern: str = ""  # pattern: the identifier class
    max_length: int = 0  # free-text

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise EnvelopeError(f"rule {self.rule!r} is not one of {', '.join(RULES)}")
        if self.rule == "url":
            object.__setattr__(self, "_url", urlpattern.UrlPattern.parse(self.url))

    @property
    def spec(self) -> str:
        r = self.rule
        if r == "enum":
            return self.value
        if r == "path-prefix":
            return self.prefix + ("/**" if self.below else "")
        if r == "range":
            return f"{_num(self.min)}..{_num(self.max)}" + (" integer" if self.integer else "")
        if r == "url":
            return self.url
        if r == "pattern":
            return self.pattern
        if r == "free-text":
            return f"length<={self.max_length}"
        return "any"

    def entry(self, owner: str) -> str:
        return f"{owner}#{self.path}:{self.rule}:{self.spec}"

    def matches(self, v: Any, secret: bool = False) -> bool:
        r = self.rule
        if r == "secret":
            return secret or (isinstance(v, str) and secret_value(v))
        if secret:
            return False
        if r == "enum":
            if isinstance(v, str) and len(v) > 8192:
                return False
            return token(v) == self.value
        if r == "range":
            if not _is_number(v):
                return False
            if self.integer and not float(v).is_integer():
                return False
            return self.min <= v <= self.max
        if not isinstance(v, str):
            return False
        if r == "path-prefix":
            p = _norm_path(v)
            if p is None:
                return False
            if p == self.prefix:
                return True
            return self.below and p.startswith(self.prefix.rstrip("/") + "/")
        if r == "url":
            return self._url.matches(v)  # type: ignore[attr-defined]
        if r == "pattern":
            return urlpattern.identifier_class(v) == self.pattern
        return len(v) <= self.max_length  # free-text

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"path": self.path, "rule": self.rule}
        if self.rule == "enum":
            d["value"] = json.loads(self.value)
        elif self.rule == "path-prefix":
            d.update(prefix=self.prefix, below=self.below)
        elif self.rule == "range":
            d.update(min=self.min, max=self.max, integer=self.integer)
        elif self.rule == "url":
            d["url"] = self.url
        elif self.rule == "pattern":
            d["pattern"] = self.pattern
        elif self.rule == "free-text":
            d["maxLength"] = self.max_length
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ArgElement":
        if not isinstance(d, dict):
            raise EnvelopeError(f"{where}: expected a mapping")
        path, rule = d.get("path"), d.get("rule")
        if not isinstance(path, str) or not path:
            raise EnvelopeError(f"{where}.path: missing or not a non-empty string")
        if rule not in RULES:
            raise EnvelopeError(f"{where}.rule: {rule!r} is not one of {', '.join(RULES)}")
        try:
            if rule == "enum":
                if "value" not in d:
                    raise EnvelopeError(f"{where}.value: missing")
                return cls(path, rule, value=token(d["value"]))
            if rule == "path-prefix":
                prefix = d.get("prefix")
                if not isinstance(prefix, str) or _norm_path(prefix) != prefix:
                    raise EnvelopeError(f"{where}.prefix: {prefix!r} is not a normalised absolute path")
                return cls(path, rule, prefix=prefix, below=bool(d.get("below", True)))
            if rule == "range":
                lo, hi = d.get("min"), d.get("max")
                if not (_is_number(lo) and _is_number(hi) and lo <= hi):
                    raise EnvelopeError(f"{where}: min and max must be numbers with min <= max")
                return cls(path, rule, min=lo, max=hi, integer=bool(d.get("integer", False)))
            if rule == "url":
                return cls(path, rule, url=str(d.get("url")))
            if rule == "pattern":
                if d.get("pattern") not in ("number", "uuid", "hash", "opaque"):
                    raise EnvelopeError(f"{where}.pattern: {d.get('pattern')!r} is not number, uuid, hash or opaque")
                return cls(path, rule, pattern=d["pattern"])
            if rule == "free-text":
                n = d.get("maxLength")
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise EnvelopeError(f"{where}.maxLength: {n!r} is not a non-negative integer")
                return cls(path, rule, max_length=n)
            return cls(path, rule)
        except ValueError as e:
            if isinstance(e, EnvelopeError):
                raise
            raise EnvelopeError(f"{where}: {e}") from None


def _num(v: float | None) -> str:
    if v is None:
        return "?"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


@dataclass(frozen=True)
class ResourceElement:
    """An allowed resource: an exact URI, a URI template the server declared, or a URL pattern."""

    rule: str  # exact | template | url
    value: str

    def matches(self, uri: str, template: str | None) -> bool:
        if self.rule == "template":
            return template == self.value
        if self.rule == "url":
            return urlpattern.UrlPattern.parse(self.value).matches(uri)
        return uri == self.value

    @property
    def entry(self) -> str:
        return f"mcp:resources/read:{self.value}" if self.rule != "url" else f"mcp:resources/read#url:{self.value}"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    entry: str  # the allowed entry that admitted the call, or the one that refused it
    watch: bool = False  # the refusing entry is on the watch list (seen, but below threshold)


# ---- the envelope ---------------------------------------------------------------------------


@dataclass
class McpEnvelope:
    workload: Workload
    mode: str = "alert"
    closure: str = "structural"
    calls: dict[str, dict[str, tuple[ArgElement, ...]]] = field(default_factory=dict)  # key -> path -> elements
    resources: tuple[ResourceElement, ...] = ()
    catalog: dict = field(default_factory=dict)  # {"fingerprints": [..], "tools": {name: hash}}
    decisions: dict = field(default_factory=dict)
    provenance: tuple[dict, ...] = ()
    review: tuple[dict, ...] = ()
    watch: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EnvelopeError(f"spec.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.closure not in ("literal", "structural"):
            raise EnvelopeError(f"closure {self.closure!r} is not literal or structural")
        self._watch = frozenset(self.watch)
        self._review_keys = {r["key"]: r for r in self.review}

    # ---- queries -------------------------------------------------------------------------

    def allows_tool(self, name: str) -> bool:
        return tool_call_key(name) in self.calls

    def tool_hash(self, name: str) -> str | None:
        return (self.catalog.get("tools") or {}).get(name)

    def judge_call(self, key: str, arguments: Any) -> Verdict:
        """Judge a ``tools/call`` or ``prompts/get`` (by behaviour key) and its arguments."""
        allowed = self.calls.get(key)
        if allowed is None:
            item = self._review_keys.get(key)
            if item is not None:
                return Verdict(False, f"{key} is under review ({item.get('why', 'below threshold')}), "
                                      f"not in the allowlist", key, True)
            return Verdict(False, f"{key} is not in the allowlist", key)
        for path, v, secret in leaves(arguments):
            elements = allowed.get(path)
            if not elements:
                entry = f"{key}#{path}"
                watched = any(w.startswith(entry + ":") for w in self._watch)
                what = "was seen too rarely to be admitted (under review)" if watched else "was never observed"
                return Verdict(False, f"argument {path!r} of {key} {what}", entry, watched)
            if not any(e.matches(v, secret) for e in elements):
                watched = [w for w in self._watch if w.startswith(f"{key}#{path}:")]
                allowed_text = ", ".join(f"{e.rule} {e.spec}" for e in elements[:_SHOWN])
                note = f"; {len(watched)} shape(s) of this argument seen too rarely are under review" if watched else ""
                return Verdict(False, f"argument {path!r} of {key} = {shown(v, secret)} is outside the envelope "
                                      f"(allowed: {allowed_text}{note})", f"{key}#{path}", bool(watched))
        return Verdict(True, "inside the envelope", key)

    def judge_resource(self, uri: str, template: str | None, key: str) -> Verdict:
        for r in self.resources:
            if r.matches(uri, template):
                return Verdict(True, "inside the envelope", r.entry)
        item = self._review_keys.get(key)
        if item is not None:
            return Verdict(False, f"{key} is under review ({item.get('why', 'below threshold')})", key, True)
        return Verdict(False, f"{key} is not in the allowlist", key)

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        calls = []
        for key in sorted(self.calls):
            method, name = split_key(key)
            calls.append({"key": key, "method": method, "name": name,
                          "arguments": [e.to_dict() for p in sorted(self.calls[key])
                                        for e in self.calls[key][p]]})
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name or policy_name(self.workload)},
            "spec": {
                "workload": self.workload.to_dict(),
                "mode": self.mode,
                "decisions": json.loads(json.dumps(self.decisions)),
                "catalog": json.loads(json.dumps(self.catalog)),
                "allow": {"calls": calls,
                          "resources": [{"rule": r.rule, "value": r.value} for r in self.resources]},
                "provenance": [json.loads(json.dumps(p)) for p in self.provenance],
                "review": [json.loads(json.dumps(r)) for r in self.review],
                "watch": list(self.watch),
            },
        }

    @classmethod
    def from_dict(cls, d: Any) -> "McpEnvelope":
        if not isinstance(d, dict):
            raise EnvelopeError("document: expected a mapping")
        if d.get("apiVersion") != API_VERSION:
            raise EnvelopeError(f"apiVersion: {d.get('apiVersion')!r} is not supported (this build reads {API_VERSION})")
        if d.get("kind") != KIND:
            raise EnvelopeError(f"kind: {d.get('kind')!r} is not {KIND}")
        spec = d.get("spec")
        if not isinstance(spec, dict):
            raise EnvelopeError("spec: expected a mapping")
        w = spec.get("workload")
        if not isinstance(w, dict) or not all(isinstance(w.get(k), str) and w.get(k)
                                              for k in ("namespace", "kind", "name", "container")):
            raise EnvelopeError("spec.workload: needs non-empty namespace, kind, name and container")
        allow = spec.get("allow") or {}
        if not isinstance(allow, dict):
            raise EnvelopeError("spec.allow: expected a mapping")
        calls: dict[str, dict[str, tuple[ArgElement, ...]]] = {}
        for i, c in enumerate(_list(allow.get("calls"), "spec.allow.calls")):
            where = f"spec.allow.calls[{i}]"
            if not isinstance(c, dict) or not isinstance(c.get("key"), str):
                raise EnvelopeError(f"{where}.key: missing")
            try:
                method, _ = split_key(c["key"])
            except ValueError as e:
                raise EnvelopeError(f"{where}.key: {e}") from None
            if method not in ("tools/call", "prompts/get"):
                raise EnvelopeError(f"{where}.key: {c['key']!r} is not a tools/call or prompts/get key")
            paths: dict[str, list[ArgElement]] = {}
            for j, a in enumerate(_list(c.get("arguments"), f"{where}.arguments")):
                e = ArgElement.from_dict(a, f"{where}.arguments[{j}]")
                paths.setdefault(e.path, []).append(e)
            calls[c["key"]] = {p: tuple(es) for p, es in paths.items()}
        resources = []
        for i, r in enumerate(_list(allow.get("resources"), "spec.allow.resources")):
            if not isinstance(r, dict) or r.get("rule") not in ("exact", "template", "url") \
                    or not isinstance(r.get("value"), str):
                raise EnvelopeError(f"spec.allow.resources[{i}]: needs rule exact|template|url and a value")
            if r["rule"] == "url":
                try:
                    urlpattern.UrlPattern.parse(r["value"])
                except ValueError as e:
                    raise EnvelopeError(f"spec.allow.resources[{i}].value: {e}") from None
            resources.append(ResourceElement(r["rule"], r["value"]))
        catalog = spec.get("catalog") or {}
        tools = catalog.get("tools") if isinstance(catalog, dict) else None
        if not isinstance(catalog, dict) or not isinstance(tools or {}, dict) or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in (tools or {}).items()):
            raise EnvelopeError("spec.catalog: expected {fingerprints: [...], tools: {name: hash}}")
        review = _list(spec.get("review"), "spec.review")
        for i, r in enumerate(review):
            if not isinstance(r, dict) or not isinstance(r.get("key"), str):
                raise EnvelopeError(f"spec.review[{i}].key: missing")
        watch = _list(spec.get("watch"), "spec.watch")
        if not all(isinstance(x, str) for x in watch):
            raise EnvelopeError("spec.watch: expected a list of strings")
        meta = d.get("metadata") or {}
        return cls(Workload.from_dict(w), mode=spec.get("mode", "alert"),
                   closure=(spec.get("decisions") or {}).get("closure", {}).get("mode", "structural"),
                   calls=calls, resources=tuple(resources), catalog=dict(catalog),
                   decisions=dict(spec.get("decisions") or {}),
                   provenance=tuple(_list(spec.get("provenance"), "spec.provenance")),
                   review=tuple(review), watch=tuple(watch), name=str(meta.get("name") or ""))


def _list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise EnvelopeError(f"{where}: expected a list")
    return v


def dump_envelope(env: McpEnvelope, fmt: str = "yaml") -> str:
    """Deterministic text (equal envelopes give byte-identical output), written exactly as
    policies are."""
    if fmt not in ("yaml", "json"):
        raise EnvelopeError(f"unknown format {fmt!r} (want yaml or json)")
    return dump_policy(env, fmt)  # type: ignore[arg-type] - it only needs to_dict()


def parse_envelope(text: str, source: str = "envelope") -> McpEnvelope:
    try:
        data = load_yaml(text, source)
    except YamlError as e:
        raise EnvelopeError(str(e)) from None
    try:
        return McpEnvelope.from_dict(data)
    except EnvelopeError as e:
        raise EnvelopeError(f"{source}: {e}") from None


# ---- derivation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeOptions:
    closure: str = "structural"
    min_count: int = DEFAULT_MIN_COUNT
    min_sessions: int = DEFAULT_MIN_SESSIONS
    max_values: int = DEFAULT_MAX_VALUES
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    admits: tuple[tuple[str, str], ...] = ()  # (entry, reason)
    mode: str = "alert"

    def validate(self) -> None:
        if self.closure not in CLOSURES or self.closure == "probabilistic":
            raise EnvelopeError(f"closure {self.closure!r}: the MCP envelope is literal or structural")
        for name in ("min_count", "min_sessions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EnvelopeError(f"{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        for name in ("max_values", "max_siblings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise EnvelopeError(f"{name.replace('_', '-')} must be at least 1, got {v!r}")
        if self.mode not in MODES:
            raise EnvelopeError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for entry, reason in self.admits:
            if not reason or not reason.strip():
                raise EnvelopeError(f"--admit {entry}: a reason is required")


@dataclass
class _Candidate:
    entry: str
    rule: str
    members: list[tuple[str, BehaviourStats]]  # (shown value, stats)
    element: ArgElement | ResourceElement | None = None
    detail: str = ""
    flags: tuple[str, ...] = ()

    def evidence(self) -> dict:
        ss = [s for _, s in self.members]
        union = len(set().union(*(s.session_ids for s in ss))) if ss else 0
        exact = all(s.sessions_complete for s in ss)
        sessions = union if exact else max([union] + [s.sessions for s in ss])
        values = sorted({v for v, _ in self.members if v != self.entry})
        out = {"count": sum(s.count for s in ss), "sessions": sessions,
                "firstSeen": iso_time(min(s.first_seen for s in ss)) if ss else None,
                "lastSeen": iso_time(max(s.last_seen for s in ss)) if ss else None,
                "values": values[:_SHOWN] + ([f"... {len(values) - _SHOWN} more"] if len(values) > _SHOWN else [])}
        if not values:
            del out["values"]
        return out


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _arg_candidates(owner: str, path: str, pe: PathEvidence, opts: EnvelopeOptions) -> list[_Candidate]:
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
        elif opts.closure == "literal" or not isinstance(v, (str, int, float)) or isinstance(v, bool):
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

    def cand(el: ArgElement, members, detail="", flags=()) -> _Candidate:
        return _Candidate(el.entry(owner), el.rule, list(members), el, detail, tuple(flags))

    if secrets:
        out.append(cand(ArgElement(path, "secret"), secrets, "credential-like argument: values are never recorded"))
    for tok, st in literal_tokens:
        out.append(cand(ArgElement(path, "enum", value=tok), [(tok, st)]))
    if numbers:
        lo, hi = min(v for v, _ in numbers), max(v for v, _ in numbers)
        if pe.overflow is not None and pe.num_min is not None:
            lo, hi = min(lo, pe.num_min), max(hi, pe.num_max)
        integer = all(float(v).is_integer() for v, _ in numbers)
        out.append(cand(ArgElement(path, "range", min=lo, max=hi, integer=integer),
                        [(token(v), st) for v, st in numbers],
                        f"{len(numbers)} distinct numbers seen, from {_num(lo)} to {_num(hi)}"))
    if paths:
        by_dir: dict[str, list[tuple[str, BehaviourStats]]] = {}
        for v, st in paths:
            p = _norm_path(v)
            by_dir.setdefault(posixpath.dirname(p), []).append((p, st))
        for d, members in sorted(by_dir.items()):
            distinct = sorted({p for p, _ in members})
            if len(distinct) > opts.max_siblings and d != "/":
                out.append(cand(ArgElement(path, "path-prefix", prefix=d), members,
                                f"{len(distinct)} sibling paths in {d} (more than {opts.max_siblings})",
                                ("directory-prefix",)))
                continue
            for p in distinct:
                out.append(cand(ArgElement(path, "path-prefix", prefix=p),
                                [(q, st) for q, st in members if q == p], "the observed path and everything below it"))
    if urls:
        stats = dict(urls)
        derived, _ = urlpattern.derive(stats, opts.max_siblings)
        for dp in derived:
            out.append(cand(ArgElement(path, "url", url=dp.pattern.text), [(u, stats[u]) for u in dp.members],
                            f"{len(dp.members)} URLs on {dp.pattern.host}" + (
                                f"; {dp.wildcards} segment(s) widened to * (more than {opts.max_siblings} siblings)"
                                if dp.wildcards else ""),
                            ("url-sibling-wildcard",) if dp.wildcards else ()))
    if strings or long_ or (pe.overflow is not None and pe.max_length and not numbers):
        classes = {urlpattern.identifier_class(v) for v, _ in strings}
        overflowing = pe.overflow is not None or bool(long_)
        if strings and not overflowing and len(classes) == 1 and None not in classes:
            cls = classes.pop()
            out.append(cand(ArgElement(path, "pattern", pattern=cls), [(token(v), st) for v, st in strings],
                            f"{len(strings)} distinct {cls} identifiers"))
        elif strings and not overflowing and len(strings) <= opts.max_values:
            for v, st in strings:
                out.append(cand(ArgElement(path, "enum", value=token(v)), [(token(v), st)]))
        else:
            longest = max([pe.max_length] + [n for n, _ in long_] + [len(v) for v, _ in strings])
            members = [(token(v), st) for v, st in strings] + [(f"<long:{n}>", st) for n, st in long_]
            if pe.overflow is not None:
                members.append((f"<{pe.overflow.count} more values not kept>", pe.overflow))
            out.append(cand(ArgElement(path, "free-text", max_length=_pow2(longest)), members,
                            f"{len(members)} distinct strings with no shared structure (more than {opts.max_values}); "
                            f"longest {longest} characters", ("free-text",)))
    return out


def _resource_candidates(keys: list[tuple[str, BehaviourStats]], opts: EnvelopeOptions) -> list[_Candidate]:
    out: list[_Candidate] = []
    urls: dict[str, BehaviourStats] = {}
    for key, st in keys:
        uri = key.split(":", 2)[2]
        if "{" in uri:
            out.append(_Candidate(key, "template", [(uri, st)], ResourceElement("template", uri),
                                  "a URI template the server declared"))
        elif opts.closure == "structural" and urlpattern.parse_url(uri) is not None:
            urls[uri] = st
        else:
            out.append(_Candidate(key, "exact", [(uri, st)], ResourceElement("exact", uri)))
    derived, _ = urlpattern.derive(urls, opts.max_siblings)
    for dp in derived:
        el = ResourceElement("url", dp.pattern.text)
        out.append(_Candidate(el.entry, "url", [(u, urls[u]) for u in dp.members], el,
                              f"{len(dp.members)} URIs on {dp.pattern.host}",
                              ("url-sibling-wildcard",) if dp.wildcards else ()))
    return out


def derive_envelope(workload: Workload, evidence: ArgumentEvidence,
                    behaviours: Mapping[str, BehaviourStats] | None = None,
                    options: EnvelopeOptions | None = None) -> McpEnvelope:
    """Derive the MCP envelope from argument evidence (and the profile's stats). Pure."""
    opts = options or EnvelopeOptions()
    opts.validate()
    admits = {e: r.strip() for e, r in opts.admits}
    used: set[str] = set()
    n, m = opts.min_count, opts.min_sessions

    def passes(c: _Candidate) -> tuple[bool, dict, str | None]:
        ev = c.evidence()
        if ev["count"] >= n and ev["sessions"] >= m:
            return True, ev, None
        if c.entry in admits:
            used.add(c.entry)
            return True, ev, admits[c.entry]
        return False, ev, None

    def why(ev: dict) -> str:
        short = []
        if ev["count"] < n:
            short.append(f"count {ev['count']} < {n}")
        if ev["sessions"] < m:
            short.append(f"sessions {ev['sessions']} < {m}")
        return "; ".join(short)

    provenance: list[dict] = []
    review: list[dict] = []
    watch: set[str] = set()
    calls: dict[str, dict[str, tuple[ArgElement, ...]]] = {}
    resource_keys: list[tuple[str, BehaviourStats]] = []

    def admit(c: _Candidate, ev: dict, reason: str | None) -> None:
        p = {"entry": c.entry, "substrate": "mcp", "rule": c.rule,
             "admitted": "admit" if reason is not None else "threshold", "evidence": ev}
        if reason is not None:
            p["reason"] = reason
        if c.detail:
            p["detail"] = c.detail
        if c.flags:
            p["flags"] = list(c.flags)
        provenance.append(p)

    def refer(c: _Candidate, ev: dict) -> None:
        item = {"key": c.entry, "substrate": "mcp", "rule": c.rule, "evidence": ev,
                "threshold": {"minCount": n, "minSessions": m}, "why": why(ev)}
        if c.detail:
            item["detail"] = c.detail
        review.append(item)
        watch.add(c.entry)

    for key in sorted(evidence.calls):
        try:
            method, _ = split_key(key)
        except ValueError:
            continue
        ce = evidence.calls[key]
        stats = (behaviours or {}).get(key, ce.calls)
        if method == "resources/read":
            resource_keys.append((key, stats))
            continue
        if method not in ("tools/call", "prompts/get"):
            continue
        tool = _Candidate(key, "allowlist", [(key, stats)], detail=f"{method} of {key.split(':', 2)[2]}")
        ok, ev, reason = passes(tool)
        if not ok:
            refer(tool, ev)
            continue
        admit(tool, ev, reason)
        paths: dict[str, list[ArgElement]] = {}
        for path in sorted(ce.paths):
            for c in _arg_candidates(key, path, ce.paths[path], opts):
                ok, ev, reason = passes(c)
                if ok:
                    admit(c, ev, reason)
                    paths.setdefault(path, []).append(c.element)  # type: ignore[arg-type]
                else:
                    refer(c, ev)
        calls[key] = {p: tuple(es) for p, es in paths.items()}

    resources: list[ResourceElement] = []
    for c in _resource_candidates(resource_keys, opts):
        ok, ev, reason = passes(c)
        if ok:
            admit(c, ev, reason)
            resources.append(c.element)  # type: ignore[arg-type]
        else:
            refer(c, ev)

    unknown = sorted(set(admits) - used)
    if unknown:
        raise EnvelopeError(f"--admit {unknown[0]}: not in the review list")

    tools: dict[str, str] = {}
    fingerprints = sorted(evidence.catalogs)
    for fp in fingerprints:
        tools.update(evidence.catalogs[fp]["tools"])
    if len(fingerprints) > 1:  # more than one catalog: keep only tools whose definition never changed
        for fp in fingerprints:
            for name, h in evidence.catalogs[fp]["tools"].items():
                if tools.get(name) != h:
                    tools[name] = "changed-during-observation"
    blind = []  # what the evidence could not show: listed, not ignored
    for key in sorted(evidence.calls):
        ce = evidence.calls[key]
        if ce.cut:
            blind.append({"key": key, "finding": f"{ce.cut} call(s) had more argument values than the evidence "
                                                 f"keeps; the envelope is derived from the values kept"})
        for path in sorted(ce.paths):
            if ce.paths[path].overflow is not None:
                blind.append({"key": f"{key}#{path}", "finding": f"more distinct values than kept per path; "
                                                                 f"{ce.paths[path].overflow.count} not kept"})
    decisions = {
        "closure": {"mode": opts.closure, "rules": {
            "enumAbove": opts.max_values, "siblingsAbove": opts.max_siblings,
            "structural": list(RULES) if opts.closure == "structural" else ["enum", "secret"]}},
        "confidence": {"minCount": n, "minSessions": m,
                       "sessionRule": "union of the session samples of the values an element covers",
                       "admits": len(used)},
        "blindSpots": blind,
    }
    provenance.sort(key=lambda p: p["entry"])
    review.sort(key=lambda r: r["key"])
    return McpEnvelope(
        workload=workload, mode=opts.mode, closure=opts.closure, calls=calls,
        resources=tuple(sorted(resources, key=lambda r: (r.rule, r.value))),
        catalog={"fingerprints": fingerprints, "tools": dict(sorted(tools.items()))},
        decisions=decisions, provenance=tuple(provenance), review=tuple(review), watch=tuple(sorted(watch)))

