"""Landlock rulesets: the access-right table, the ruleset model, and the compiler from a policy's
allowed execs and file entries. Pure and deterministic; nothing here touches the kernel or the
filesystem (:mod:`enforcer.landlock` applies a compiled ruleset, :mod:`enforcer.exec_needs`
finds what an exec needs).

**What a Landlock rule is.** A rule grants rights on one *object*, an inode opened at apply time,
and the rights hold for that object and, when it is a directory, for everything beneath it.
There are no deny rules and no "direct children only" rules. Rights not *handled* by the
ruleset stay allowed. So each allowed entry compiles to rules on objects as follows (the rule
names appear in :attr:`CompiledRuleset.notes`):

=====================  =====================================  ===================================
policy entry           Landlock object                        precision
=====================  =====================================  ===================================
exact ``/a/b``         the file ``/a/b`` (``file`` object)    exact for that inode; a file that is
                                                              replaced later (new inode) is not
                                                              covered; a directory there is
                                                              refused at apply time
``/a/*``               the directory ``/a`` (``tree``)        ``landlock:children-as-hierarchy``:
                                                              widened to everything beneath ``/a``
``/a/*`` near a        each existing non-directory child of   ``landlock:children-enumerated``:
sensitive path         ``/a`` at apply time (``children``),   exact for what exists; files created
                       minus sensitive names                  later are not covered
``/a/**``              the directory ``/a`` (``tree``)        exact (also covers ``/a`` itself)
``list`` of ``/a``     ``/a`` (``tree``) with ``read_dir``    ``landlock:read-dir-hierarchy``:
                                                              directories beneath can be listed
parent kinds           the parent directory (``tree``)        ``landlock:parent-hierarchy``: the
(``create /a/b`` ...)                                         operation is allowed for any name
                                                              beneath ``/a``
target kinds of a      also the parent directory (``tree``)   ``landlock:created-file-via-parent``:
path also created                                             the new inode does not exist yet
=====================  =====================================  ===================================

A ``tree`` rule whose hierarchy shares a path with a sensitive pattern cannot be expressed (Landlock
cannot carve it out): it is *inexpressible*, and compilation refuses it unless told to drop it.

**Execs.** An allowed exec needs ``execute`` and, when reads are handled, ``read_file`` on the
binary (the kernel opens it for reading: the audit record of a denied exec names both), plus
what :class:`ExecNeeds` lists: the ELF interpreter and a script's ``#!`` interpreter (the kernel
opens them like the binary: ``execute`` and ``read_file``), and the shared libraries and loader
cache (``read_file`` only; Landlock does not check ``mmap(PROT_EXEC)``).

**Handled rights.** ``exec`` in the policy handles ``execute``; the file substrate handles every
other filesystem right this ABI knows. Landlock's TCP and scope controls are not used: egress is
the cgroup/BPF substrate's.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from .file_patterns import (CHILDREN, EXACT, KINDS, PARENT_KINDS, TREE, FilePattern, FilePatternError,
                            _glob_parts, depth, parse_entry)
from .sensitive_paths import SENSITIVE, SensitivePath, sensitive_match, sensitive_overlaps


class LandlockCompileError(ValueError):
    """A policy that cannot be compiled to a Landlock ruleset; the message names the entry."""


# ---- the access-right table (include/uapi/linux/landlock.h, Linux 6.18) ---------------------


@dataclass(frozen=True)
class Right:
    name: str  # landlockconfig's name
    bit: int
    abi: int  # first Landlock ABI version that knows it
    applies_to: str  # "file": files and (beneath) directories; "dir": directories only
    meaning: str


FS_RIGHTS: tuple[Right, ...] = (
    Right("execute", 1 << 0, 1, "file", "execute a file"),
    Right("write_file", 1 << 1, 1, "file", "open a file for writing"),
    Right("read_file", 1 << 2, 1, "file", "open a file for reading"),
    Right("read_dir", 1 << 3, 1, "dir", "open a directory or list it"),
    Right("remove_dir", 1 << 4, 1, "dir", "remove an empty directory or rename one"),
    Right("remove_file", 1 << 5, 1, "dir", "unlink or rename a file"),
    Right("make_char", 1 << 6, 1, "dir", "create a character device"),
    Right("make_dir", 1 << 7, 1, "dir", "create a directory"),
    Right("make_reg", 1 << 8, 1, "dir", "create a regular file"),
    Right("make_sock", 1 << 9, 1, "dir", "create a UNIX socket file"),
    Right("make_fifo", 1 << 10, 1, "dir", "create a named pipe"),
    Right("make_block", 1 << 11, 1, "dir", "create a block device"),
    Right("make_sym", 1 << 12, 1, "dir", "create a symbolic link"),
    Right("refer", 1 << 13, 2, "dir", "link or rename a file into another directory"),
    Right("truncate", 1 << 14, 3, "file", "truncate a file"),
    Right("ioctl_dev", 1 << 15, 5, "file", "ioctl(2) on a character or block device"),
)
NET_RIGHTS: tuple[Right, ...] = (
    Right("bind_tcp", 1 << 0, 4, "net", "bind a TCP socket to a port"),
    Right("connect_tcp", 1 << 1, 4, "net", "connect a TCP socket to a port"),
)
SCOPES: tuple[Right, ...] = (
    Right("abstract_unix_socket", 1 << 0, 6, "scope", "connect to an abstract UNIX socket outside the domain"),
    Right("signal", 1 << 1, 6, "scope", "send a signal to a process outside the domain"),
)
#: landlock_restrict_self(2) flags: where denials are logged (ABI 7).
RESTRICT_FLAGS: tuple[Right, ...] = (
    Right("log_same_exec_off", 1 << 0, 7, "flag", "do not log denials of the program that enforced the ruleset"),
    Right("log_new_exec_on", 1 << 1, 7, "flag", "log denials after execve(2) too"),
    Right("log_subdomains_off", 1 << 2, 7, "flag", "do not log denials of nested domains"),
)
#: What this ABI still cannot restrict (the uapi header's warning, and the ABI 7 feature set).
NOT_RESTRICTED = (
    "chdir(2), stat(2), flock(2), chmod(2), chown(2), setxattr(2), utime(2), fcntl(2), access(2) "
    "on any path",
    "reads, writes and ioctls through file descriptors opened before the ruleset was enforced "
    "(inherited stdio, sockets)",
    "mmap(PROT_EXEC) of a file already opened for reading (shared libraries, a loader running a "
    "binary as an argument: /lib64/ld-linux-x86-64.so.2 /path/prog)",
    "UDP and any protocol other than TCP; TCP only by port, not by address",
    "connect(2)/sendmsg(2) to pathname UNIX sockets (LANDLOCK_ACCESS_FS_RESOLVE_UNIX is ABI 9)",
    "a log-only mode: every handled access that is not allowed is denied",
)

BY_NAME = {r.name: r for r in FS_RIGHTS + NET_RIGHTS + SCOPES + RESTRICT_FLAGS}
_FS_ORDER = {r.name: i for i, r in enumerate(FS_RIGHTS)}

EXEC_HANDLED = ("execute",)
FILE_HANDLED = tuple(r.name for r in FS_RIGHTS if r.name != "execute")

#: Rights each file access kind needs, on the path itself or (parent kinds) on its directory.
KIND_RIGHTS: Mapping[str, tuple[str, ...]] = {
    "read": ("read_file",),
    "list": ("read_dir",),
    "write": ("write_file",),
    "truncate": ("truncate",),
    "ioctl": ("ioctl_dev",),
    "create": ("make_reg",),
    "remove": ("remove_file",),
    "mkdir": ("make_dir",),
    "rmdir": ("remove_dir",),
    "symlink": ("make_sym",),
    "mkfifo": ("make_fifo",),
    "mksock": ("make_sock",),
    "mknod": ("make_char", "make_block"),
}
assert set(KIND_RIGHTS) == set(KINDS)

FILE_OBJECT, TREE_OBJECT, CHILDREN_OBJECT = "file", "tree", "children"
OBJECTS = (FILE_OBJECT, TREE_OBJECT, CHILDREN_OBJECT)


def fs_mask(names: Iterable[str]) -> int:
    m = 0
    for n in names:
        r = BY_NAME.get(n)
        if r is None or r not in FS_RIGHTS:
            raise LandlockCompileError(f"unknown filesystem access right {n!r}")
        m |= r.bit
    return m


def fs_names(mask: int) -> tuple[str, ...]:
    return tuple(r.name for r in FS_RIGHTS if mask & r.bit)


def sort_rights(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names), key=lambda n: _FS_ORDER[n]))


def abi_of(names: Iterable[str]) -> int:
    return max((BY_NAME[n].abi for n in names), default=1)


# ---- exec needs (found by enforcer.exec_needs at the edge) ----------------------------------


@dataclass(frozen=True)
class ExecNeeds:
    """What one allowed exec entry needs besides the binary: ``execute`` paths (ELF
    interpreter, ``#!`` interpreters) and ``read`` paths (shared libraries, loader cache)."""

    execute: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # e.g. a library that was not found

    def to_dict(self) -> dict:
        return {"execute": list(self.execute), "read": list(self.read), "notes": list(self.notes)}


# ---- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathRule:
    """Rights on one object: a ``file`` (must not be a directory at apply time), a ``tree`` (the
    object and everything beneath), or ``children`` (each existing non-directory entry directly
    inside the directory, except names matching ``exclude``)."""

    path: str
    object: str
    rights: tuple[str, ...]
    sources: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {"path": self.path, "object": self.object, "rights": list(self.rights),
             "sources": list(self.sources)}
        if self.exclude:
            d["exclude"] = list(self.exclude)
        return d


@dataclass(frozen=True)
class Note:
    """Where the ruleset is wider or narrower than the policy, and why."""

    rule: str  # landlock:children-as-hierarchy, ... or inexpressible
    entry: str
    detail: str

    def to_dict(self) -> dict:
        return {"rule": self.rule, "entry": self.entry, "detail": self.detail}


@dataclass(frozen=True)
class Gap:
    """A handled right the running kernel cannot restrict."""

    right: str
    abi: int

    def message(self, kernel_abi: int) -> str:
        return (f"{self.right} ({BY_NAME[self.right].meaning}) needs Landlock ABI {self.abi}; "
                f"this kernel has ABI {kernel_abi}")


@dataclass(frozen=True)
class CompiledRuleset:
    workload: str
    handled_fs: tuple[str, ...]
    rules: tuple[PathRule, ...]
    notes: tuple[Note, ...] = ()
    restrict_flags: tuple[str, ...] = ("log_new_exec_on",)
    substrates: tuple[str, ...] = ()

    @property
    def unrestricted(self) -> frozenset[str]:
        """Handled rights granted on the whole filesystem (``refer`` when files are not
        enforced): a kernel that lacks them restricts nothing the policy asked for."""
        return frozenset(x for r in self.rules if r.path == "/" and r.object == TREE_OBJECT for x in r.rights)

    @property
    def abi(self) -> int:
        """The lowest Landlock ABI that can restrict every handled right."""
        return abi_of(self.handled_fs)

    @property
    def empty(self) -> bool:
        return not self.handled_fs

    def gaps(self, supported_fs: Iterable[str]) -> tuple[Gap, ...]:
        have = set(supported_fs) | self.unrestricted
        return tuple(Gap(r, BY_NAME[r].abi) for r in self.handled_fs if r not in have)

    def without(self, rights: Iterable[str]) -> "CompiledRuleset":
        """The ruleset with ``rights`` neither handled nor granted (for a kernel that lacks them)."""
        drop = set(rights)
        rules = tuple(replace(r, rights=tuple(x for x in r.rights if x not in drop)) for r in self.rules)
        return replace(self, handled_fs=tuple(r for r in self.handled_fs if r not in drop),
                       rules=tuple(r for r in rules if r.rights))

    def to_dict(self) -> dict:
        return {"workload": self.workload, "abi": self.abi, "substrates": list(self.substrates),
                "handledAccessFs": list(self.handled_fs), "restrictFlags": list(self.restrict_flags),
                "rules": [r.to_dict() for r in self.rules], "notes": [n.to_dict() for n in self.notes]}


# ---- the compiler ---------------------------------------------------------------------------


class _Builder:
    def __init__(self, sensitive: tuple[SensitivePath, ...]):
        self.sensitive = sensitive
        self.rules: dict[tuple[str, str], dict] = {}
        self.notes: set[Note] = set()
        self.inexpressible: list[Note] = []

    def add(self, path: str, obj: str, rights: Iterable[str], source: str, exclude: Iterable[str] = ()) -> None:
        r = self.rules.setdefault((path, obj), {"rights": set(), "sources": set(), "exclude": set()})
        r["rights"].update(rights)
        r["sources"].add(source)
        r["exclude"].update(exclude)

    def note(self, rule: str, entry: str, detail: str) -> None:
        self.notes.add(Note(rule, entry, detail))

    def tree_overlaps(self, base: str, own_path: str | None = None) -> list[SensitivePath]:
        """Sensitive patterns a hierarchy rule on ``base`` would cover; a pattern that covers
        ``own_path`` (an exact entry that is itself sensitive, allowed by its own evidence) does not
        count."""
        out = sensitive_overlaps(FilePattern(base, TREE), self.sensitive)
        if own_path is not None:
            own = sensitive_match(own_path, self.sensitive)
            out = [s for s in out if s != own]
        return out

    def tree(self, base: str, rights, source: str, entry: str, own_path: str | None = None) -> None:
        blockers = self.tree_overlaps(base, own_path)
        if blockers:
            self.inexpressible.append(Note(
                "inexpressible", entry,
                f"{', '.join(rights)} beneath {base} would also cover sensitive {blockers[0].pattern} "
                f"({blockers[0].reason}); Landlock cannot exclude a path from a hierarchy rule"))
            return
        self.add(base, TREE_OBJECT, rights, source)

    def children(self, base: str, rights, source: str, entry: str) -> None:
        """``base/*``: a hierarchy rule when nothing sensitive lies beneath, else each child."""
        blockers = self.tree_overlaps(base)
        if not blockers:
            self.add(base, TREE_OBJECT, rights, source)
            self.note("landlock:children-as-hierarchy", entry,
                      f"{base}/* is granted as everything beneath {base} (Landlock rules cover a hierarchy)")
            return
        n = depth(base)
        exclude = set()
        for s in blockers:
            parts, is_tree = _glob_parts(s.pattern)
            if len(parts) <= n:  # base itself is sensitive: every child is
                self.inexpressible.append(Note(
                    "inexpressible", entry, f"{base} is inside sensitive {s.pattern} ({s.reason})"))
                return
            exclude.add(parts[n])
        self.add(base, CHILDREN_OBJECT, rights, source, exclude)
        self.note("landlock:children-enumerated", entry,
                  f"{base}/* is granted on each non-directory child existing at apply time, except "
                  f"{', '.join(sorted(exclude))} (a hierarchy rule would cover "
                  f"{', '.join(sorted(s.pattern for s in blockers))}); files created later are not covered")


def _exec_pattern(e: str) -> FilePattern:
    try:
        p = FilePattern.parse(e)
    except FilePatternError as err:
        raise LandlockCompileError(f"exec:{e}: {err}") from None
    if p.scope == TREE:
        raise LandlockCompileError(f"exec:{e}: exec entries are exact paths or /dir/*")
    return p


def compile_ruleset(workload: str, *, execs: Sequence[str] | None = (), files: Sequence[str] | None = None,
                    exec_needs: Mapping[str, ExecNeeds] | None = None, inexpressible: str = "refuse",
                    sensitive: tuple[SensitivePath, ...] = SENSITIVE) -> CompiledRuleset:
    """Compile allowed ``execs`` (``None``: the exec substrate is not enforced) and allowed
    ``files`` (``file:KIND:PATTERN``; ``None``: the file substrate is not enforced).

    ``exec_needs`` maps an exec entry (as in ``execs``) to what it needs. ``inexpressible``:
    ``refuse`` raises :class:`LandlockCompileError` naming every entry Landlock cannot express
    without covering a sensitive path; ``drop`` leaves their rights out and lists them in
    :attr:`CompiledRuleset.notes` (the ruleset is then narrower than the policy).
    """
    if inexpressible not in ("refuse", "drop"):
        raise LandlockCompileError(f"inexpressible: {inexpressible!r} is not refuse or drop")
    b = _Builder(sensitive)
    handled: list[str] = []
    substrates = []
    if execs is not None:
        handled += EXEC_HANDLED
        substrates.append("exec")
    if files is not None:
        handled += FILE_HANDLED
        substrates.append("file")
    elif execs is not None:
        # From ABI 2 every ruleset denies linking or renaming into another directory (EXDEV)
        # unless ``refer`` is handled and granted, even when the ruleset is about execs only:
        # a program that writes a temporary file and renames it into place would break. With
        # files not enforced, reparenting is not the policy's business: grant it everywhere.
        handled.append("refer")
        b.add("/", TREE_OBJECT, ("refer",), "landlock:refer-unrestricted")
        b.note("landlock:refer-unrestricted", "exec",
               "files are not enforced: links and renames across directories stay allowed "
               "(Landlock denies them to any ruleset that does not grant refer)")
    reads = files is not None
    exec_rights = ("execute", "read_file") if reads else ("execute",)
    needs = dict(exec_needs or {})

    for e in sorted(set(execs or ())):
        p = _exec_pattern(e)
        ent = f"exec:{e}"
        if p.scope == EXACT:
            b.add(p.base, FILE_OBJECT, exec_rights, ent)
        else:
            b.children(p.base, exec_rights, ent, ent)
        n = needs.get(e)
        if n is None:
            continue
        for x in n.execute:
            b.add(x, FILE_OBJECT, exec_rights, f"exec-needs:interpreter:{e}")
        if reads:
            for x in n.read:
                b.add(x, FILE_OBJECT, ("read_file",), f"exec-needs:library:{e}")
        for text in n.notes:
            b.note("exec-needs", ent, text)

    parsed: list[tuple[str, str, FilePattern]] = []
    for f in sorted(set(files or ())):
        try:
            kind, pattern = parse_entry(f)
        except FilePatternError as err:
            raise LandlockCompileError(str(err)) from None
        parsed.append((f, kind, pattern))
    creates = [pat for _, kind, pat in parsed if kind == "create"]

    for f, kind, pattern in parsed:
        rights = KIND_RIGHTS[kind]
        base = pattern.base
        if kind in PARENT_KINDS:
            parent = posixpath.dirname(base) if pattern.scope == EXACT else base
            if pattern.scope == EXACT and base == "/":
                raise LandlockCompileError(f"{f}: / has no parent directory")
            b.tree(parent, rights, f, f)
            if pattern.scope != TREE:
                b.note("landlock:parent-hierarchy", f,
                       f"{', '.join(rights)} is granted for any name beneath {parent}")
            continue
        if kind == "list":
            if pattern.scope == EXACT:
                b.tree(base, rights, f, f, own_path=base)
                b.note("landlock:read-dir-hierarchy", f, f"directories beneath {base} can be listed too")
            elif pattern.scope == CHILDREN:
                b.children(base, rights, f, f)
            else:
                b.tree(base, rights, f, f)
            continue
        if pattern.scope == EXACT:
            b.add(base, FILE_OBJECT, rights, f)
            if base != "/" and any(c.matches(base) for c in creates):
                parent = posixpath.dirname(base)
                b.tree(parent, rights, f"{f} (created)", f)
                b.note("landlock:created-file-via-parent", f,
                       f"{base} is also created, so {', '.join(rights)} is granted beneath {parent}: a new "
                       f"file's inode does not exist when the ruleset is built")
        elif pattern.scope == CHILDREN:
            b.children(base, rights, f, f)
        else:
            b.tree(base, rights, f, f)

    if b.inexpressible and inexpressible == "refuse":
        items = sorted(b.inexpressible, key=lambda n: n.entry)
        raise LandlockCompileError(
            f"{len(items)} entr{'y' if len(items) == 1 else 'ies'} cannot be enforced by Landlock without "
            f"covering a sensitive path: " + "; ".join(f"{n.entry}: {n.detail}" for n in items)
            + "; fix: narrow the entries (exact paths, or a dedicated directory), or compile with "
              "inexpressible=drop to leave them out")
    notes = set(b.notes) | {Note("inexpressible:dropped", n.entry, n.detail) for n in b.inexpressible}

    rules = []
    for (path, obj), r in sorted(b.rules.items()):
        rights = sort_rights(r["rights"])
        if obj == FILE_OBJECT:
            dir_only = [x for x in rights if BY_NAME[x].applies_to == "dir"]
            if dir_only:  # only reachable through exec needs or a malformed kind table
                raise LandlockCompileError(f"{path}: directory rights {dir_only} on a file rule")
        rules.append(PathRule(path, obj, rights, tuple(sorted(r["sources"])), tuple(sorted(r["exclude"]))))
    return CompiledRuleset(workload, sort_rights(handled), tuple(rules),
                           tuple(sorted(notes, key=lambda n: (n.entry, n.rule, n.detail))),
                           substrates=tuple(substrates))


def compile_policy(policy, *, exec_needs: Mapping[str, ExecNeeds] | None = None,
                   inexpressible: str = "refuse") -> CompiledRuleset:
    """A :class:`enforcer.policy.Policy`'s Landlock ruleset: its ``allow.execs`` when the exec
    substrate is in the policy, its ``allow.files`` when the file substrate is (a substrate left
    out is not restricted: its rights are not handled)."""
    execs = tuple(policy.execs) if "exec" in policy.substrates else None
    files = tuple(policy.files) if "file" in policy.substrates else None
    return compile_ruleset(str(policy.workload), execs=execs, files=files, exec_needs=exec_needs,
                           inexpressible=inexpressible)


def children_exclude_matches(name: str, exclude: Iterable[str]) -> bool:
    import fnmatch
    return any(fnmatch.fnmatchcase(name, g) for g in exclude)


__all__ = ["BY_NAME", "CompiledRuleset", "ExecNeeds", "FILE_HANDLED", "EXEC_HANDLED", "FS_RIGHTS", "Gap",
           "KIND_RIGHTS", "LandlockCompileError", "NET_RIGHTS", "NOT_RESTRICTED", "Note", "PathRule",
           "RESTRICT_FLAGS", "SCOPES", "compile_policy", "compile_ruleset"]
