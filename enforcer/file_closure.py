"""File closure: how observed ``file:KIND:PATH`` behaviours become the elements that
:mod:`enforcer.derive`'s confidence decision judges (registered for the ``file`` substrate in
:data:`enforcer.closure.BUILDERS`).

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
* **Sensitive paths** never take part in closure. Each is its own ``exact:sensitive`` element,
  so it is allowed only when it passes the confidence threshold itself.

``literal`` closure keeps every path exact. Confidence, review and watch are
:mod:`enforcer.derive`'s, as for every substrate: a pattern sums its members' counts and unions
their sessions, so per-session output directories earn their tree together. Pure and
deterministic: the same keys and options give the same, sorted elements.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterable

from .elements import DEFAULT_MAX_SIBLINGS, Element
from .file_patterns import (CHILDREN, KINDS, TREE, FilePattern, FilePatternError, components,
                            depth, entry, is_beneath, parse_key)
from .sensitive_paths import SENSITIVE, SensitivePath, sensitive_match, sensitive_overlaps

SUBSTRATE = "file"
DEFAULT_TREE_MIN_DEPTH = 1


@dataclass(frozen=True)
class FileClosureOptions:
    """The file closure's knobs; :mod:`enforcer.derive` validates them (``--max-siblings``,
    ``--file-tree-depth``) and records them in the policy's closure decision."""

    closure: str = "structural"  # literal | structural
    max_siblings: int = DEFAULT_MAX_SIBLINGS
    tree_min_depth: int = DEFAULT_TREE_MIN_DEPTH
    sensitive: tuple[SensitivePath, ...] = SENSITIVE


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


def elements(keys: Iterable[str], opts: FileClosureOptions) -> tuple[list[Element], list[str]]:
    """Closure elements of every kind, and the file keys that do not parse."""
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    bad: list[str] = []
    for k in sorted(set(keys)):
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


__all__ = ["FileClosureOptions", "elements"]
