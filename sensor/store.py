"""Profile store: one msgpack file per workload under ``<state-dir>/profiles/``.

Writes are atomic (:func:`sensor.state_dir.atomic_write`). A corrupt or truncated file raises :class:`ProfileStoreError` naming the file, and
the file is left where it is for inspection.

Several writers can hold one workload's profile on a node: the sensor (the daemon or ``record``)
writes its node's contribution, an MCP gateway writes its own. Each writer owns one
contribution: :meth:`ProfileStore.save_contribution` and :meth:`ProfileStore.update` read, change
and write the file under an exclusive lock, so a writer never puts back an old copy of another
writer's contribution.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import msgpack

from .profile import Profile
from .state_dir import StateDir, atomic_write
from .workload import Workload


class ProfileStoreError(Exception):
    """A profile file that cannot be read or written."""


class ProfileStore:
    SUFFIX = ".msgpack"

    def __init__(self, state_dir: str | os.PathLike):
        self.layout = StateDir(state_dir)
        self.root = self.layout.profiles

    def path_for(self, workload: Workload) -> Path:
        return self.layout.profile(workload.key)

    def save(self, profile: Profile) -> Path:
        path = self.path_for(profile.workload)
        atomic_write(path, msgpack.packb(profile.pack(), use_bin_type=True))
        return path

    @contextmanager
    def _locked(self, workload: Workload):
        """The workload's exclusive lock, for a read, change and write of its file."""
        lock = self.layout.profile_lock(workload.key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(self, workload: Workload, change: Callable[[Profile], None]) -> Profile:
        """Under the workload's lock: load the stored profile (or start one), apply ``change``
        to it, write it; returns what was written."""
        with self._locked(workload):
            profile = self.load(workload) or Profile(workload)
            change(profile)
            self.save(profile)
            return profile

    def save_contribution(self, profile: Profile, node: str) -> Profile:
        """Write ``profile``'s contribution ``node`` and keep every other contribution as it is
        stored; ``profile`` is refreshed with the stored ones."""
        mine = profile.nodes[node]

        def put(stored: Profile) -> None:
            stored.nodes[node] = mine

        stored = self.update(profile.workload, put)
        profile.nodes.update(stored.nodes)
        return stored

    def remove_contribution(self, workload: Workload, node: str) -> None:
        """Under the workload's lock: drop contribution ``node``; the file goes with the last one."""
        with self._locked(workload):
            profile = self.load(workload)
            if profile is None:
                return
            profile.nodes.pop(node, None)
            if profile.nodes:
                self.save(profile)
            else:
                self.remove(workload)

    def load(self, workload: Workload) -> Profile | None:
        path = self.path_for(workload)
        if not path.exists():
            return None
        return self.load_path(path)

    @staticmethod
    def load_path(path: Path) -> Profile:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ProfileStoreError(f"{path}: cannot read: {e.strerror}") from e
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            return Profile.unpack(data)
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
            raise ProfileStoreError(
                f"{path}: corrupt or truncated profile ({type(e).__name__}: {e}); file left in place"
            ) from e

    def workloads(self) -> list[Workload]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*" + self.SUFFIX)):
            key = StateDir.workload_of(p.name, self.SUFFIX)
            try:
                out.append(Workload.parse(key or ""))
            except ValueError:
                continue
        return sorted(out)

    def find(self, name: str) -> list[Workload]:
        """Workloads matching a full key, ``namespace/name``, or a bare name."""
        matches = []
        for w in self.workloads():
            if name in (w.key, w.name, f"{w.namespace}/{w.name}", f"{w.namespace}/{w.kind}/{w.name}"):
                matches.append(w)
        return matches

    def remove(self, workload: Workload) -> None:
        self.path_for(workload).unlink(missing_ok=True)
