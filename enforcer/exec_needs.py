"""What an allowed exec needs to run, found in a root filesystem: the ``#!`` interpreter of a
script, the ELF interpreter (``PT_INTERP``, the dynamic loader), and the shared libraries the
loader maps (``DT_NEEDED``, transitively, searched like glibc's loader: ``DT_RPATH`` when there is
no ``DT_RUNPATH``, then ``DT_RUNPATH``, then the ``ld.so.conf`` directories, then the default
directories), plus the loader's own files (``/etc/ld.so.cache``, ``/etc/ld.so.preload``).

This is the edge that reads files; :class:`enforcer.landlock_rules.ExecNeeds` is what it returns
and the compiler consumes. ``root`` is the filesystem the exec runs in: ``/`` for ``envelope
exec``, a container's rootfs for the launcher. Paths are resolved inside ``root`` (an absolute
symlink target is taken relative to ``root``), and the paths returned are the paths the process
inside ``root`` uses. ``LD_LIBRARY_PATH`` and ``dlopen`` are invisible here: a library loaded that
way is a file read the file substrate observes, or a denial.
"""

from __future__ import annotations

import glob
import os
import posixpath
from pathlib import Path
from typing import Iterable

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile

from sensor.identity import HostPathError, host_path

from .landlock_rules import ExecNeeds

MAX_SCRIPT_DEPTH = 4  # binfmt_script allows this many nested interpreters
MAX_SYMLINKS = 40
DEFAULT_DIRS = {
    # (ELF class, machine) -> the loader's built-in trusted directories, multiarch first (Debian)
    (64, "EM_X86_64"): ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"),
    (64, "EM_AARCH64"): ("/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"),
    (32, "EM_386"): ("/lib/i386-linux-gnu", "/usr/lib/i386-linux-gnu", "/lib32", "/usr/lib32", "/lib", "/usr/lib"),
}
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.preload")


class ExecNeedsError(ValueError):
    """An exec path that cannot be inspected; the message names it."""


def in_root(root: str, path: str) -> str | None:
    """Resolve ``path`` (absolute, as seen inside ``root``) following symlinks inside ``root``
    (:func:`sensor.identity.host_path`); the resolved in-root path, or None when it does not exist."""
    if os.path.abspath(root) == "/":
        real = os.path.realpath(path)
        return real if os.path.exists(real) else None
    try:
        host = host_path(root, path, MAX_SYMLINKS)
    except HostPathError:
        return None
    if not host.exists():
        return None
    rel = os.path.relpath(host, root)
    return "/" if rel == "." else "/" + rel


def _host(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _ld_conf_dirs(root: str) -> list[str]:
    """Directories from ``/etc/ld.so.conf`` and its ``include`` files, in order."""
    out: list[str] = []
    seen: set[str] = set()

    def read(conf: str, depth: int) -> None:
        if depth > 8 or conf in seen:
            return
        seen.add(conf)
        try:
            text = Path(_host(root, conf)).read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include "):
                pat = line[len("include "):].strip()
                if not pat.startswith("/"):
                    pat = posixpath.join(posixpath.dirname(conf), pat)
                for host in sorted(glob.glob(_host(root, pat))):
                    read("/" + os.path.relpath(host, root), depth + 1)
            elif line.startswith("/") and line not in out:
                out.append(line)

    read("/etc/ld.so.conf", 0)
    return out


class _Resolver:
    def __init__(self, root: str):
        self.root = root
        self.conf_dirs = _ld_conf_dirs(root)
        self.execute: set[str] = set()
        self.read: set[str] = set()
        self.notes: set[str] = set()
        self._done: set[str] = set()

    def exec_path(self, path: str, depth: int = 0) -> None:
        real = in_root(self.root, path)
        if real is None:
            self.notes.add(f"{path}: not found")
            return
        host = _host(self.root, real)
        try:
            with open(host, "rb") as f:
                head = f.read(256)
        except OSError as e:
            self.notes.add(f"{path}: cannot read: {e.strerror}")
            return
        if head.startswith(b"#!"):
            if depth >= MAX_SCRIPT_DEPTH:
                self.notes.add(f"{path}: more than {MAX_SCRIPT_DEPTH} nested #! interpreters")
                return
            line = head[2:].split(b"\n", 1)[0].strip()
            interp = line.split(None, 1)[0].decode(errors="replace") if line else ""
            if not interp.startswith("/"):
                self.notes.add(f"{path}: #! interpreter {interp!r} is not an absolute path")
                return
            self.execute.add(interp)
            self.exec_path(interp, depth + 1)
            return
        if head.startswith(b"\x7fELF"):
            self.elf(path, real, is_exec=True)
            return
        self.notes.add(f"{path}: neither an ELF file nor a #! script")

    def elf(self, path: str, real: str, is_exec: bool) -> tuple[int, str] | None:
        if real in self._done:
            return None
        self._done.add(real)
        try:
            with open(_host(self.root, real), "rb") as f:
                elf = ELFFile(f)
                ident = (elf.elfclass, elf["e_machine"])
                interp, needed, rpath, runpath = None, [], [], []
                for seg in elf.iter_segments():
                    if seg["p_type"] == "PT_INTERP":
                        interp = seg.get_interp_name()
                    elif isinstance(seg, DynamicSegment):
                        for tag in seg.iter_tags():
                            t = tag.entry.d_tag
                            if t == "DT_NEEDED":
                                needed.append(tag.needed)
                            elif t == "DT_RPATH":
                                rpath += tag.rpath.split(":")
                            elif t == "DT_RUNPATH":
                                runpath += tag.runpath.split(":")
        except (ELFError, OSError, ValueError) as e:
            self.notes.add(f"{path}: not a readable ELF file ({e})")
            return None
        if is_exec and interp:
            self.execute.add(interp)
            if in_root(self.root, interp) is None:
                self.notes.add(f"{path}: ELF interpreter {interp} not found")
        origin = posixpath.dirname(real)
        search = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                  for d in (rpath if not runpath else []) + runpath if d]
        search += self.conf_dirs + list(DEFAULT_DIRS.get(ident, ("/lib", "/usr/lib")))
        if needed or interp:
            for lf in LOADER_FILES:
                if in_root(self.root, lf) is not None:
                    self.read.add(lf)
        for name in needed:
            self.library(name, search, ident, path)
        return ident

    def library(self, name: str, search: list[str], ident, needed_by: str) -> None:
        candidates = [name] if "/" in name else [posixpath.join(d, name) for d in search]
        for cand in candidates:
            real = in_root(self.root, cand)
            if real is None:
                continue
            try:
                with open(_host(self.root, real), "rb") as f:
                    e = ELFFile(f)
                    if (e.elfclass, e["e_machine"]) != ident:
                        continue  # a library of another ABI in a shared directory
            except (ELFError, OSError, ValueError):
                continue
            self.read.add(cand)
            self.elf(cand, real, is_exec=False)
            return
        self.notes.add(f"{needed_by}: shared library {name} not found")


def resolve(execs: Iterable[str], root: str = "/") -> dict[str, ExecNeeds]:
    """``{exec entry: ExecNeeds}`` for exact paths and ``/dir/*`` patterns (every file directly in
    the directory, as found now)."""
    out: dict[str, ExecNeeds] = {}
    for e in sorted(set(execs)):
        if not e.startswith("/"):
            raise ExecNeedsError(f"exec:{e}: not an absolute path")
        r = _Resolver(root)
        if e.endswith("/*"):
            d = e[:-2] or "/"
            real = in_root(root, d)
            if real is None:
                r.notes.add(f"{d}: not found")
            else:
                try:
                    names = sorted(os.listdir(_host(root, real)))
                except OSError as err:
                    names = []
                    r.notes.add(f"{d}: cannot list: {err.strerror}")
                for n in names:
                    p = posixpath.join(d, n)
                    rp = in_root(root, p)
                    if rp is not None and os.path.isfile(_host(root, rp)):
                        r.exec_path(p)
        else:
            r.exec_path(e)
        out[e] = ExecNeeds(tuple(sorted(r.execute)), tuple(sorted(r.read - r.execute)), tuple(sorted(r.notes)))
    return out
