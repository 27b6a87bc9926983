"""File-access derivation: observed ``file:KIND:PATH`` behaviours in, allowed file entries out.

The closure and confidence decisions of :mod:`enforcer.derive`, for the file substrate:

* **Kinds are never mixed.** Each access kind (:data:`enforcer.file_patterns.KINDS`) is closed on
  its own behaviours only: a ``read`` never admits a ``write``, a ``create`` never a ``remove``.
* **Closure** (``structural``), per kind, with a named rule for every widening:

  - ``directory-tree``: a directory ``A`` (at least ``tree_min_depth`` components deep, so never
    ``/``) under which behaviours were seen in more than ``max_siblings`` distinct
    subdirectories becomes ``A/**``; the topmost such directory wins;
  - ``directory-children``: outside any tree, a directory with more than ``max_siblings``
    distinct observed paths directly inside it becomes ``dir/*``;
  - ``exact``: everything else stays the observed path.

  A widening whose pattern shares any path with a sensitive pattern
  (:mod:`enforcer.sensitive_paths`) is not made: its paths stay exact and the blocked widening
  is named in their ``detail``.
* **Sensitive paths** never take part in closure. Each is its own ``exact:sensitive`` element
  and is allowed only when it passes the confidence threshold itself.
* **Confidence**: an element is allowed with at least ``min_count`` occurrences over at least
  ``min_sessions`` distinct sessions, counted like the other substrates
  (:meth:`enforcer.derive.Element.evidence`: a pattern sums its members' counts and unions their
  sessions). Elements below go to ``review`` with their evidence, and their behaviours to
  ``watch``.

``literal`` closure keeps every path exact. Pure and deterministic: the same behaviours and
options give the same, sorted result.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Mapping

from sensor.profile import BehaviourStats

from .elements import DEFAULT_MAX_SIBLINGS, DEFAULT_MIN_COUNT, DEFAULT_MIN_SESSIONS, SESSION_RULES, Element
from .file_patterns import (CHILDREN, KINDS, TREE, FilePattern, FilePatternError, components,
                            depth, entry, is_beneath, parse_entry, parse_key)
from .sensitive_paths import SENSITIVE, SensitivePath, sensitive_match, sensitive_overlaps

SUBSTRATE = "file"
CLOSURES = ("literal", "structural")
DEFAULT_TREE_MIN_DEPTH = 1


class FileClosureError(ValueError):
    """Bad options for file derivation; one line naming what is wrong."""


@dataclass(frozen=True)
class FileClosureOptions:
    closure: str = "structural"
    min_count: int = DEFAULT_MIN_COUNT
    min_sessions: int = DEFAULT_MIN_SESSIONS
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    tree_min_depth: int = DEFAULT_TREE_MIN_DEPTH
    session_rule: str = "union"
    sensitive: tuple[SensitivePath, ...] = SENSITIVE

    def validate(self) -> None:
        if self.closure not in CLOSURES:
            raise FileClosureError(f"file closure {self.closure!r} is not one of {', '.join(CLOSURES)}")
        for name in ("min_count", "min_sessions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FileClosureError(f"{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if self.max_siblings < 1:
            raise FileClosureError(f"max-siblings must be at least 1, got {self.max_siblings}")
        if self.tree_min_depth < 1:
            raise FileClosureError(f"tree-min-depth must be at least 1 (never the root), got {self.tree_min_depth}")
        if self.session_rule not in SESSION_RULES:
            raise FileClosureError(f"unknown session rule {self.session_rule!r}")

    def rules(self) -> dict:
        """The closure decision as recorded in a policy."""
        if self.closure == "literal":
            return {"rule": "literal"}
        return {"rule": "directory-prefix", "siblingsAbove": self.max_siblings,
                "treeSubdirectoriesAbove": self.max_siblings, "treeMinDepth": self.tree_min_depth,
                "kinds": "never mixed", "sensitive": [s.pattern for s in self.sensitive]}


@dataclass(frozen=True)
class FileEntry:
    """One allowed file entry with the rule and evidence that admitted it."""

    entry: str
    kind: str
    pattern: str
    rule: str
    evidence: dict
    detail: str = ""
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {"entry": self.entry, "substrate": SUBSTRATE, "rule": self.rule, "admitted": "threshold",
             "evidence": self.evidence}
        if self.detail:
            d["detail"] = self.detail
        if self.flags:
            d["flags"] = list(self.flags)
        return d


@dataclass(frozen=True)
class FileReview:
    """An element below the threshold (or not encodable): neither allowed nor dropped."""

    key: str
    rule: str
    evidence: dict
    threshold: dict
    why: str
    detail: str = ""

    def to_dict(self) -> dict:
        d = {"key": self.key, "substrate": SUBSTRATE, "rule": self.rule, "evidence": self.evidence,
             "threshold": self.threshold, "why": self.why}
        if self.detail:
            d["detail"] = self.detail
        return d


@dataclass(frozen=True)
class FileClosureResult:
    allowed: tuple[FileEntry, ...] = ()
    review: tuple[FileReview, ...] = ()
    watch: tuple[str, ...] = ()
    decisions: dict = field(default_factory=dict)

    def entries(self) -> tuple[str, ...]:
        return tuple(e.entry for e in self.allowed)

    def to_dict(self) -> dict:
        return {"allowed": [e.to_dict() for e in self.allowed],
                "review": [r.to_dict() for r in self.review],
                "watch": list(self.watch), "decisions": self.decisions}


def allows(entries, behaviour: str) -> bool:
    """Is ``file:KIND:PATH`` admitted by one of the allowed ``entries`` (strings or
    :class:`FileEntry`) of the same kind?"""
    kind, path = parse_key(behaviour)
    for e in entries:
        text = e.entry if isinstance(e, FileEntry) else e
        k, pattern = parse_entry(text)
        if k == kind and pattern.matches(path):
            return True
    return False


# ---- closure --------------------------------------------------------------------------------


def _subdirs_beneath(paths: list[str], base: str) -> set[str]:
    """Immediate subdirectories of ``base`` that have an observed path strictly inside them."""
    n = depth(base)
    out = set()
    for p in paths:
        comps = components(p)
        if len(comps) > n + 1 and is_beneath(p, base):
            out.add(comps[n])
    return out


def _ancestors(path: str) -> list[str]:
    """Proper ancestor directories of ``path``, shallowest first (``/`` first)."""
    comps = components(path)
    return ["/" + "/".join(comps[:i]) if i else "/" for i in range(len(comps))]


def _blocked(pattern: FilePattern, opts: FileClosureOptions) -> list[SensitivePath]:
    return sensitive_overlaps(pattern, opts.sensitive)


def _kind_elements(kind: str, keys: list[str], opts: FileClosureOptions) -> list[Element]:
    paths = {parse_key(k)[1]: k for k in keys}
    out: list[Element] = []
    normal = []
    for p in sorted(paths):
        s = sensitive_match(p, opts.sensitive)
        if s is not None:
            out.append(Element(paths[p], SUBSTRATE, "exact:sensitive", [paths[p]], entries=(paths[p],),
                               detail=f"sensitive ({s.pattern}: {s.reason}); never widened"))
        else:
            normal.append(p)
    if opts.closure == "literal":
        return out + [Element(paths[p], SUBSTRATE, "literal", [paths[p]], entries=(paths[p],))
                      for p in normal]

    blocked_note: dict[str, str] = {}
    remaining = list(normal)
    # directory-tree: the topmost qualifying directory absorbs everything beneath it
    candidates = sorted({a for p in normal for a in _ancestors(p) if depth(a) >= opts.tree_min_depth},
                        key=lambda a: (depth(a), a))
    taken: list[str] = []
    for a in candidates:
        if any(is_beneath(a, t) for t in taken):
            continue
        subs = _subdirs_beneath(remaining, a)
        if len(subs) <= opts.max_siblings:
            continue
        pattern = FilePattern(a, TREE)
        blockers = _blocked(pattern, opts)
        members = [p for p in remaining if is_beneath(p, a) and p != a]
        if blockers:
            for p in members:
                blocked_note.setdefault(p, f"closure to {pattern} blocked: overlaps sensitive "
                                           f"{blockers[0].pattern} ({blockers[0].reason})")
            continue
        taken.append(a)
        out.append(Element(entry(kind, pattern), SUBSTRATE, "directory-tree", [paths[p] for p in members],
                           entries=(entry(kind, pattern),),
                           detail=f"{len(subs)} subdirectories of {a} with {kind} behaviours "
                                  f"(more than {opts.max_siblings})",
                           flags=("directory-tree",)))
        remaining = [p for p in remaining if p not in set(members)]
    # directory-children
    by_dir: dict[str, list[str]] = {}
    for p in remaining:
        by_dir.setdefault(posixpath.dirname(p), []).append(p)
    for d, members in sorted(by_dir.items()):
        if len(members) > opts.max_siblings:
            pattern = FilePattern(d, CHILDREN)
            blockers = _blocked(pattern, opts)
            if not blockers:
                out.append(Element(entry(kind, pattern), SUBSTRATE, "directory-children",
                                   [paths[p] for p in members], entries=(entry(kind, pattern),),
                                   detail=f"{len(members)} sibling paths in {d} (more than {opts.max_siblings})",
                                   flags=("directory-children",)))
                continue
            for p in members:
                blocked_note.setdefault(p, f"closure to {pattern} blocked: overlaps sensitive "
                                           f"{blockers[0].pattern} ({blockers[0].reason})")
        for p in members:
            out.append(Element(paths[p], SUBSTRATE, "exact", [paths[p]], entries=(paths[p],),
                               detail=blocked_note.get(p, "")))
    return out


def elements(stats: Mapping[str, BehaviourStats], opts: FileClosureOptions) -> tuple[list[Element], list[str]]:
    """Closure elements of every kind, and the file keys that do not parse."""
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    bad: list[str] = []
    for k in sorted(stats):
        if not k.startswith("file:"):
            continue
        try:
            kind, _ = parse_key(k)
        except FilePatternError:
            bad.append(k)
            continue
        by_kind[kind].append(k)
    out: list[Element] = []
    for kind in KINDS:
        if by_kind[kind]:
            out += _kind_elements(kind, by_kind[kind], opts)
    return out, bad


def derive_files(stats: Mapping[str, BehaviourStats], options: FileClosureOptions | None = None) -> FileClosureResult:
    """Allowed file entries, review items and watch list from the profile's file behaviours."""
    opts = options or FileClosureOptions()
    opts.validate()
    els, bad = elements(stats, opts)
    threshold = {"minCount": opts.min_count, "minSessions": opts.min_sessions}
    allowed: list[FileEntry] = []
    review: list[FileReview] = []
    watch: set[str] = set()
    for el in els:
        ev = el.evidence(stats, opts.session_rule)
        if ev["count"] >= opts.min_count and ev["sessions"] >= opts.min_sessions:
            kind, pattern = el.id.split(":", 2)[1:]
            allowed.append(FileEntry(el.id, kind, pattern, el.rule, ev, el.detail, el.flags))
            continue
        short = []
        if ev["count"] < opts.min_count:
            short.append(f"count {ev['count']} < {opts.min_count}")
        if ev["sessions"] < opts.min_sessions:
            short.append(f"sessions {ev['sessions']} < {opts.min_sessions}")
        review.append(FileReview(el.id, el.rule, ev, threshold, "; ".join(short), el.detail))
        watch.update(el.members)
    for k in bad:
        ev = Element(k, SUBSTRATE, "exact", [k]).evidence(stats, opts.session_rule)
        review.append(FileReview(k, "exact", ev, threshold, "cannot be encoded by this substrate"))
    allowed.sort(key=lambda e: e.entry)
    review.sort(key=lambda r: r.key)
    return FileClosureResult(tuple(allowed), tuple(review), tuple(sorted(watch)),
                             {"closure": opts.rules(), "confidence": threshold,
                              "sessionRule": opts.session_rule})


__all__ = ["FileClosureError", "FileClosureOptions", "FileClosureResult", "FileEntry", "FileReview",
           "allows", "derive_files"]
