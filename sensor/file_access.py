"""File accesses as the kernel reports them (``bpf/files.c``), turned into file behaviour keys.

A record or counter key of the file programs carries the path as the process gave it, its base
(absolute, relative to the working directory, or relative to a directory fd) and the access bits
of one call (``FILE_ACC_*`` in ``bpf/events.h``): an ``open(O_RDWR | O_CREAT)`` is read, write and
create at once. Each bit is one access kind of the file substrate
(:data:`enforcer.file_patterns.KINDS`), and one behaviour ``file:KIND:PATH``.

What only userspace can tell is passed in: the absolute path a relative one resolves to, and
whether the path is a directory now (:mod:`sensor.proc_paths` finds both). A directory opened
for reading without ``O_DIRECTORY`` is listed (Landlock checks ``read_dir`` on it), and a name
created by ``rename(2)`` or ``link(2)`` that is a directory was made (``mkdir``).

Pure: strings and integers in, sorted behaviour keys out.
"""

from __future__ import annotations

import posixpath

from .events import (FILE_ACC_CREATE, FILE_ACC_EXEC, FILE_ACC_LIST, FILE_ACC_MKDIR, FILE_ACC_MKFIFO,
                     FILE_ACC_MKNOD, FILE_ACC_MKSOCK, FILE_ACC_READ, FILE_ACC_REMOVE, FILE_ACC_RMDIR,
                     FILE_ACC_SYMLINK, FILE_ACC_TRUNCATE, FILE_ACC_WRITE, FILE_AT_FDCWD,
                     FILE_DIRFD_ABSOLUTE)
from .workload import exec_key, file_key

#: access bit -> file access kind (the names of enforcer.file_patterns.KINDS)
ACCESS_KINDS: tuple[tuple[int, str], ...] = (
    (FILE_ACC_READ, "read"),
    (FILE_ACC_LIST, "list"),
    (FILE_ACC_WRITE, "write"),
    (FILE_ACC_TRUNCATE, "truncate"),
    (FILE_ACC_CREATE, "create"),
    (FILE_ACC_REMOVE, "remove"),
    (FILE_ACC_MKDIR, "mkdir"),
    (FILE_ACC_RMDIR, "rmdir"),
    (FILE_ACC_SYMLINK, "symlink"),
    (FILE_ACC_MKFIFO, "mkfifo"),
    (FILE_ACC_MKSOCK, "mksock"),
    (FILE_ACC_MKNOD, "mknod"),
)


def kinds(access: int, is_dir: bool | None = None) -> tuple[str, ...]:
    """The access kinds of ``access`` bits, in :data:`ACCESS_KINDS` order. ``is_dir``: the path is
    a directory now (None: unknown)."""
    out = []
    for bit, kind in ACCESS_KINDS:
        if not access & bit:
            continue
        if is_dir and kind == "read":
            kind = "list"
        elif is_dir and kind == "create":
            kind = "mkdir"
        if kind not in out:
            out.append(kind)
    return tuple(out)


def normalise(path: str) -> str | None:
    """An absolute path without ``.``, ``..``, repeated or trailing ``/``; None for a relative one.
    Symbolic links are not resolved: the path is what the process named."""
    if not path.startswith("/"):
        return None
    p = posixpath.normpath(path)
    if p.startswith("//"):  # POSIX keeps a leading "//"; Linux treats it as "/"
        p = "/" + p.lstrip("/")
    return p


def is_relative(dirfd: int) -> bool:
    return dirfd != FILE_DIRFD_ABSOLUTE


def join(base: str, path: str) -> str | None:
    """``path`` (relative) resolved against the absolute directory ``base``."""
    if not base.startswith("/"):
        return None
    return normalise(posixpath.join(base, path))


def base_of(dirfd: int) -> str:
    """What a relative path is relative to: ``cwd`` or ``fd/N``."""
    return "cwd" if dirfd == FILE_AT_FDCWD else f"fd/{dirfd}"


def behaviours(access: int, path: str, is_dir: bool | None = None) -> tuple[str, ...]:
    """Behaviour keys of one access to the absolute, normalised ``path``: ``file:KIND:PATH`` per
    kind, and ``exec:PATH`` for an exec (reported only when refused)."""
    out = [file_key(k, path) for k in kinds(access, is_dir)]
    if access & FILE_ACC_EXEC:
        out.append(exec_key(path))
    return tuple(out)
