"""Profile store: one msgpack file per workload under ``<state-dir>/profiles/``.

Writes are atomic (:func:`sensor.state_dir.atomic_write`). A corrupt or truncated file raises :class:`ProfileStoreError` naming the file, and
the file is left where it is for inspection.
"""

from __future__ import annotations

import os
from pathlib import Path

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
