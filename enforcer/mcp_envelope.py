"""The MCP envelope: the ``spec.allow.mcp`` section of a policy, and the matcher that judges a
live call against it (pure).

Layout (inside ``spec.allow``)::

    mcp:
      methods:   [tools/list]                       # other methods the workload may use
      tools:     [{name: git_log, arguments: [ELEMENT, ...]}, ...]
      prompts:   [{name: summarise, arguments: [ELEMENT, ...]}, ...]
      resources: [{rule: exact|template|url, value: ...}, ...]
      catalog:   {git_log: sha256:..., ...}         # each tool's definition hash, as recorded

``name`` is the name as it appears in behaviour keys (:func:`sensor.mcp_evidence.key_name`).
An argument ELEMENT is one allowed shape for the values at one argument path (``repo_path``,
``options.depth``, ``files[]``), named by its rule:

* ``enum``: one value (``value``);
* ``path-prefix``: an absolute path and, with ``below``, everything under it; values are
  normalised before matching, so ``..`` cannot climb out;
* ``range``: numbers from ``min`` to ``max`` (``integer``: whole numbers only);
* ``url``: scheme, host and path template (:mod:`enforcer.urlpattern`); never another host;
* ``pattern``: an identifier class: ``hash`` (git revisions), ``uuid``, ``number``, ``opaque``;
* ``free-text``: any string up to ``maxLength`` characters;
* ``secret``: a credential-like argument, whose values are never recorded: any value.

An argument path with no element is outside the envelope; so is a value no element of its path
matches. A call's tool (or prompt) must be listed; a ``resources/read`` must match a resource
element.

Entry identifiers (provenance, review, watch, ``explain``, ``diff``, ``--admit``,
``exception add --allow``)::

    mcp:tools/list
    mcp:tools/call:NAME            mcp:prompts/get:NAME
    mcp:resources/read:URI         (an exact URI or a URI template the server declared)
    mcp:resources/read#url:PATTERN
    mcp:tools/call:NAME#PATH:RULE:SPEC     (an argument element, e.g. #max_count:range:1..5 integer)

:class:`McpJudge` judges calls against a policy's MCP section, its review list (a refused call
seen too rarely says so) and active exceptions: an exception on ``mcp:tools/call:NAME`` admits
the whole call, one on ``mcp:tools/call:NAME#PATH`` any value at that argument path. It returns a
:class:`Verdict` with the reason and the entry that decided, and raises :class:`EvaluationError`
when a call cannot be evaluated (the gateway then fails closed in enforce mode).
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sensor.mcp_evidence import (
    REDACTED,
    path_part,
    secret_name,
    secret_value,
    split_key,
    token,
    tool_call_key,
)

from . import urlpattern

MATCH_MAX_LEAVES = 4096  # a call with more argument values than this cannot be evaluated
RULES = ("enum", "path-prefix", "range", "url", "pattern", "free-text", "secret")
METHODS = ("tools/list",)  # methods allowed as such (calls, prompts and reads have their own lists)
CALL_METHODS = {"tools": "tools/call", "prompts": "prompts/get"}
RESOURCE_RULES = ("exact", "template", "url")
_FIELDS = ("methods", "tools", "prompts", "resources", "catalog")
_SHOWN = 8


class EnvelopeError(ValueError):
    """A malformed MCP section or entry; one line naming the field."""


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


# ---- the allow section ----------------------------------------------------------------------


def _list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise EnvelopeError(f"{where}: expected a list")
    return v


@dataclass
class McpAllow:
    """``spec.allow.mcp``: what the workload may do through the MCP gateway."""

    methods: tuple[str, ...] = ()
    calls: dict[str, dict[str, tuple[ArgElement, ...]]] = field(default_factory=dict)  # key -> path -> elements
    resources: tuple[ResourceElement, ...] = ()
    catalog: dict[str, str] = field(default_factory=dict)  # tool name -> definition hash

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise EnvelopeError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        self.methods = tuple(sorted(set(self.methods)))
        self.calls = {k: {p: tuple(self.calls[k][p]) for p in sorted(self.calls[k])} for k in sorted(self.calls)}
        self.resources = tuple(sorted(set(self.resources), key=lambda r: (r.rule, r.value)))
        self.catalog = dict(sorted(self.catalog.items()))

    # ---- queries -------------------------------------------------------------------------

    def entries(self) -> list[str]:
        """Every allowed entry identifier, in document order."""
        out = [f"mcp:{m}" for m in self.methods]
        for key in self.calls:
            out.append(key)
            out += [e.entry(key) for p in self.calls[key] for e in self.calls[key][p]]
        return out + [r.entry for r in self.resources]

    def allows(self, key: str) -> bool:
        """Is ``mcp:`` behaviour key (or entry id) ``key`` allowed? Arguments are not judged here
        (see :class:`McpJudge`)."""
        if "#" in key:
            return key in set(self.entries())
        try:
            method, name = split_key(key)
        except ValueError:
            return False
        if method in METHODS:
            return method in self.methods
        if method == "resources/read":
            uri = name or ""
            return any(r.matches(uri, uri if "{" in uri else None) for r in self.resources)
        return key in self.calls

    def tool_hash(self, name: str) -> str | None:
        return self.catalog.get(name)

    @classmethod
    def of_entries(cls, entries: Iterable[str]) -> "McpAllow":
        """A section allowing key-level entries (methods, tools and prompts with no arguments
        yet, resources); argument entries are not accepted here."""
        methods: set[str] = set()
        calls: dict[str, dict] = {}
        resources: set[ResourceElement] = set()
        for entry in entries:
            if entry.startswith("mcp:resources/read#url:"):
                resources.add(ResourceElement("url", entry.split("#url:", 1)[1]))
            elif "#" in entry:
                raise EnvelopeError(f"{entry!r} is an argument entry, not a key-level one")
            elif entry.startswith("mcp:resources/read:"):
                value = entry.split(":", 2)[2]
                resources.add(ResourceElement("template" if "{" in value else "exact", value))
            elif entry.startswith(("mcp:tools/call:", "mcp:prompts/get:")):
                calls.setdefault(entry, {})
            else:
                methods.add(entry.split(":", 1)[1])
        return cls(tuple(methods), calls, tuple(resources))

    def elements_at(self, key: str, path: str) -> tuple[ArgElement, ...]:
        return (self.calls.get(key) or {}).get(path, ())

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        groups: dict[str, list] = {"tools": [], "prompts": []}
        for key, paths in self.calls.items():
            method, name = split_key(key)
            group = "tools" if method == "tools/call" else "prompts"
            groups[group].append({"name": name, "arguments": [e.to_dict() for p in paths for e in paths[p]]})
        return {"methods": list(self.methods), "tools": groups["tools"], "prompts": groups["prompts"],
                "resources": [{"rule": r.rule, "value": r.value} for r in self.resources],
                "catalog": dict(self.catalog)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec.allow.mcp") -> "McpAllow":
        if not isinstance(d, dict):
            raise EnvelopeError(f"{where}: expected a mapping")
        for k in d:
            if k not in _FIELDS:
                raise EnvelopeError(f"{where}.{k}: unknown field (expected one of {', '.join(_FIELDS)})")
        methods = _list(d.get("methods"), f"{where}.methods")
        for i, m in enumerate(methods):
            if m not in METHODS:
                raise EnvelopeError(f"{where}.methods[{i}]: {m!r} is not one of {', '.join(METHODS)}")
        calls: dict[str, dict[str, tuple[ArgElement, ...]]] = {}
        for group, method in CALL_METHODS.items():
            for i, c in enumerate(_list(d.get(group), f"{where}.{group}")):
                at = f"{where}.{group}[{i}]"
                if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
                    raise EnvelopeError(f"{at}.name: missing or not a non-empty string")
                key = f"mcp:{method}:{c['name']}"
                try:
                    split_key(key)
                except ValueError as e:
                    raise EnvelopeError(f"{at}.name: {e}") from None
                if key in calls:
                    raise EnvelopeError(f"{at}.name: {c['name']!r} is listed twice")
                paths: dict[str, list[ArgElement]] = {}
                for j, a in enumerate(_list(c.get("arguments"), f"{at}.arguments")):
                    e = ArgElement.from_dict(a, f"{at}.arguments[{j}]")
                    paths.setdefault(e.path, []).append(e)
                calls[key] = {p: tuple(es) for p, es in paths.items()}
        resources = []
        for i, r in enumerate(_list(d.get("resources"), f"{where}.resources")):
            if not isinstance(r, dict) or r.get("rule") not in RESOURCE_RULES or not isinstance(r.get("value"), str) \
                    or not r["value"]:
                raise EnvelopeError(f"{where}.resources[{i}]: needs rule exact|template|url and a value")
            if r["rule"] == "url":
                try:
                    urlpattern.UrlPattern.parse(r["value"])
                except ValueError as e:
                    raise EnvelopeError(f"{where}.resources[{i}].value: {e}") from None
            resources.append(ResourceElement(r["rule"], r["value"]))
        catalog = d.get("catalog") or {}
        if not isinstance(catalog, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in catalog.items()):
            raise EnvelopeError(f"{where}.catalog: expected a mapping of tool name to definition hash")
        return cls(tuple(methods), calls, tuple(resources), dict(catalog))


def parse_entry(entry: str) -> str:
    """Check an ``mcp:`` entry identifier (see the module docstring); returns it."""
    key, sep, rest = entry.partition("#")
    if key == "mcp:resources/read" and sep:
        if not rest.startswith("url:"):
            raise EnvelopeError(f"bad mcp entry {entry!r}: a resource pattern is mcp:resources/read#url:PATTERN")
        try:
            urlpattern.UrlPattern.parse(rest[4:])
        except ValueError as e:
            raise EnvelopeError(f"bad mcp entry {entry!r}: {e}") from None
        return entry
    try:
        method, _ = split_key(key)
    except ValueError as e:
        raise EnvelopeError(f"bad mcp entry {entry!r}: {e}") from None
    if sep:
        if method not in CALL_METHODS.values():
            raise EnvelopeError(f"bad mcp entry {entry!r}: only tools/call and prompts/get have arguments")
        if not rest or rest.startswith(":"):
            raise EnvelopeError(f"bad mcp entry {entry!r}: an argument path is missing after '#'")
    return entry


def owner_of(entry: str) -> str:
    """The behaviour key an entry belongs to: ``KEY#PATH:...`` → ``KEY``."""
    return entry.partition("#")[0]


# ---- the judge ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    entry: str  # the allowed entry that admitted the call, or the one that refused it
    watch: bool = False  # the refusing entry is on the watch list (seen, but below threshold)
    exception: str | None = None  # "exception:<id>" when an exception admitted (part of) the call


class McpJudge:
    """Judges MCP requests against a policy's MCP section, review and watch lists, and the
    active exceptions (``{allowed key: "exception:<id>"}``, see :func:`enforcer.exceptions.allowed_keys`)."""

    def __init__(self, allow: McpAllow, review: Iterable[dict] = (), watch: Iterable[str] = (),
                 exceptions: Mapping[str, str] | None = None):
        self.allow = allow
        self._review = {r["key"]: r for r in review if str(r.get("key", "")).startswith("mcp:")}
        self._watch = frozenset(w for w in watch if w.startswith("mcp:"))
        self.exceptions: dict[str, str] = {}
        self.set_exceptions(exceptions or {})

    @classmethod
    def of(cls, policy, exceptions: Mapping[str, str] | None = None) -> "McpJudge":
        """The judge for a :class:`enforcer.policy.Policy` (an empty section when it has none)."""
        return cls(policy.mcp or McpAllow(), policy.review, policy.watch, exceptions)

    def set_exceptions(self, exceptions: Mapping[str, str]) -> None:
        self.exceptions = {k: v for k, v in exceptions.items() if k.startswith("mcp:")}

    def allows_tool(self, name: str) -> bool:
        key = tool_call_key(name)
        return key in self.allow.calls or key in self.exceptions

    def tool_hash(self, name: str) -> str | None:
        return self.allow.tool_hash(name)

    def _refused(self, key: str, what: str) -> Verdict:
        item = self._review.get(key)
        if item is not None:
            return Verdict(False, f"{key} is under review ({item.get('why', 'below threshold')}), not in the "
                                  f"{what}", key, True)
        return Verdict(False, f"{key} is not in the {what}", key)

    def judge_method(self, method: str) -> Verdict:
        key = f"mcp:{method}"
        if method in self.allow.methods:
            return Verdict(True, "inside the envelope", key)
        if key in self.exceptions:
            return Verdict(True, f"allowed by {self.exceptions[key]}", key, exception=self.exceptions[key])
        return self._refused(key, "allowlist")

    def judge_call(self, key: str, arguments: Any) -> Verdict:
        """Judge a ``tools/call`` or ``prompts/get`` (by behaviour key) and its arguments."""
        exc = self.exceptions.get(key)
        if exc is not None:
            return Verdict(True, f"allowed by {exc}", key, exception=exc)
        allowed = self.allow.calls.get(key)
        if allowed is None:
            return self._refused(key, "allowlist")
        used: str | None = None
        for path, v, secret in leaves(arguments):
            elements = allowed.get(path)
            at = f"{key}#{path}"
            if elements and any(e.matches(v, secret) for e in elements):
                continue
            if at in self.exceptions:
                used = used or self.exceptions[at]
                continue
            watched = [w for w in self._watch if w.startswith(at + ":")]
            if not elements:
                what = "was seen too rarely to be admitted (under review)" if watched else "was never observed"
                return Verdict(False, f"argument {path!r} of {key} {what}", at, bool(watched))
            allowed_text = ", ".join(f"{e.rule} {e.spec}" for e in elements[:_SHOWN])
            note = f"; {len(watched)} shape(s) of this argument seen too rarely are under review" if watched else ""
            return Verdict(False, f"argument {path!r} of {key} = {shown(v, secret)} is outside the envelope "
                                  f"(allowed: {allowed_text}{note})", at, bool(watched))
        if used is not None:
            return Verdict(True, f"inside the envelope with {used}", key, exception=used)
        return Verdict(True, "inside the envelope", key)

    def judge_resource(self, uri: str, template: str | None, key: str) -> Verdict:
        for r in self.allow.resources:
            if r.matches(uri, template):
                return Verdict(True, "inside the envelope", r.entry)
        if key in self.exceptions:
            return Verdict(True, f"allowed by {self.exceptions[key]}", key, exception=self.exceptions[key])
        return self._refused(key, "allowlist")


__all__ = ["ArgElement", "EnvelopeError", "EvaluationError", "McpAllow", "McpJudge", "ResourceElement", "Verdict",
           "leaves", "owner_of", "parse_entry", "shown"]
