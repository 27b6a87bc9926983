"""Contributions that other processes on the node write to its profile store (MCP gateways), for
the daemon to publish beside its own.

The daemon publishes what its aggregator holds: the kernel's view of each workload, under the
node's name. A gateway (``envelope mcp wrap``/``proxy``) writes its own contribution,
``<node>/mcp`` (:func:`sensor.mcp_sink.gateway_contribution`), to the same store. So that it
reaches the cluster too, the gateway marks each contribution it flushed (:func:`mark`): one small
file per (workload, contribution) in ``<state>/outbox/``, rewritten at each flush, holding the
workload and the contribution's name. At each of its flushes the daemon's :class:`Outbox` looks
at the markers (one ``stat`` each), and for a marker that changed since it last looked loads the
workload's stored profile and hands the contribution on (:meth:`Outbox.changed`). Only
contributions of this node (``<node>/...``) are taken, never the node's own (the aggregator's):
what a marker names cannot replace the kernel's evidence.

A gateway and the daemon share the node's state directory for this (a ``hostPath`` in a pod);
a gateway without it keeps its evidence in its own state directory, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from .profile import NodeContribution
from .state_dir import StateDir, atomic_write, private_dirs, read_trusted
from .store import ProfileStore, ProfileStoreError
from .workload import Workload

log = structlog.get_logger(__name__)

SUFFIX = ".json"


def mark(state_dir, workload: Workload, contribution: str) -> Path:
    """Say that ``contribution`` of ``workload``'s stored profile changed (after it was written)."""
    d = private_dirs(StateDir(state_dir).outbox)
    path = d / StateDir.workload_name(f"{workload.key}\n{contribution}", SUFFIX)
    atomic_write(path, json.dumps({"workload": workload.to_dict(), "contribution": contribution},
                                  sort_keys=True).encode())
    return path


class Outbox:
    """The daemon's reader of the markers (see the module docstring)."""

    def __init__(self, state_dir, node: str, store: ProfileStore | None = None):
        self.state_dir = state_dir
        self.node = node
        self.store = store or ProfileStore(state_dir)
        self._seen: dict[str, tuple] = {}  # marker name -> its stat signature when last taken
        self.problems = 0

    def changed(self) -> dict[Workload, dict[str, NodeContribution]]:
        """This node's gateway contributions whose markers changed since the last call."""
        try:
            entries = list(os.scandir(StateDir(self.state_dir).outbox))
        except FileNotFoundError:
            return {}
        out: dict[Workload, dict[str, NodeContribution]] = {}
        present = set()
        for entry in entries:
            if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                continue
            present.add(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            sig = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)  # writers rename: a new inode
            if self._seen.get(entry.name) == sig:
                continue
            self._seen[entry.name] = sig
            found = self._take(Path(entry.path))
            if found is not None:
                workload, contribution = found
                out.setdefault(workload, {})[contribution.node] = contribution
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return out

    def _take(self, path: Path) -> tuple[Workload, NodeContribution] | None:
        try:
            marker = json.loads(read_trusted(path, StateDir(self.state_dir).root))
            workload = Workload.from_dict(marker["workload"])
            name = str(marker["contribution"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problems += 1
            log.warning("outbox marker not usable", marker=str(path), error=str(e))
            return None
        if not name.startswith(self.node + "/"):
            return None  # another node's, or the node's own (the aggregator publishes that one)
        try:
            profile = self.store.load(workload)
        except ProfileStoreError as e:
            self.problems += 1
            log.warning("outbox: stored profile not usable", workload=workload.key, error=str(e))
            return None
        contribution = profile.nodes.get(name) if profile is not None else None
        if contribution is None:
            return None
        return workload, contribution
