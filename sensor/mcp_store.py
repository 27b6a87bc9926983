"""MCP argument evidence on disk: one msgpack file per workload under ``<state-dir>/mcp/``.

The profile holds each MCP behaviour's counts, sessions and first/last seen; the argument values
behind them (:class:`sensor.mcp_evidence.ArgumentEvidence`) are kept here, written atomically
like profiles. A file that does not read raises :class:`McpStoreError` naming it and is left in
place. Each gateway run merges its evidence into the stored one under an exclusive lock, so runs
in parallel never lose each other's evidence.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import msgpack

from .mcp_evidence import ArgumentEvidence
from .state_dir import StateDir, atomic_write, private_dirs
from .workload import Workload

SCHEMA_VERSION = 1


class McpStoreError(Exception):
    """An evidence file that cannot be read or written."""


class McpEvidenceStore:
    SUFFIX = ".msgpack"

    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir) / "mcp"

    def path_for(self, workload: Workload) -> Path:
        return self.root / StateDir.workload_name(workload.key, self.SUFFIX)

    def load(self, workload: Workload) -> ArgumentEvidence | None:
        path = self.path_for(workload)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise McpStoreError(f"{path}: cannot read: {e.strerror}") from e
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
                raise ValueError(f"unsupported schema {data.get('schema') if isinstance(data, dict) else None!r}")
            return ArgumentEvidence.unpack(data["evidence"])
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
            raise McpStoreError(f"{path}: corrupt or truncated evidence ({type(e).__name__}: {e}); "
                                f"file left in place") from e

    def merge(self, workload: Workload, evidence: ArgumentEvidence) -> Path:
        """Add ``evidence`` to what is stored for ``workload``."""
        path = self.path_for(workload)
        private_dirs(path.parent)
        fd = os.open(path.parent / (path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stored = self.load(workload)
            merged = evidence if stored is None else stored.merged(evidence)
            body = {"schema": SCHEMA_VERSION, "workload": workload.to_dict(), "evidence": merged.pack()}
            atomic_write(path, msgpack.packb(body, use_bin_type=True))
        finally:
            os.close(fd)
        return path
