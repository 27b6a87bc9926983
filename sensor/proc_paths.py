"""Paths as a process sees them, read through ``/proc``: the directory a relative path is
relative to (``/proc/<pid>/cwd``, ``/proc/<pid>/fd/<n>``) and whether a path is a directory in
the process's own root (``/proc/<pid>/root``, so a container's paths are looked up in the
container's filesystem).

This is the edge the file substrate needs beside the kernel: ``bpf/files.c`` reports the path
as given, and only userspace can follow a pid's working directory without kernel struct offsets.
It is racy by nature: a process that is gone, or a directory fd closed or reused before the
lookup, gives no answer (None), which callers count rather than guess.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .events import FILE_AT_FDCWD, FILE_DIRFD_ABSOLUTE
from .file_access import join, normalise

_DELETED = " (deleted)"


class ProcPaths:
    def __init__(self, proc: str | os.PathLike = "/proc"):
        self.proc = Path(proc)

    def base(self, pid: int, dirfd: int) -> str | None:
        """The absolute directory a relative path of ``pid`` with ``dirfd`` starts from."""
        link = self.proc / str(pid) / ("cwd" if dirfd == FILE_AT_FDCWD else f"fd/{dirfd}")
        try:
            target = os.readlink(link)
        except OSError:
            return None
        if target.endswith(_DELETED) or not target.startswith("/"):
            return None  # a removed directory, or not a directory at all (pipe:[..], socket:[..])
        return target

    def resolve(self, pid: int, dirfd: int, path: str) -> str | None:
        """``path`` as an absolute, normalised path; None when it cannot be told any more."""
        if dirfd == FILE_DIRFD_ABSOLUTE or path.startswith("/"):
            return normalise(path)
        base = self.base(pid, dirfd)
        return join(base, path) if base is not None else None

    def is_dir(self, pid: int, path: str) -> bool | None:
        """Is ``path`` (absolute, as ``pid`` sees it) a directory now? When ``pid`` is gone
        already (a short-lived helper), the path is looked up in this process's root instead,
        which is the process's own for host workloads and, for a container, the host's view of
        the same path (a path that is a directory in one and a file in the other is the rare
        case this gets wrong). None when the path exists in neither, or when ``pid`` runs but
        its root may not be read (ptrace's access check: our own root would be the wrong one)."""
        for root in (self.proc / str(pid) / "root", self.proc / "self" / "root"):
            try:
                st = os.stat(root / path.lstrip("/"))
            except PermissionError:
                return None
            except OSError:
                continue
            return stat.S_ISDIR(st.st_mode)
        return None
