"""MCP behaviours and their argument evidence: keys, redaction, bounds, and a mergeable summary.

Behaviour keys (substrate ``mcp``)::

    mcp:tools/list
    mcp:tools/call:<tool name>
    mcp:resources/read:<uri template, or the uri>
    mcp:prompts/get:<prompt name>

Names are kept as they are except that whitespace, control characters, ``%`` and ``#`` are
percent-encoded (``#`` separates a key from an argument path in envelope entry ids) and a name
longer than :data:`MAX_NAME` characters is cut and suffixed with ``~`` and a hash of the whole
name, so every key stays bounded and distinct names keep distinct keys.

Arguments are evidence, not keys. A call's arguments are flattened to paths (``repo_path``,
``options.depth``, ``files[]`` for list items) with one token per leaf value: the value's
canonical JSON (``"/srv/repo"``, ``5``, ``true``, ``null``), or ``<redacted>`` for a secret, or
``<long:N>`` for a string longer than :data:`MAX_VALUE` characters, which is not kept.

Secrets never reach evidence. A value is redacted when any name on its path looks like a
credential (password, secret, token, api key, authorization, cookie, ...), or when the value
itself looks like one (AWS access key ids, GitHub/Slack/OpenAI-style tokens, JWTs, PEM private
keys). URLs keep their scheme, host and path; their password and the values of query parameters
whose names look like credentials are replaced by ``<redacted>``.

:class:`ArgumentEvidence` summarises argument values per behaviour key: per path, each distinct
token's count, distinct sessions, first/last seen (a :class:`sensor.profile.BehaviourStats`), up
to :data:`VALUE_CAP` tokens per path; past the cap only the count, sessions, the longest string and
the numeric range are kept, and the path is marked as overflowing. At most :data:`MAX_PATHS`
argument paths are kept per behaviour; paths past that are counted (``paths_over``), not kept.
Sessions are counted exactly: while a session is open the summary remembers which tokens it has
seen. Summaries merge like profiles: counts and sessions add up, session samples union,
first/last take min/max, and the bounds hold after a merge.

The summary lives in the workload's profile: each node contribution that recorded MCP
behaviours carries one (``NodeContribution.arguments``), and ``Profile.arguments()`` merges them
across contributions with node-qualified session ids, as ``Profile.behaviours()`` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .profile import SESSION_SAMPLE_CAP, BehaviourStats

KIND = "mcp"
TOOLS_LIST = "mcp:tools/list"
METHODS = ("tools/list", "tools/call", "resources/read", "prompts/get")

MAX_NAME = 200
MAX_VALUE = 512  # longer strings are recorded by length only
MAX_LEAVES = 64  # argument leaves kept per call
MAX_DEPTH = 8
VALUE_CAP = 64  # distinct tokens kept per argument path
MAX_PATHS = 128  # argument paths kept per behaviour key
REDACTED = "<redacted>"

_KEY_UNSAFE = re.compile(r"[\s%#\x00-\x1f\x7f]")
_PATH_UNSAFE = re.compile(r"[.\[\]%\s\x00-\x1f\x7f#]")


def _escape(text: str, unsafe: re.Pattern) -> str:
    return unsafe.sub(lambda m: "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8")), text)


def key_name(name: str) -> str:
    """A tool, prompt or resource name as it appears in a behaviour key (bounded, escaped)."""
    text = _escape(name, _KEY_UNSAFE)
    if len(text) > MAX_NAME:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        text = text[:MAX_NAME] + "~" + digest
    return text


def tool_call_key(name: str) -> str:
    return f"mcp:tools/call:{key_name(name)}"


def prompt_get_key(name: str) -> str:
    return f"mcp:prompts/get:{key_name(name)}"


def resource_read_key(uri: str) -> str:
    return f"mcp:resources/read:{key_name(redact_url(uri))}"


def split_key(key: str) -> tuple[str, str | None]:
    """``mcp:tools/call:git_log`` → ``("tools/call", "git_log")``; ``mcp:tools/list`` → ``("tools/list", None)``."""
    kind, _, rest = key.partition(":")
    if kind != KIND or not rest:
        raise ValueError(f"not an mcp behaviour key: {key!r}")
    method, sep, name = rest.partition(":")
    if method not in METHODS or (method != "tools/list") != bool(sep and name):
        raise ValueError(f"not an mcp behaviour key: {key!r}")
    return method, (name or None)


# ---- secrets --------------------------------------------------------------------------------

_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "tokens", "apikey", "apikeys",
    "credential", "credentials", "authorization", "auth", "cookie", "cookies", "bearer", "otp", "signature",
    "privatekey", "accesskey", "secretkey", "sessionid", "jwt", "pat",
})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                           ("client", "secret"), ("session", "id"), ("session", "key"), ("auth", "code")})
_WORD_SPLIT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_SECRET_VALUES = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),  # OpenAI/Anthropic-style secret keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),  # JWT
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}"),
)


def secret_name(name: str) -> bool:
    """Does an argument or parameter name look like it holds a credential?"""
    words = [w.lower() for w in _WORD_SPLIT.findall(name)]
    joined = "".join(words)
    if joined in _SECRET_WORDS or any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def secret_value(text: str) -> bool:
    return any(p.search(text) for p in _SECRET_VALUES)


def redact_url(text: str) -> str:
    """A URL with its password and credential-named query values replaced; other text unchanged."""
    if "://" not in text or len(text) > 8192:
        return text
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return text
    if not parts.scheme or host is None:
        return text
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{REDACTED}@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(secret_name(k) or secret_value(v) for k, v in pairs):
            query = urlencode([(k, REDACTED if secret_name(k) or secret_value(v) else v) for k, v in pairs],
                              safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ---- argument flattening ----------------------------------------------------------------------


def path_part(name: str) -> str:
    return _escape(name, _PATH_UNSAFE)


def token(value: Any) -> str:
    """The evidence token of one JSON scalar (already known not to be a secret)."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            return f"<long:{len(value)}>"
        value = redact_url(value)
    elif isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def decode_token(tok: str) -> tuple[str, Any]:
    """``("value", v)``, ``("redacted", None)`` or ``("long", length)``."""
    if tok == REDACTED:
        return "redacted", None
    if tok.startswith("<long:"):
        return "long", int(tok[6:-1])
    return "value", json.loads(tok)


def flatten(arguments: Any) -> tuple[dict[str, list[str]], bool]:
    """A call's arguments as ``{path: [tokens]}`` (list items share one path) and whether the
    evidence was cut (more than :data:`MAX_LEAVES` leaves or deeper than :data:`MAX_DEPTH`)."""
    out: dict[str, list[str]] = {}
    cut = False
    leaves = 0
    if not isinstance(arguments, dict):
        return out, arguments is not None
    stack: list[tuple[str, Any, bool, int]] = [(path_part(k), v, secret_name(k), 1)
                                               for k, v in reversed(list(arguments.items()))]
    while stack:
        path, v, secret, depth = stack.pop()
        if leaves >= MAX_LEAVES:
            cut = True
            break
        if isinstance(v, dict) and v and not secret:
            if depth >= MAX_DEPTH:
                cut = True
                continue
            stack.extend((f"{path}.{path_part(k)}", x, secret_name(k), depth + 1) for k, x in reversed(list(v.items())))
            continue
        if isinstance(v, list) and v and not secret:
            if depth >= MAX_DEPTH:
                cut = True
                continue
            stack.extend((f"{path}[]", x, False, depth + 1) for x in reversed(v))
            continue
        if secret or (isinstance(v, str) and secret_value(v)):
            tok = REDACTED
        elif isinstance(v, dict):
            tok = "{}"
        elif isinstance(v, list):
            tok = "[]"
        else:
            tok = token(v)
        out.setdefault(path, []).append(tok)
        leaves += 1
    return out, cut


# ---- the summary ------------------------------------------------------------------------------


def _observe(stats: BehaviourStats, session: str, ts: float, new_session: bool) -> None:
    stats.count += 1
    stats.first_seen = min(stats.first_seen, ts)
    stats.last_seen = max(stats.last_seen, ts)
    if new_session:
        stats.sessions += 1
        if len(stats.session_ids) < SESSION_SAMPLE_CAP:
            stats.session_ids.append(sys.intern(session))


def _relabelled(st: BehaviourStats | None, prefix: str) -> BehaviourStats | None:
    if st is None:
        return None
    return BehaviourStats(st.count, st.sessions, st.first_seen, st.last_seen, st.session_sum, st.session_sumsq,
                          [f"{prefix}{i}" for i in st.session_ids])


def _pack_stats(st: BehaviourStats) -> list:
    """Packed stats with the session sample sorted: the same evidence packs to the same bytes
    whether it was gathered in one run or merged from several."""
    v = st.pack()
    v[6] = sorted(v[6])
    return v


@dataclass
class PathEvidence:
    """The values seen at one argument path of one behaviour."""

    values: dict[str, BehaviourStats] = field(default_factory=dict)
    overflow: BehaviourStats | None = None  # values past VALUE_CAP: counted, not kept
    calls: BehaviourStats | None = None  # calls in which the path was present
    max_length: int = 0  # longest string seen (kept ones and overflow alike)
    num_min: float | None = None
    num_max: float | None = None

    def _note(self, tok: str) -> None:
        kind, v = decode_token(tok)
        if kind == "long":
            self.max_length = max(self.max_length, v)
        elif kind == "value":
            if isinstance(v, str):
                self.max_length = max(self.max_length, len(v))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self.num_min = v if self.num_min is None else min(self.num_min, v)
                self.num_max = v if self.num_max is None else max(self.num_max, v)

    def merged(self, other: "PathEvidence") -> "PathEvidence":
        values = {k: v for k, v in self.values.items()}
        for k, v in other.values.items():
            values[k] = v if k not in values else values[k].merged(v)
        kept = dict(sorted(values.items())[:VALUE_CAP]) if len(values) > VALUE_CAP else values
        spill = [v for k, v in values.items() if k not in kept]
        overflow = self.overflow
        for extra in ([other.overflow] if other.overflow else []) + spill:
            overflow = extra if overflow is None else overflow.merged(extra)
        calls = self.calls if other.calls is None else other.calls if self.calls is None else self.calls.merged(other.calls)
        mins = [x for x in (self.num_min, other.num_min) if x is not None]
        maxs = [x for x in (self.num_max, other.num_max) if x is not None]
        return PathEvidence(kept, overflow, calls, max(self.max_length, other.max_length),
                            min(mins) if mins else None, max(maxs) if maxs else None)

    def relabelled(self, prefix: str) -> "PathEvidence":
        return PathEvidence({k: _relabelled(v, prefix) for k, v in self.values.items()},
                            _relabelled(self.overflow, prefix), _relabelled(self.calls, prefix),
                            self.max_length, self.num_min, self.num_max)

    def pack(self) -> dict:
        return {"values": {k: _pack_stats(v) for k, v in sorted(self.values.items())},
                "overflow": _pack_stats(self.overflow) if self.overflow else None,
                "calls": _pack_stats(self.calls) if self.calls else None,
                "maxLength": self.max_length, "min": self.num_min, "max": self.num_max}

    @classmethod
    def unpack(cls, d: dict) -> "PathEvidence":
        return cls({str(k): BehaviourStats.unpack(v) for k, v in d["values"].items()},
                   BehaviourStats.unpack(d["overflow"]) if d.get("overflow") else None,
                   BehaviourStats.unpack(d["calls"]) if d.get("calls") else None,
                   int(d.get("maxLength", 0)), d.get("min"), d.get("max"))


@dataclass
class CallEvidence:
    """Everything observed about one behaviour key: its calls and their argument paths."""

    calls: BehaviourStats
    paths: dict[str, PathEvidence] = field(default_factory=dict)
    cut: int = 0  # calls whose argument evidence was cut at MAX_LEAVES / MAX_DEPTH
    paths_over: int = 0  # argument paths past MAX_PATHS: seen, not kept

    def merged(self, other: "CallEvidence") -> "CallEvidence":
        paths = dict(self.paths)
        for p, e in other.paths.items():
            paths[p] = e if p not in paths else paths[p].merged(e)
        over = self.paths_over + other.paths_over
        if len(paths) > MAX_PATHS:
            kept = sorted(paths)[:MAX_PATHS]
            over += len(paths) - MAX_PATHS
            paths = {p: paths[p] for p in kept}
        return CallEvidence(self.calls.merged(other.calls), paths, self.cut + other.cut, over)

    def relabelled(self, prefix: str) -> "CallEvidence":
        return CallEvidence(_relabelled(self.calls, prefix), {p: e.relabelled(prefix) for p, e in self.paths.items()},
                            self.cut, self.paths_over)

    def pack(self) -> dict:
        d = {"calls": _pack_stats(self.calls), "paths": {p: e.pack() for p, e in sorted(self.paths.items())},
             "cut": self.cut}
        if self.paths_over:
            d["pathsOver"] = self.paths_over
        return d

    @classmethod
    def unpack(cls, d: dict) -> "CallEvidence":
        return cls(BehaviourStats.unpack(d["calls"]),
                   {str(p): PathEvidence.unpack(e) for p, e in d["paths"].items()}, int(d.get("cut", 0)),
                   int(d.get("pathsOver", 0)))


@dataclass
class ArgumentEvidence:
    """Per behaviour key, the calls and argument values seen; plus the tool catalogs seen."""

    calls: dict[str, CallEvidence] = field(default_factory=dict)
    # tool catalog fingerprint -> {"tools": {name: hash}, "firstSeen": ts, "lastSeen": ts}
    catalogs: dict[str, dict] = field(default_factory=dict)
    _seen: dict[str, set] = field(default_factory=dict, repr=False, compare=False)  # open session -> seen

    def add(self, session: str, key: str, arguments: dict[str, list[str]] | None, ts: float,
            cut: bool = False) -> None:
        seen = self._seen.setdefault(session, set())
        ev = self.calls.get(key)
        if ev is None:
            ev = self.calls[key] = CallEvidence(BehaviourStats(0, 0, ts, ts))
        _observe(ev.calls, session, ts, (key,) not in seen)
        seen.add((key,))
        ev.cut += 1 if cut else 0
        for path, toks in sorted((arguments or {}).items()):
            pe = ev.paths.get(path)
            if pe is None and len(ev.paths) >= MAX_PATHS:
                if (key, path, "over") not in seen:
                    ev.paths_over += 1
                    seen.add((key, path, "over"))
                continue
            if pe is None:
                pe = ev.paths[path] = PathEvidence()
            if pe.calls is None:
                pe.calls = BehaviourStats(0, 0, ts, ts)
            _observe(pe.calls, session, ts, (key, path) not in seen)
            seen.add((key, path))
            for tok in toks:
                pe._note(tok)
                stats = pe.values.get(tok)
                if stats is None and len(pe.values) >= VALUE_CAP:
                    if pe.overflow is None:
                        pe.overflow = BehaviourStats(0, 0, ts, ts)
                    _observe(pe.overflow, session, ts, (key, path, None) not in seen)
                    seen.add((key, path, None))
                    continue
                if stats is None:
                    stats = pe.values[tok] = BehaviourStats(0, 0, ts, ts)
                _observe(stats, session, ts, (key, path, tok) not in seen)
                seen.add((key, path, tok))

    def add_catalog(self, fingerprint: str, tools: dict[str, str], ts: float) -> None:
        c = self.catalogs.get(fingerprint)
        if c is None:
            self.catalogs[fingerprint] = {"tools": dict(sorted(tools.items())), "firstSeen": ts, "lastSeen": ts}
        else:
            c["firstSeen"] = min(c["firstSeen"], ts)
            c["lastSeen"] = max(c["lastSeen"], ts)

    def close_session(self, session: str) -> None:
        self._seen.pop(session, None)

    def take(self) -> "ArgumentEvidence":
        """Everything added since the last ``take``, as evidence of its own; this summary starts
        empty but keeps what its open sessions have seen, so a session is never counted twice for
        one value across takes (merging the takes gives the exact summary)."""
        out = ArgumentEvidence(self.calls, self.catalogs)
        self.calls, self.catalogs = {}, {}
        return out

    def merged(self, other: "ArgumentEvidence") -> "ArgumentEvidence":
        calls = dict(self.calls)
        for k, e in other.calls.items():
            calls[k] = e if k not in calls else calls[k].merged(e)
        cats = {k: dict(v) for k, v in self.catalogs.items()}
        for fp, c in other.catalogs.items():
            if fp in cats:
                cats[fp] = {"tools": cats[fp]["tools"], "firstSeen": min(cats[fp]["firstSeen"], c["firstSeen"]),
                            "lastSeen": max(cats[fp]["lastSeen"], c["lastSeen"])}
            else:
                cats[fp] = dict(c)
        return ArgumentEvidence(calls, cats)

    def relabelled(self, prefix: str) -> "ArgumentEvidence":
        """A copy whose session ids carry ``prefix`` (a merged view's ``<node>/``)."""
        return ArgumentEvidence({k: e.relabelled(prefix) for k, e in self.calls.items()},
                                {k: dict(v) for k, v in self.catalogs.items()})

    def only(self, keys) -> "ArgumentEvidence":
        """The evidence of the behaviour keys in ``keys`` (and every catalog)."""
        return ArgumentEvidence({k: e for k, e in self.calls.items() if k in keys}, self.catalogs)

    def __bool__(self) -> bool:
        return bool(self.calls or self.catalogs)

    def pack(self) -> dict:
        return {"calls": {k: e.pack() for k, e in sorted(self.calls.items())},
                "catalogs": {k: self.catalogs[k] for k in sorted(self.catalogs)}}

    @classmethod
    def unpack(cls, d: dict) -> "ArgumentEvidence":
        if not isinstance(d, dict) or "calls" not in d:
            raise ValueError("not MCP argument evidence (no calls field)")
        return cls({str(k): CallEvidence.unpack(e) for k, e in d["calls"].items()},
                   {str(k): dict(v) for k, v in (d.get("catalogs") or {}).items()})

    def keys(self) -> Iterable[str]:
        return sorted(self.calls)


# ---- the tool catalog -----------------------------------------------------------------------

# What a tool definition's hash covers: everything the model reads or the client's approval
# logic relies on. A change to any of them (a rug pull, a poisoned description, a widened schema,
# a read-only hint turned false) changes the hash.
TOOL_HASH_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


def _canonical(v: Any) -> bytes:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tool_hash(tool: dict) -> str:
    """``sha256:<hex>`` over the canonical JSON of a tool's :data:`TOOL_HASH_FIELDS`."""
    return "sha256:" + hashlib.sha256(_canonical({k: tool[k] for k in TOOL_HASH_FIELDS if k in tool})).hexdigest()


def catalog_fingerprint(tools: dict[str, str]) -> str:
    """The tool catalog fingerprint: ``sha256:<hex>`` over the sorted ``{name: tool hash}``."""
    return "sha256:" + hashlib.sha256(_canonical(dict(sorted(tools.items())))).hexdigest()
