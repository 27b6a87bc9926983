"""File behaviours and path patterns: the vocabulary of the file substrate.

A file behaviour key is ``file:KIND:PATH`` with an absolute, normalised ``PATH`` (no ``.`` or
``..`` components, no trailing ``/``, no ``*``), for example ``file:read:/etc/ssl/certs/ca.pem``
or ``file:write:/tmp/agent-1/out.json``. An allowed file entry is ``file:KIND:PATTERN`` where the
pattern is one of:

* ``/a/b/c``: exactly that path;
* ``/a/b/*``: any path directly inside ``/a/b`` (one component, not recursive);
* ``/a/b/**``: any path beneath ``/a/b``, at any depth.

``KIND`` is one access kind of :data:`KINDS`. Kinds are never mixed: a ``read`` entry admits
only ``read`` behaviours. The kinds follow what the kernel can tell apart when a file is opened
or a directory entry is made or removed; the Landlock right(s) each one needs are in
:mod:`enforcer.landlock_rules`.

Sensitive-path patterns (:mod:`enforcer.sensitive_paths`) use the same syntax, and also allow
``*`` inside a component (``ssh_host_*_key``) and as a whole component anywhere
(``/home/*/.ssh/**``); ``P/**`` covers ``P`` itself and everything beneath it. Everything here is
pure string work: nothing touches the filesystem.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

#: Access kinds of a file behaviour, with what each one means. A kind marked "parent" is an
#: operation on a directory entry: the kernel checks it on the directory that holds ``PATH``.
KINDS: dict[str, str] = {
    "read": "open an existing file for reading",
    "list": "open a directory to list it",
    "write": "open an existing file for writing",
    "truncate": "truncate a file (O_TRUNC, truncate(2), creat(2))",
    "ioctl": "ioctl(2) on an opened character or block device",
    "create": "create a regular file (parent)",
    "remove": "unlink a file, or rename it away (parent)",
    "mkdir": "create a directory (parent)",
    "rmdir": "remove a directory (parent)",
    "symlink": "create a symbolic link (parent)",
    "mkfifo": "create a named pipe (parent)",
    "mksock": "create a UNIX socket file (parent)",
    "mknod": "create a character or block device node (parent)",
}
#: Kinds checked on the directory that holds the path, not on the path itself.
PARENT_KINDS = frozenset(k for k, v in KINDS.items() if v.endswith("(parent)"))

EXACT, CHILDREN, TREE = "exact", "children", "tree"


class FilePatternError(ValueError):
    """A file behaviour key, entry or pattern that does not parse; the message names it."""


@dataclass(frozen=True, order=True)
class FilePattern:
    """``base`` plus a ``scope``: exactly ``base``, its direct children, or its whole tree."""

    base: str
    scope: str = EXACT  # exact | children | tree

    @classmethod
    def parse(cls, text: str) -> "FilePattern":
        if not isinstance(text, str) or not text.startswith("/"):
            raise FilePatternError(f"{text!r} is not an absolute path or pattern")
        if text.endswith("/**"):
            base, scope = text[:-3] or "/", TREE
        elif text.endswith("/*"):
            base, scope = text[:-2] or "/", CHILDREN
        else:
            base, scope = text, EXACT
        check_path(base, what=text)
        return cls(base, scope)

    def __str__(self) -> str:
        if self.scope == EXACT:
            return self.base
        suffix = "/*" if self.scope == CHILDREN else "/**"
        return (self.base.rstrip("/") or "") + suffix

    def matches(self, path: str) -> bool:
        """Does this pattern admit ``path`` (a normalised absolute path)?"""
        if self.scope == EXACT:
            return path == self.base
        if self.scope == CHILDREN:
            return path != "/" and posixpath.dirname(path) == self.base
        return is_beneath(path, self.base) and path != self.base

    @property
    def depth(self) -> int:
        return depth(self.base)


def check_path(path: str, what: str | None = None) -> str:
    """Validate a normalised absolute path; returns it."""
    label = what if what is not None else path
    if not isinstance(path, str) or not path.startswith("/"):
        raise FilePatternError(f"{label!r} is not an absolute path")
    if "\0" in path or "\n" in path or "\t" in path:
        raise FilePatternError(f"{label!r}: NUL, newline and tab are not allowed in paths")
    if "*" in path:
        raise FilePatternError(f"{label!r}: '*' is only allowed as a last component /* or /**")
    if path != "/" and (path.endswith("/") or "//" in path or posixpath.normpath(path) != path):
        raise FilePatternError(f"{label!r} is not a normalised path (no '.', '..', '//' or trailing '/')")
    return path


def _split(text: str, what: str) -> tuple[str, str]:
    """``file:KIND:REST`` → ``(kind, rest)``; ``what`` names the form in errors."""
    prefix, _, rest = text.partition(":")
    kind, sep, tail = rest.partition(":")
    if prefix != "file" or not sep:
        raise FilePatternError(f"{text!r} is not a {what}")
    if kind not in KINDS:
        raise FilePatternError(f"{text!r}: unknown access kind {kind!r} (one of {', '.join(KINDS)})")
    return kind, tail


def parse_key(key: str) -> tuple[str, str]:
    """``file:KIND:PATH`` → ``(kind, path)``."""
    kind, path = _split(key, "file behaviour key (want file:KIND:PATH)")
    check_path(path, what=key)
    return kind, path


def parse_entry(entry: str) -> tuple[str, FilePattern]:
    """``file:KIND:PATTERN`` → ``(kind, FilePattern)``."""
    kind, pattern = _split(entry, "file entry (want file:KIND:PATTERN)")
    try:
        return kind, FilePattern.parse(pattern)
    except FilePatternError as e:
        raise FilePatternError(f"{entry!r}: {e}") from None


def key(kind: str, path: str) -> str:
    return f"file:{kind}:{path}"


def entry(kind: str, pattern: FilePattern) -> str:
    return f"file:{kind}:{pattern}"


def components(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def depth(path: str) -> int:
    return len(components(path))


def is_beneath(path: str, base: str) -> bool:
    """``path`` is ``base`` or inside it."""
    if base == "/":
        return True
    return path == base or path.startswith(base + "/")


# ---- globs over whole paths (sensitive-path patterns) ---------------------------------------


def _glob_parts(pattern: str) -> tuple[list[str], bool]:
    """Components of a glob and whether it ends in ``/**`` (which also covers the base)."""
    if pattern.endswith("/**"):
        return components(pattern[:-3]), True
    return components(pattern), False


def glob_matches(pattern: str, path: str) -> bool:
    """Does glob ``pattern`` (``*`` within one component, ``/**`` at the end) cover ``path``?"""
    parts, tree = _glob_parts(pattern)
    comps = components(path)
    if len(comps) < len(parts) or (not tree and len(comps) != len(parts)):
        return False
    return all(fnmatch.fnmatchcase(c, p) for c, p in zip(comps, parts))


def _component_compatible(a: str, b: str) -> bool:
    """Can one path component match both globs ``a`` and ``b``? Exact when either has no
    wildcard; when both have one, it is decided on the literal text around the wildcards
    (prefix and suffix), which over-approximates overlap (never misses one)."""
    if "*" not in a and "*" not in b:
        return a == b
    if "*" not in a:
        return fnmatch.fnmatchcase(a, b)
    if "*" not in b:
        return fnmatch.fnmatchcase(b, a)
    pa, sa = a.split("*", 1)[0], a.rsplit("*", 1)[1]
    pb, sb = b.split("*", 1)[0], b.rsplit("*", 1)[1]
    return (pa.startswith(pb) or pb.startswith(pa)) and (sa.endswith(sb) or sb.endswith(sa))


def glob_intersects(a: str, b: str) -> bool:
    """Is there a path both globs cover? (``P/**`` covers ``P`` itself.)"""
    pa, ta = _glob_parts(a)
    pb, tb = _glob_parts(b)
    n = min(len(pa), len(pb))
    if not all(_component_compatible(x, y) for x, y in zip(pa[:n], pb[:n])):
        return False
    if len(pa) == len(pb):
        return True
    shorter_is_tree = ta if len(pa) < len(pb) else tb
    return shorter_is_tree


def pattern_glob(pattern: FilePattern) -> str:
    """The glob covering the same paths as ``pattern`` (``children`` → ``base/*``; ``tree`` →
    ``base/**``, which also covers ``base``: a small over-approximation that only makes
    intersection tests more conservative)."""
    if pattern.scope == EXACT:
        return pattern.base
    base = pattern.base.rstrip("/")
    return f"{base}/*" if pattern.scope == CHILDREN else f"{base}/**"
