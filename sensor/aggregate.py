"""Aggregation: decoded events and cumulative counter readings → per-workload profiles.

The aggregator knows which session each cgroup belongs to (a *binding*), turns kernel counter
readings into deltas (the kernel counters are cumulative and never drained), and adds each
behaviour to the profile of the bound workload in this node's contribution.

It holds no kernel handles: the caller feeds it ``on_event`` / ``on_counts`` and decides when to
``flush``. The same code serves ``envelope record`` (one cgroup tree, one session) and the daemon
(every cgroup, sessions from the identity resolver).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import structlog

from .profile import DEFAULT_CAPS, Profile
from .store import ProfileStore, ProfileStoreError
from .workload import Workload, syscall_key

log = structlog.get_logger("envelope.aggregate")

SyscallName = Callable[[int], str]


@dataclass
class Binding:
    workload: Workload
    session: str


@dataclass(frozen=True)
class KeyReading:
    """One behaviour counted in the kernel for one cgroup: the cumulative count and when it was
    first and last seen (wall seconds). Counters are never drained: the aggregator takes deltas."""

    count: int
    first_seen: float
    last_seen: float


@dataclass
class Rates:
    """Per-workload event totals, for ``top`` and metrics."""

    syscalls: int = 0
    execs: int = 0
    connects: int = 0
    new_behaviours: int = 0
    by_type: dict = field(default_factory=dict)


class Aggregator:
    def __init__(self, node: str, store: ProfileStore | None, syscall_name: SyscallName,
                 caps: dict | None = None, clock: Callable[[], float] = time.time):
        self.node = node
        self.store = store
        self.syscall_name = syscall_name
        self.caps = dict(caps or DEFAULT_CAPS)
        self.clock = clock
        self.bindings: dict[int, Binding] = {}
        self.profiles: dict[Workload, Profile] = {}
        self.totals: dict[Workload, Rates] = {}
        self.dirty: set[Workload] = set()
        self.dropped: set[Workload] = set()  # emptied by a rebind: removed from the store at flush
        self._last_counts: dict[int, dict[int, int]] = {}
        self._last_key_counts: dict[int, dict[str, int]] = {}
        self._last_refused: dict[int, dict[str, int]] = {}
        self._first_seen_at: dict[tuple[int, int], float] = {}
        self._session_cgroups: dict[tuple[Workload, str], set[int]] = {}
        # Called as listener(workload, session, key, count, ts) for every behaviour added, and
        # as listener(workload, session, None, 0, ts) when a session closes (detection uses it).
        self.listeners: list[Callable] = []
        # Attributors see every event in order (attributor.on_event(event, ts)) and may name a
        # behaviour differently: attributor.attribute(cgroup_id, key, ts) -> (key, evidence or
        # None), e.g. a connect to an address this cgroup received in a DNS answer becomes a
        # connect to that name, the address kept as evidence (sensor.dns).
        self.attributors: list = []
        # Substrates whose observation sessions record (sensor.workload.MARKED_SUBSTRATES): set by
        # whoever feeds this aggregator (the pump, from its sensor), written into each session's
        # meta as ``observed`` when it is bound.
        self.observed: tuple[str, ...] = ()
        # Fingerprint inputs observed at run time (the model a workload's requests asked for),
        # per cgroup: key -> the values seen, for stale detection beside the annotations.
        self.runtime_fingerprints: dict[int, dict[str, set]] = {}

    # ---- profiles --------------------------------------------------------------------------

    def profile(self, workload: Workload) -> Profile:
        p = self.profiles.get(workload)
        if p is None:
            p = self._load(workload)
            p = p or Profile(workload)
            p.node(self.node).caps = dict(self.caps)
            self.profiles[workload] = p
        return p

    def _load(self, workload: Workload) -> Profile | None:
        """The stored profile; one that cannot be read is quarantined (moved aside, logged and
        reported by the store) and the workload starts afresh: one bad file never stops the
        aggregation of anything."""
        if self.store is None:
            return None
        try:
            return self.store.load(workload)
        except ProfileStoreError as e:
            self.store.quarantine(self.store.path_for(workload), str(e))
            return None

    def _contribution(self, workload: Workload):
        return self.profile(workload).node(self.node)

    # ---- sessions --------------------------------------------------------------------------

    def bind(self, cgroup_id: int, workload: Workload, session: str, start: float | None = None,
             meta: dict | None = None, fingerprints: dict | None = None) -> None:
        """Attribute everything cgroup ``cgroup_id`` does to ``session`` of ``workload``."""
        now = self.clock() if start is None else start
        meta = self._with_observed(meta)
        self.bindings[cgroup_id] = Binding(workload, session)
        self._session_cgroups.setdefault((workload, session), set()).add(cgroup_id)
        contrib = self._contribution(workload)
        contrib.open_session(session, now, meta)
        for k, v in (fingerprints or {}).items():
            contrib.add_fingerprint(k, str(v), now)
        self.totals.setdefault(workload, Rates())
        self.dirty.add(workload)

    def rebind(self, cgroup_id: int, workload: Workload, session: str, meta: dict | None = None,
               fingerprints: dict | None = None) -> bool:
        """The cgroup's identity became known (or changed): what was counted for its session
        moves to the session of ``workload``, nothing lost or counted twice, and what it does from
        now on goes there. A profile that is left empty is dropped. Returns whether anything
        moved."""
        b = self.bindings.get(cgroup_id)
        if b is None:
            self.bind(cgroup_id, workload, session, meta=meta, fingerprints=fingerprints)
            return False
        if b.workload == workload and b.session == session:
            return False
        members = self._session_cgroups.get((b.workload, b.session), set())
        old = self._contribution(b.workload)
        new = self._contribution(workload)
        moved = False
        if members == {cgroup_id}:
            moved = old.move_session(b.session, new, session)
            self._session_cgroups.pop((b.workload, b.session), None)
        else:
            members.discard(cgroup_id)
        self.bindings[cgroup_id] = Binding(workload, session)
        self._session_cgroups.setdefault((workload, session), set()).add(cgroup_id)
        now = self.clock()
        new.open_session(session, now, self._with_observed(meta))
        for k, v in (fingerprints or {}).items():
            new.add_fingerprint(k, str(v), now)
        self.totals.setdefault(workload, Rates())
        self.dirty.update((workload, b.workload))
        if old.empty and all(c.empty for c in self.profile(b.workload).nodes.values()):
            self.profiles.pop(b.workload, None)
            self.dirty.discard(b.workload)
            self.totals.pop(b.workload, None)
            self.dropped.add(b.workload)
        return moved

    def _with_observed(self, meta: dict | None) -> dict | None:
        if not self.observed:
            return meta
        return {**(meta or {}), "observed": sorted(set(self.observed) | set((meta or {}).get("observed") or ()))}

    def unbind(self, cgroup_id: int, end: float | None = None, meta: dict | None = None) -> None:
        """The cgroup is gone; close its session when it was the session's last cgroup."""
        b = self.bindings.pop(cgroup_id, None)
        self.runtime_fingerprints.pop(cgroup_id, None)
        self._last_counts.pop(cgroup_id, None)
        self._last_key_counts.pop(cgroup_id, None)
        self._last_refused.pop(cgroup_id, None)
        for k in [k for k in self._first_seen_at if k[0] == cgroup_id]:
            del self._first_seen_at[k]  # first-seen of syscalls made only before the first exec
        if b is None:
            return
        members = self._session_cgroups.get((b.workload, b.session), set())
        members.discard(cgroup_id)
        if not members:
            self._session_cgroups.pop((b.workload, b.session), None)
            end = self.clock() if end is None else end
            self._contribution(b.workload).close_session(b.session, end, meta)
            self.dirty.add(b.workload)
            self._notify(b.workload, b.session, None, 0, end)

    def close_session(self, workload: Workload, session: str, end: float | None = None,
                      meta: dict | None = None) -> None:
        for cg in sorted(self._session_cgroups.get((workload, session), set())):
            self.bindings.pop(cg, None)
            self._last_counts.pop(cg, None)
            self._last_key_counts.pop(cg, None)
            self._last_refused.pop(cg, None)
        self._session_cgroups.pop((workload, session), None)
        end = self.clock() if end is None else end
        self._contribution(workload).close_session(session, end, meta)
        self.dirty.add(workload)
        self._notify(workload, session, None, 0, end)

    def restart_window(self, workload: Workload, now: float | None = None) -> None:
        """Start a new observation window for ``workload`` (a re-baseline).

        The in-memory evidence is dropped; the profile is reloaded from the store, where the
        re-baseline has already archived the old file, so it starts empty. Sessions still running
        continue in the new window from ``now``; kernel counters stay cumulative, so only
        activity after this point is counted.
        """
        now = self.clock() if now is None else now
        self.profiles.pop(workload, None)
        contrib = self._contribution(workload)
        for (w, session) in sorted(self._session_cgroups, key=lambda t: t[1]):
            if w == workload:
                contrib.open_session(session, now, self._with_observed({"continued": True}))
        self.totals[workload] = Rates()
        self.dirty.add(workload)

    # ---- evidence --------------------------------------------------------------------------

    def observe(self, cgroup_id: int, key: str, count: int, ts: float,
                first: float | None = None) -> bool:
        b = self.bindings.get(cgroup_id)
        if b is None or count <= 0:
            return False
        evidence = None
        for a in self.attributors:
            key, evidence = a.attribute(cgroup_id, key, ts)
            if evidence is not None:
                break
        contrib = self._contribution(b.workload)
        before = len(contrib.behaviours)
        contrib.observe(b.session, key, count, ts, first)
        if evidence is not None:
            contrib.add_evidence(key, evidence, count, ts)
        rates = self.totals.setdefault(b.workload, Rates())
        if len(contrib.behaviours) > before:
            rates.new_behaviours += 1
        self.dirty.add(b.workload)
        self._notify(b.workload, b.session, key, count, ts)
        return True

    def _notify(self, workload: Workload, session: str, key: str | None, count: int, ts: float) -> None:
        for listener in self.listeners:
            try:
                listener(workload, session, key, count, ts)
            except Exception as e:  # noqa: BLE001 - a listener must not break aggregation
                log.error("aggregation listener failed", error=str(e), workload=workload.key)

    def on_event(self, event, ts: float) -> None:
        """Add one decoded ring-buffer event (exec, net or syscall-first)."""
        cg = event.cgroup_id
        b = self.bindings.get(cg)
        if b is None:
            return
        for a in self.attributors:
            a.on_event(event, ts)
        rates = self.totals.setdefault(b.workload, Rates())
        kind = type(event).__name__
        rates.by_type[kind] = rates.by_type.get(kind, 0) + 1
        if kind == "SyscallFirstEvent":
            # Counted by the counters; remember when it really happened for first_seen.
            self._first_seen_at.setdefault((cg, event.nr), ts)
            return
        contrib = self._contribution(b.workload)
        for name, add in (("fingerprints", contrib.add_fingerprint), ("blind_spots", contrib.add_blind_spot),
                          ("tls_stacks", contrib.add_tls_stack)):
            fn = getattr(event, name, None)
            for k, v in (fn() if fn else {}).items():
                add(k, v, ts)
                self.dirty.add(b.workload)
                if name == "fingerprints":
                    self.runtime_fingerprints.setdefault(cg, {}).setdefault(k, set()).add(v)
        keys_fn = getattr(event, "behaviour_keys", None)
        if keys_fn is not None:
            for key in keys_fn():
                self.observe(cg, key, 1, ts)
            return
        key_fn = getattr(event, "behaviour_key", None)
        key = key_fn() if key_fn else None
        if not key:
            return
        if self.observe(cg, key, 1, ts):
            if kind == "ExecEvent":
                rates.execs += 1
            elif kind == "NetEvent":
                rates.connects += 1

    def on_counts(self, counts: dict[int, dict[int, int]], ts: float) -> None:
        """Feed a cumulative counter reading; the delta since the last reading is added."""
        for cg, per_nr in counts.items():
            b = self.bindings.get(cg)
            if b is None:
                continue
            last = self._last_counts.setdefault(cg, {})
            rates = self.totals.setdefault(b.workload, Rates())
            for nr, total in per_nr.items():
                delta = total - last.get(nr, 0)
                if delta <= 0:
                    continue
                last[nr] = total
                first = self._first_seen_at.pop((cg, nr), None)
                self.observe(cg, syscall_key(self.syscall_name(nr)), delta, first if first is not None else ts)
                rates.syscalls += delta

    def on_key_counts(self, readings: dict[int, dict[str, KeyReading]]) -> None:
        """Feed cumulative per-(cgroup, behaviour) readings counted in the kernel; the delta since
        the last reading of each is added, with the kernel's first and last seen times."""
        for cg, _b, key, delta, r in self._key_deltas(readings, self._last_key_counts):
            self.observe(cg, key, delta, r.last_seen, r.first_seen)

    def on_refused_counts(self, readings: dict[int, dict[str, KeyReading]]) -> None:
        """Feed cumulative per-(cgroup, key) readings of attempts the kernel refused (a
        capability check without the capability); the deltas go to the bound workload's
        ``refused`` evidence, not to its behaviours."""
        for _cg, b, key, delta, r in self._key_deltas(readings, self._last_refused):
            self._contribution(b.workload).add_refusal(key, delta, r.last_seen, r.first_seen)
            self.dirty.add(b.workload)

    def _key_deltas(self, readings: dict[int, dict[str, KeyReading]], seen: dict[int, dict[str, int]]):
        """(cgroup, binding, key, delta, reading) of every reading of a bound cgroup that grew."""
        for cg, per_key in readings.items():
            b = self.bindings.get(cg)
            if b is None:
                continue
            last = seen.setdefault(cg, {})
            for key, r in per_key.items():
                delta = r.count - last.get(key, 0)
                if delta <= 0:
                    continue
                last[key] = r.count
                yield cg, b, key, delta, r

    def add_loss(self, deltas: dict[str, int], workloads: Iterable[Workload] | None = None) -> None:
        """Record lost events against the profiles they may have belonged to.

        Kernel loss counters are not per workload; every profile observed while events were lost
        is marked, so its evidence is known to be incomplete.
        """
        targets = list(workloads) if workloads is not None else sorted({b.workload for b in self.bindings.values()})
        for w in targets:
            contrib = self._contribution(w)
            for k, v in deltas.items():
                contrib.add_loss(k, v)
            self.dirty.add(w)

    # ---- persistence -----------------------------------------------------------------------

    def flush(self) -> list[Workload]:
        """Write this node's contribution of every profile that changed since the last flush
        (other writers' contributions in the store are kept), and remove this node's contribution
        of the ones a rebind emptied."""
        written = []
        now = self.clock()
        for w in sorted(self.dirty):
            p = self.profiles[w]
            p.node(self.node).touch(now)
            if self.store:
                self.store.save_contribution(p, self.node)
            written.append(w)
        self.dirty.clear()
        for w in sorted(self.dropped):
            if self.store and w not in self.profiles:
                self.store.remove_contribution(w, self.node)
        self.dropped.clear()
        return written
