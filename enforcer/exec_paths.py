"""Exec paths as one name per file, for judging execs against a policy.

The sensor records the path ``execve`` was given: ``/bin/sh`` and ``/usr/bin/sh`` are one file
on a merged-/usr system, ``/usr/bin/python3`` is a symlink to ``python3.11``, and a policy
derived from one spelling must judge the other the same way. This is the edge that reads the
filesystem: :class:`ExecNames` resolves both the policy's exec entries and each observed path
inside the workload's root (``/`` for ``envelope exec``), following aliases and symlinks, and
matches them by resolved name. Resolution is cached (bounded) and falls back to the path as
given when it does not resolve (a program that is gone).
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from typing import Callable

from .exec_needs import in_root
from .policy import Policy


class ExecNames:
    """Resolved names of exec paths inside ``root`` (see the module docstring)."""

    def __init__(self, root: str = "/", cache: int = 4096,
                 resolve: Callable[[str, str], str | None] = in_root):
        self.root = root
        self._resolve = resolve
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cap = cache

    def canonical(self, path: str) -> str:
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        try:
            got = self._resolve(self.root, path) or path
        except (OSError, ValueError):
            got = path
        got = posixpath.normpath(got)
        self._cache[path] = got
        if len(self._cache) > self._cap:
            self._cache.popitem(last=False)
        return got

    def admits(self, policy: Policy) -> Callable[[str], bool]:
        """``key -> bool`` for ``exec:PATH`` keys: is the exec let through by ``policy`` (allowed,
        or a review item alerted) under any spelling of the same file?"""
        entries = list(policy.execs)
        admitted = policy.review_admitted()
        if admitted is not None:
            entries += list(admitted.execs)
        exact = {self.canonical(e) for e in entries if not e.endswith("/*")}
        dirs = {self.canonical(e[:-2] or "/") for e in entries if e.endswith("/*")}

        def check(key: str) -> bool:
            if policy.admits(key):
                return True
            path = key.split(":", 1)[1]
            real = self.canonical(path)
            if real in exact:
                return True
            # a pattern matches a file directly inside its directory, by either spelling
            parent = self.canonical(posixpath.dirname(path))
            return parent in dirs or posixpath.dirname(real) in dirs
        return check
