"""Node-wide observation: every cgroup on the host, attributed to its workload.

``NodeObserver.step()`` drains the ring buffer, reads the cumulative syscall counters, binds each
new cgroup id to a workload session at its first sight (the identity resolver caches the
answer: short-lived containers vanish), closes sessions whose cgroups are gone, and accounts for
lost events. The daemon and ``envelope top`` both drive it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

from sensor.aggregate import Aggregator

log = structlog.get_logger("envelope.node")


@dataclass
class StepStats:
    events: int = 0
    by_type: dict = field(default_factory=dict)
    new_cgroups: int = 0
    closed_cgroups: int = 0
    loss: dict = field(default_factory=dict)


def session_of(ident) -> str:
    """A container instance is one session; a host cgroup's lifetime is one session."""
    if ident.container is not None:
        return ident.container.container_id
    return f"cgroup-{ident.cgroup_id}"


def session_meta(ident) -> dict:
    meta = {"cgroup": ident.cgroup_path, "source": ident.source}
    for k in ("pod_name", "namespace", "container_name", "pod_uid"):
        v = getattr(ident, k)
        if v:
            meta[k] = v
    return meta


class NodeObserver:
    def __init__(self, sensor, resolver, aggregator: Aggregator, poll_interval: float = 1.0,
                 ignore_cgroups: set[int] | None = None, gc_interval: float = 5.0,
                 on_bind: Callable | None = None):
        self.sensor = sensor
        self.resolver = resolver
        self.agg = aggregator
        self.poll_interval = poll_interval
        self.gc_interval = gc_interval
        self.ignored: set[int] = set(ignore_cgroups or ())
        self.paths: dict[int, str] = {}
        # Container cgroups count from their first exec: the runtime's setup before it (runc
        # init's mounts, unshare, pivot_root...) is not the workload's behaviour.
        self.image_only: set[int] = set()
        self.on_bind = on_bind
        self._next_counts = 0.0
        self._next_gc = 0.0
        self._loss_seen: dict[str, int] = {}

    def ensure_bound(self, cgroup_id: int) -> bool:
        """Bind a cgroup to its workload session at first sight; False if it is not tracked."""
        if cgroup_id in self.agg.bindings:
            return True
        if cgroup_id in self.ignored:
            return False
        ident = self.resolver.resolve(cgroup_id)
        if ident is None or ident.source == "unresolved":
            self.ignored.add(cgroup_id)
            return False
        self.agg.bind(cgroup_id, ident.workload, session_of(ident), meta=session_meta(ident),
                      fingerprints=ident.fingerprints)
        if ident.cgroup_path:
            self.paths[cgroup_id] = str(self.resolver.cgroupfs.abspath(ident.cgroup_path))
        if ident.container is not None:
            self.image_only.add(cgroup_id)
        if self.on_bind:
            self.on_bind(cgroup_id, ident)
        return True

    def step(self, timeout_ms: int = 100) -> StepStats:
        st = StepStats()
        events = self.sensor.poll(timeout_ms)
        for ev in events:
            st.events += 1
            kind = type(ev).__name__
            st.by_type[kind] = st.by_type.get(kind, 0) + 1
            cg = getattr(ev, "cgroup_id", None)
            if cg is None:
                continue
            before = len(self.agg.bindings)
            if self.ensure_bound(cg):
                st.new_cgroups += len(self.agg.bindings) - before
                self.agg.on_event(ev, self.sensor.wall_time(ev.ktime))
        now = time.monotonic()
        if now >= self._next_counts:
            self._next_counts = now + self.poll_interval
            # Bind new cgroups before reading, so a container's first reading is already
            # restricted to what it did from its first exec.
            for cg in self.sensor.cgroup_slots():
                before = len(self.agg.bindings)
                self.ensure_bound(cg)
                st.new_cgroups += len(self.agg.bindings) - before
            counts = self.sensor.syscall_counts(after_exec=self.image_only)
            self.agg.on_counts(counts, time.time())
            st.loss = self._loss_delta()
            if st.loss:
                self.agg.add_loss(st.loss)
        if now >= self._next_gc:
            self._next_gc = now + self.gc_interval
            st.closed_cgroups = self.collect_gone()
        return st

    def _loss_delta(self) -> dict[str, int]:
        cur = self.sensor.loss()
        delta = {k: v - self._loss_seen.get(k, 0) for k, v in cur.items() if v > self._loss_seen.get(k, 0)}
        self._loss_seen = dict(cur)
        return delta

    def collect_gone(self) -> int:
        """Close the sessions of cgroups that no longer exist and free their kernel slots."""
        gone = [cg for cg, path in self.paths.items() if not os.path.isdir(path)]
        for cg in gone:
            self.agg.unbind(cg)
            self.sensor.forget_cgroup(cg)
            self.paths.pop(cg, None)
            self.image_only.discard(cg)
            # Cgroup ids are never reused: late events for a removed cgroup must not open a new
            # session for it. Its kernel slot was freed above.
            self.ignored.add(cg)
        if len(self.ignored) > 65536:
            self.ignored = set(sorted(self.ignored)[-32768:])
        return len(gone)
