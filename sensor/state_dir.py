"""The state directory: where everything Envelope keeps on a node lives, and how it is written.

One :class:`StateDir` names every path; nothing else joins names onto the state directory::

    <state-dir>/
      profiles/<workload>.msgpack           per-workload profiles (sensor.store)
      profiles/.<workload>.lock             the lock writers of one profile take (sensor.store)
      profiles/archive/<UTC time>/          profiles set aside by a re-baseline
      enforce/<workload>.yaml               desired enforcement states (enforcer.desired)
      enforce/modes/<workload>.json         per-workload mode and re-baseline (enforcer.state)
      enforce/exceptions.json               exceptions (enforcer.exceptions)
      enforce/.lock                         the lock for read-modify-write changes
      violations.jsonl                      violations (enforcer.violations)
      audit.jsonl, audit.head               the hash-chained audit log (enforcer.audit)
      cluster/                              what the cluster side remembers across restarts

``<workload>`` is the workload key, percent-quoted (:meth:`StateDir.workload_name`).

:func:`atomic_write` is the one way files here are written: a reader sees the old file or the
new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a mix:
    a temporary file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateDir:
    """The layout of one state directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r})"

    # -- workload file names --

    @staticmethod
    def workload_name(workload_key: str, suffix: str) -> str:
        return quote(workload_key, safe="") + suffix

    @staticmethod
    def workload_of(filename: str, suffix: str) -> str | None:
        """The workload key a file name was made from, or None if it is not such a name."""
        if not filename.endswith(suffix) or filename.startswith("."):
            return None
        return unquote(filename[: -len(suffix)])

    # -- paths --

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def profile_archive(self) -> Path:
        return self.profiles / "archive"

    @property
    def enforce(self) -> Path:
        return self.root / "enforce"

    @property
    def modes(self) -> Path:
        return self.enforce / "modes"

    @property
    def exceptions(self) -> Path:
        return self.enforce / "exceptions.json"

    @property
    def lock(self) -> Path:
        return self.enforce / ".lock"

    @property
    def violations(self) -> Path:
        return self.root / "violations.jsonl"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def audit_head(self) -> Path:
        return self.root / "audit.head"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    def profile(self, workload_key: str) -> Path:
        return self.profiles / self.workload_name(workload_key, ".msgpack")

    def profile_lock(self, workload_key: str) -> Path:
        return self.profiles / ("." + self.workload_name(workload_key, ".lock"))

    def desired(self, workload_key: str) -> Path:
        return self.enforce / self.workload_name(workload_key, ".yaml")

    def mode(self, workload_key: str) -> Path:
        return self.modes / self.workload_name(workload_key, ".json")
