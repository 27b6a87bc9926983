"""The sensor pump: probe → decode → resolve → aggregate, written once for every user.

:class:`Pump` drives one attached :class:`sensor.probes.Sensor` into one
:class:`sensor.aggregate.Aggregator`: it drains the ring buffer (at most ``batch`` records and
``budget`` seconds a step, in chunks of :data:`CHUNK`, so counter reads and flushes happen on
time under any event rate: what is not drained waits in the ring, and what the ring cannot hold
is counted as lost), binds each new cgroup
to a workload session at first sight, reads the kernel's cumulative counters (syscalls, network
destinations, exec paths, and what each cgroup dropped beyond its caps) every
``counts_interval`` seconds, accounts for lost events, and closes the sessions of cgroups that
are gone.

Loss is charged only to the workload that lost it: what the kernel counted against a bound
cgroup (:meth:`sensor.probes.Sensor.cgroup_loss`) goes to that cgroup's profile; the node's
counters (:meth:`sensor.probes.Sensor.loss`, which include loss no cgroup can be named for) are
reported per step (``StepStats.loss``, the daemon's metrics) and in :attr:`Pump.node_loss`, and
are never charged to a profile. What a session *is* comes from the binding passed in:

* :class:`NodeBinding`: every cgroup of the node, each resolved to its workload by the identity
  resolver (``envelope daemon``, ``envelope top``);
* :class:`TreeBinding`: one cgroup and everything below it as one session of one workload
  (``envelope record``'s command, ``envelope exec``'s command).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import structlog

from .aggregate import Aggregator
from .cgroup import CgroupError, cgroup_id
from .workload import Workload

log = structlog.get_logger("envelope.pump")

DEFAULT_BATCH = 65536  # ring records per step at most
DEFAULT_BUDGET = 0.25  # seconds of draining per step at most (checked between chunks)
CHUNK = 4096  # ring records drained between two looks at the clock


@dataclass
class StepStats:
    events: int = 0
    by_type: dict = field(default_factory=dict)
    new_cgroups: int = 0
    closed_cgroups: int = 0
    completed: int = 0  # cgroups whose identity became known and whose evidence moved
    loss: dict = field(default_factory=dict)  # the node's loss counters that moved (not charged)
    cgroup_loss: dict = field(default_factory=dict)  # cgroup id -> loss charged to its profile
    counters_read: bool = False


class Binding(Protocol):
    """Which cgroups a pump's sessions are made of."""

    paths: dict[int, str]  # bound cgroup id -> absolute path
    image_only: set[int]  # cgroups counted from their first exec (a runtime's setup left out)

    def bind(self, cgroup_id: int, agg: Aggregator) -> bool:
        """Bind ``cgroup_id`` to a session at first sight; False if it is not tracked."""

    def discover(self, sensor) -> Iterable[int]:
        """Cgroups to bind before a counter read (they may not have sent an event yet)."""

    def gone(self) -> list[int]:
        """Bound cgroups that no longer exist."""

    def forget(self, cgroup_id: int) -> None:
        """A cgroup that is gone: never bind it again (cgroup ids are not reused)."""

    def refresh(self, agg: Aggregator, cgroups: Iterable[int] | None = None) -> int:
        """Look again at bound cgroups whose identity is incomplete (all, or ``cgroups``) and
        move their sessions when it became known; returns how many moved."""


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


class NodeBinding:
    """Every cgroup on the node, attributed to its workload by ``resolver``
    (:class:`sensor.identity.Resolver`); one session per container instance or host cgroup."""

    def __init__(self, resolver, ignore_cgroups: Iterable[int] = (),
                 on_bind: Callable | None = None):
        self.resolver = resolver
        self.ignored: set[int] = set(ignore_cgroups)
        self.on_bind = on_bind
        self.paths: dict[int, str] = {}
        self.image_only: set[int] = set()
        # bound cgroups whose identity may still improve (runtime state not written yet when the
        # cgroup was first seen, or the API has not described the pod yet)
        self.incomplete: set[int] = set()

    def _may_improve(self, ident) -> bool:
        from .identity import is_complete
        if ident.container is None:
            return False
        return not is_complete(ident) or (self.resolver.kube is not None and ident.source != "kube")

    def bind(self, cgroup_id: int, agg: Aggregator) -> bool:
        if cgroup_id in agg.bindings:
            return True
        if cgroup_id in self.ignored:
            return False
        ident = self.resolver.resolve(cgroup_id)
        if ident is None or ident.source == "unresolved":
            self.ignored.add(cgroup_id)
            return False
        meta = session_meta(ident)
        why = self.resolver.why(cgroup_id)
        if why:
            meta["identity_incomplete"] = why
        agg.bind(cgroup_id, ident.workload, session_of(ident), meta=meta,
                 fingerprints=ident.fingerprints)
        if ident.cgroup_path:
            self.paths[cgroup_id] = str(self.resolver.cgroupfs.abspath(ident.cgroup_path))
        if ident.container is not None:
            # Container cgroups count from their first exec: the runtime's setup before it
            # (runc init's mounts, unshare, pivot_root...) is not the workload's behaviour.
            self.image_only.add(cgroup_id)
        if self._may_improve(ident):
            self.incomplete.add(cgroup_id)
        if self.on_bind:
            self.on_bind(cgroup_id, ident)
        return True

    def refresh(self, agg: Aggregator, cgroups: Iterable[int] | None = None) -> int:
        moved = 0
        for cg in sorted(self.incomplete if cgroups is None else set(cgroups) & self.incomplete):
            ident = self.resolver.refresh(cg)
            if ident is not None:
                agg.rebind(cg, ident.workload, session_of(ident), meta=session_meta(ident),
                           fingerprints=ident.fingerprints)
                moved += 1
                if self.on_bind:  # e.g. attach the enforcement of the workload it turned out to be
                    self.on_bind(cg, ident)
                if not self._may_improve(ident):
                    self.incomplete.discard(cg)
        return moved

    def unresolved(self) -> dict[str, int]:
        """Bound cgroups whose identity is still incomplete, by reason."""
        out: dict[str, int] = {}
        for cg in self.incomplete:
            why = self.resolver.why(cg) or "incomplete"
            out[why] = out.get(why, 0) + 1
        return out

    def discover(self, sensor) -> Iterable[int]:
        return sensor.cgroup_slots()

    def gone(self) -> list[int]:
        return [cg for cg, path in self.paths.items() if not os.path.isdir(path)]

    def forget(self, cgroup_id: int) -> None:
        self.paths.pop(cgroup_id, None)
        self.image_only.discard(cgroup_id)
        self.incomplete.discard(cgroup_id)  # gone: it keeps what its path and annotations told
        self.ignored.add(cgroup_id)
        if len(self.ignored) > 65536:
            self.ignored = set(sorted(self.ignored)[-32768:])


class TreeBinding:
    """One cgroup (``root``, absolute path) and every cgroup below it: one session of one
    workload, counted from the command's exec (the launcher's own calls before it are not the
    workload's)."""

    def __init__(self, root: str, workload: Workload, session: str, meta: dict | None = None,
                 fingerprints: dict | None = None):
        self.root = str(root)
        self.workload = workload
        self.session = session
        self.meta = dict(meta or {})
        self.fingerprints = dict(fingerprints or {})
        self.root_id = cgroup_id(self.root)
        self.paths: dict[int, str] = {}
        self.image_only: set[int] = {self.root_id}
        self._members: dict[int, str] = {self.root_id: self.root}
        self._others: set[int] = set()

    def _walk(self) -> None:
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                cid = cgroup_id(dirpath)
            except CgroupError:
                continue
            self._members.setdefault(cid, dirpath)

    def bind(self, cgroup_id: int, agg: Aggregator) -> bool:
        if cgroup_id in agg.bindings:
            return True
        if cgroup_id not in self._members:
            if cgroup_id in self._others:
                return False
            self._walk()  # a child cgroup made since the last look?
            if cgroup_id not in self._members:
                self._others.add(cgroup_id)
                return False
        if cgroup_id == self.root_id:
            agg.bind(cgroup_id, self.workload, self.session, meta=self.meta,
                     fingerprints=self.fingerprints)
        else:
            agg.bind(cgroup_id, self.workload, self.session)
        self.paths[cgroup_id] = self._members[cgroup_id]
        return True

    def discover(self, sensor) -> Iterable[int]:
        self._walk()
        return list(self._members)

    def gone(self) -> list[int]:
        return []  # the owner removes the tree when the command is done

    def forget(self, cgroup_id: int) -> None:
        self.paths.pop(cgroup_id, None)

    def refresh(self, agg: Aggregator, cgroups: Iterable[int] | None = None) -> int:
        return 0  # the session's identity is given


class Pump:
    def __init__(self, sensor, binding: Binding, aggregator: Aggregator,
                 counts_interval: float = 1.0, gc_interval: float = 5.0,
                 batch: int = DEFAULT_BATCH, budget: float = DEFAULT_BUDGET,
                 clock=time.monotonic):
        self.sensor = sensor
        self.binding = binding
        self.agg = aggregator
        self.counts_interval = counts_interval
        self.gc_interval = gc_interval
        self.batch = batch
        self.budget = budget
        self.clock = clock
        self._next_counts = 0.0
        self._next_gc = clock() + gc_interval
        self._loss_seen: dict[str, int] = dict(sensor.loss()) if sensor is not None else {}
        self._unwatched: set[int] = set()  # bound, not yet watched by the extensions
        self._cgroup_loss_seen: dict[int, dict[str, int]] = {}
        self.node_loss: dict[str, int] = {}  # the node's loss counters' growth since the start
        self.loss_charged: dict[str, int] = {}  # loss charged to the bound cgroups' profiles
        # Extensions that rename behaviours (sensor.dns: connects to resolved names) take part
        # in aggregation.
        for ext in getattr(sensor, "extensions", ()):
            make = getattr(ext, "attributor", None)
            if make is not None:
                aggregator.attributors.append(make())
        if sensor is not None:  # sessions record the marked substrates their sensor observes
            aggregator.observed = tuple(sensor.observed_substrates())

    @property
    def paths(self) -> dict[int, str]:
        return self.binding.paths

    def bind(self, cg: int, st: StepStats | None = None) -> bool:
        """Bind ``cg`` to its session (at first sight) and have the sensor's extensions watch it
        (request capture and the like follow the workloads' cgroups only)."""
        before = len(self.agg.bindings)
        ok = self.binding.bind(cg, self.agg)
        new = len(self.agg.bindings) - before
        if st is not None:
            st.new_cgroups += new
        if new and self.sensor is not None:
            if cg in getattr(self.binding, "incomplete", ()):
                # A container before its first exec is its runtime setting it up. Attaching the
                # extensions' programs takes milliseconds, and a short-lived container's runtime
                # state may be gone by the time its first exec is read: look it up first.
                self._unwatched.add(cg)
            else:
                self.sensor.watch_cgroup(cg, self.binding.paths.get(cg))
        return ok

    def _watch_pending(self, cgroups: Iterable[int] | None = None) -> None:
        for cg in sorted(self._unwatched if cgroups is None else self._unwatched & set(cgroups)):
            self._unwatched.discard(cg)
            if cg in self.agg.bindings:
                self.sensor.watch_cgroup(cg, self.binding.paths.get(cg))

    def _bind(self, cg: int, st: StepStats) -> bool:
        return self.bind(cg, st)

    def step(self, timeout_ms: int = 100) -> StepStats:
        """Drain (up to ``batch`` records and ``budget`` seconds, waiting up to ``timeout_ms``
        for the first); read the counters and account loss when due; close the sessions of
        cgroups that are gone."""
        st = StepStats()
        start = self.clock()
        chunk = min(CHUNK, self.batch)
        events = self.sensor.poll(timeout_ms, chunk)
        self._aggregate(events, st)
        while (len(events) >= chunk and st.events < self.batch
               and self.clock() - start < self.budget):
            events = self.sensor.poll(0, min(chunk, self.batch - st.events))
            self._aggregate(events, st)
        now = self.clock()
        flooded = st.events >= self.batch or now - start >= self.budget
        if now >= self._next_counts:
            self._next_counts = now + self.counts_interval
            self.read_counters(st, drain=not flooded)
        if now >= self._next_gc:
            self._next_gc = now + self.gc_interval
            st.closed_cgroups = self.collect_gone()
        return st

    def _aggregate(self, events, st: StepStats) -> None:
        wall = self.sensor.wall_time
        for ev in events:
            st.events += 1
            kind = type(ev).__name__
            st.by_type[kind] = st.by_type.get(kind, 0) + 1
            cg = getattr(ev, "cgroup_id", None)
            if cg is not None and self._bind(cg, st):
                if kind in ("ExecFirstEvent", "ExecEvent") and cg in getattr(
                        self.binding, "incomplete", ()):
                    # a container's first exec: its runtime has written its state by now
                    st.completed += self.binding.refresh(self.agg, [cg])
                if cg in self._unwatched and kind in ("ExecFirstEvent", "ExecEvent"):
                    self._watch_pending([cg])
                self.agg.on_event(ev, wall(ev.ktime))

    def read_counters(self, st: StepStats | None = None, drain: bool = True) -> StepStats:
        """Bind new cgroups first, so a container's first reading is already restricted to what
        it did from its first exec; then add the counter deltas and the loss since last time.
        ``drain``: read the rings between taking the counters and applying them (see below);
        a step stopped by its batch or budget (a flood) does not."""
        st = st or StepStats()
        for cg in self.binding.discover(self.sensor):
            self._bind(cg, st)
        st.completed += self.binding.refresh(self.agg)
        self._watch_pending()  # a container whose first exec was not announced
        counts = self.sensor.syscall_counts(after_exec=self.binding.image_only)
        refused = self.sensor.refused_counts(after_exec=self.binding.image_only)
        keys = self.sensor.behaviour_counts(changed_only=True, after_exec=self.binding.image_only)
        # What explains a counted behaviour was committed to a ring before the kernel counted it
        # (a DNS answer before the connect that used it): drain the rings now, after taking the
        # counters and before applying them, so it is seen first. Under a flood a step keeps its
        # budget instead, and a name may be missed.
        room = min(CHUNK, self.batch - st.events)
        if drain and room > 0:
            self._aggregate(self.sensor.poll(0, room), st)
        self.agg.on_counts(counts, time.time())
        self.agg.on_refused_counts(refused)
        self.agg.on_key_counts(keys)
        self.agg.on_dropped(self.sensor.dropped_counts())
        st.loss = self._loss_delta()
        for k, v in st.loss.items():
            self.node_loss[k] = self.node_loss.get(k, 0) + v
        for cg, delta in self._cgroup_loss_delta().items():
            b = self.agg.bindings.get(cg)
            if b is None:
                continue  # not a session of this pump: never charged to one
            self.agg.add_loss(delta, [b.workload])
            st.cgroup_loss[cg] = delta
            for k, v in delta.items():
                self.loss_charged[k] = self.loss_charged.get(k, 0) + v
        st.counters_read = True
        return st

    def finish(self, rounds: int = 3) -> StepStats:
        """What is left after the workload stopped: drain until quiet, read counters once more."""
        st = StepStats()
        for _ in range(rounds):
            events = self.sensor.poll(50, self.batch)
            self._aggregate(events, st)
            if not events:
                break
        self.read_counters(st)
        return st

    def _loss_delta(self) -> dict[str, int]:
        cur = self.sensor.loss()
        delta = {k: v - self._loss_seen.get(k, 0) for k, v in cur.items()
                 if v > self._loss_seen.get(k, 0)}
        self._loss_seen = dict(cur)
        return delta

    def _cgroup_loss_delta(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for cg, per in self.sensor.cgroup_loss().items():
            seen = self._cgroup_loss_seen.setdefault(cg, {})
            delta = {k: v - seen.get(k, 0) for k, v in per.items() if v > seen.get(k, 0)}
            seen.update(per)
            if delta:
                out[cg] = delta
        return out

    def collect_gone(self) -> int:
        """Close the sessions of cgroups that no longer exist and free their kernel slots."""
        gone = self.binding.gone()
        for cg in gone:
            self.agg.unbind(cg)
            self.sensor.forget_cgroup(cg)
            self.binding.forget(cg)
            self._cgroup_loss_seen.pop(cg, None)  # its slot's counters go with it
        return len(gone)

    def release(self) -> None:
        """Free the kernel counter slots of every bound cgroup (a recording or exec is done)."""
        for cg in list(self.binding.paths):
            self.sensor.forget_cgroup(cg)
