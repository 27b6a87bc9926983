"""The profile: per-workload frequency evidence, kept as one contribution per node.

Each node writes only its own :class:`NodeContribution`. A profile's behaviour view sums the
nodes' counts, unions their sessions and takes min/max of first/last seen. Merging two profiles
keeps, per node, the contribution with the higher ``(generation, updated)`` so the merge is
deterministic, commutative, associative and idempotent: reading one node's input twice adds
nothing.

Distinct-session counts are exact without keeping per-behaviour session sets: while a session is
open, its per-behaviour counts live in ``open_sessions``; a behaviour's ``sessions`` rises the
first time it is seen in a session, and when the session closes its per-session count is folded
into ``session_sum``/``session_sumsq`` (the per-session rate distribution used by probabilistic
closure).

Memory and file size are bounded, not only the number of keys:

- per substrate by ``caps``: once a node holds that many distinct behaviours of a substrate, new
  ones go to an overflow bucket (counts kept, key not) and the profile is marked ``capped``; a
  key longer than :data:`MAX_KEY_LEN` characters goes there too;
- refused keys are remembered (so each counts once per session as a new key) only in memory, at
  most :data:`REFUSED_SAMPLE` of them, and never written: a container sending to a million
  destinations costs the sample, not a million entries in ``open_sessions``;
- each behaviour keeps at most :data:`SESSION_SAMPLE_CAP` session ids;
- at most :data:`MAX_SESSIONS` session records are kept; beyond that the oldest closed ones go,
  counted in ``sessions_dropped`` (their evidence stays in the behaviours' counts);
- session metadata values are cut to :data:`MAX_META_LEN` characters (:data:`MAX_META_ITEMS`
  items for a list, such as a recorded command line), and each fingerprint keeps its
  :data:`MAX_FINGERPRINT_VALUES` most recent values.

**Refused** attempts (checks the kernel refused, not keys a cap refused) are kept apart from
behaviours: a capability check the kernel refused (``capability:NET_RAW`` in ``refused``) says
what the workload tried without the privilege. It
is evidence for reviewers and reconciliation, never a behaviour a policy could admit: counts and
first/last seen per key, summed over nodes like the rest.

A contribution that recorded MCP behaviours also carries their argument evidence
(``arguments``, a :class:`sensor.mcp_evidence.ArgumentEvidence`: per ``mcp:`` behaviour kept in
the contribution, the values seen at each argument path, bounded per key and per path). It merges
like the rest: :meth:`Profile.arguments` unions the contributions' evidence with node-qualified
session ids.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import msgpack

from .behaviour_table import BehaviourTable
from .workload import SUBSTRATES, Workload, substrate_of

SCHEMA_VERSION = 1
DAY = 86400.0
DEFAULT_CAPS = {"syscall": 1024, "egress": 4096, "exec": 2048, "file": 8192, "http": 4096,
                "mcp": 2048, "iam": 2048, "capability": 64}
# Each behaviour keeps the ids of the first sessions it was seen in, up to this many. The union of
# these samples gives an envelope element's exact distinct-session count while every member's
# sample is complete (confidence thresholds are far below the cap); beyond it, a lower bound.
SESSION_SAMPLE_CAP = 32
# Evidence items kept per behaviour (e.g. the addresses a name-attributed connect went to); past
# the cap new items are not kept (the behaviour's own count stays exact).
EVIDENCE_CAP = 16
MAX_KEY_LEN = 1024
MAX_COUNT = 2**63 - 1  # a count or session count past it is damage (the columns are int64)
REFUSED_SAMPLE = 4096
MAX_SESSIONS = 4096
MAX_META_LEN = 1024
MAX_META_ITEMS = 64
MAX_FINGERPRINT_VALUES = 64
# Times a profile may hold (epoch seconds): 0001-01-02 to 9999-12-30 UTC, so every one can be
# written as an RFC 3339 time; a file with another is malformed.
_FIRST_TIME, _LAST_TIME = -62135510400.0, 253402128000.0


def _when(v) -> float:
    t = float(v)
    if not _FIRST_TIME <= t <= _LAST_TIME:  # NaN too
        raise ValueError(f"time {v!r} is off the calendar")
    return t


def _bounded(v):
    """A session metadata value cut to size (strings, lists, nested alike)."""
    if isinstance(v, str):
        return v if len(v) <= MAX_META_LEN else v[:MAX_META_LEN - 1] + "…"
    if isinstance(v, (list, tuple)):
        out = [_bounded(x) for x in v[:MAX_META_ITEMS]]
        if len(v) > MAX_META_ITEMS:
            out.append(f"… {len(v) - MAX_META_ITEMS} more")
        return out
    if isinstance(v, dict):
        return {str(k)[:MAX_META_LEN]: _bounded(x) for k, x in list(v.items())[:MAX_META_ITEMS]}
    return v


def bounded_meta(meta: dict | None) -> dict:
    return {str(k)[:MAX_META_LEN]: _bounded(v) for k, v in list((meta or {}).items())[:MAX_META_ITEMS]}


@dataclass(slots=True)
class BehaviourStats:
    count: int
    sessions: int
    first_seen: float
    last_seen: float
    session_sum: float = 0.0  # sum of per-session counts over closed sessions
    session_sumsq: float = 0.0  # sum of squared per-session counts over closed sessions
    # Ids of the first SESSION_SAMPLE_CAP sessions it was seen in. In a node's contribution they
    # are session ids; in a merged view they are "<node>/<session id>".
    session_ids: list = field(default_factory=list)

    @property
    def sessions_complete(self) -> bool:
        """Whether ``session_ids`` lists every session the behaviour was seen in."""
        return len(self.session_ids) >= self.sessions

    def merged(self, other: "BehaviourStats") -> "BehaviourStats":
        return BehaviourStats(
            self.count + other.count,
            self.sessions + other.sessions,
            min(self.first_seen, other.first_seen),
            max(self.last_seen, other.last_seen),
            self.session_sum + other.session_sum,
            self.session_sumsq + other.session_sumsq,
            sorted(set(self.session_ids) | set(other.session_ids)),
        )

    def pack(self) -> list:
        return [self.count, self.sessions, self.first_seen, self.last_seen,
                self.session_sum, self.session_sumsq, list(self.session_ids)]

    @classmethod
    def unpack(cls, v: list) -> "BehaviourStats":
        ids = [sys.intern(str(x)) for x in v[6]] if len(v) > 6 else []
        count, sessions = int(v[0]), int(v[1])
        if not (0 <= count <= MAX_COUNT and 0 <= sessions <= MAX_COUNT):
            raise ValueError(f"count {count} or sessions {sessions} is negative or past {MAX_COUNT}")
        return cls(count, sessions, _when(v[2]), _when(v[3]), float(v[4]), float(v[5]), ids)


@dataclass(slots=True)
class SessionRecord:
    id: str
    start: float
    end: float | None = None  # None while the session is open
    meta: dict = field(default_factory=dict)  # container id, pod uid, cgroup path, exit code...

    def pack(self) -> list:
        return [self.id, self.start, self.end, self.meta]

    @classmethod
    def unpack(cls, v: list) -> "SessionRecord":
        return cls(str(v[0]), _when(v[1]), None if v[2] is None else _when(v[2]), dict(v[3]))


@dataclass(slots=True)
class Overflow:
    """Behaviours past a substrate's cardinality cap: counts kept, keys not."""

    count: int = 0
    new_keys: int = 0  # distinct keys refused (counted once per node, approximately)
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass(slots=True)
class Refusal:
    """What the kernel refused a workload, per key: how often and when first and last."""

    count: int
    first_seen: float
    last_seen: float

    def pack(self) -> list:
        return [self.count, self.first_seen, self.last_seen]

    @classmethod
    def unpack(cls, v: list) -> "Refusal":
        return cls(int(v[0]), float(v[1]), float(v[2]))


@dataclass
class NodeContribution:
    node: str
    generation: int = 0
    updated: float = 0.0
    window_start: float | None = None
    behaviours: dict[str, BehaviourStats] = field(default_factory=dict)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    open_sessions: dict[str, dict[str, int]] = field(default_factory=dict)
    closed_sessions: int = 0
    overflow: dict[str, Overflow] = field(default_factory=dict)
    capped: bool = False
    loss: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> value -> last seen
    # What a substrate could not see for this workload (substrate -> finding -> last seen), e.g.
    # "http" -> "/usr/bin/agent: go crypto/tls: requests over TLS not observable".
    blind_spots: dict[str, dict[str, float]] = field(default_factory=dict)
    # The TLS stack of each executable seen (exe -> "kind[:library]" -> last seen).
    tls_stacks: dict[str, dict[str, float]] = field(default_factory=dict)
    caps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CAPS))
    # behaviour key -> evidence item (an address) -> [count, first seen, last seen]
    evidence: dict[str, dict[str, list]] = field(default_factory=dict)
    sessions_dropped: int = 0  # session records let go past MAX_SESSIONS (oldest closed first)
    arguments: object = None  # sensor.mcp_evidence.ArgumentEvidence of the mcp behaviours, or None
    refused: dict[str, Refusal] = field(default_factory=dict)  # refused attempts, by behaviour key
    _per_substrate: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    # (session, key) refused by a cap, remembered in memory only and at most REFUSED_SAMPLE
    _refused: set = field(default_factory=set, repr=False, compare=False)
    # The behaviours of a contribution read back, in columns, until something asks for the dict
    # (see __getattr__): a profile merged from thousands of nodes sums the tables directly.
    _table: BehaviourTable | None = field(default=None, repr=False, compare=False)

    def __getattr__(self, name: str):
        # Only called when ``behaviours`` (or anything else) is not set: a contribution unpacked
        # from a table builds its dict on first use, and from then on the dict is the evidence.
        table = self.__dict__.get("_table")
        if name != "behaviours" or table is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.behaviours = table.stats()
        self._table = None
        return self.behaviours

    @property
    def tabled(self) -> bool:
        """Whether its behaviours are still only the table it was read back with."""
        return "behaviours" not in self.__dict__ and self._table is not None

    def last_seen(self) -> float | None:
        """When any of its behaviours was last seen (None without behaviours), from the table
        while the dict is not built."""
        if self.tabled:
            return self._table.last_seen()
        return max((s.last_seen for s in self.behaviours.values()), default=None)

    def behaviour_table(self) -> BehaviourTable:
        """The behaviours as a :class:`~sensor.behaviour_table.BehaviourTable`."""
        return self._table if self.tabled else BehaviourTable.from_stats(self.behaviours)

    # ---- recording -------------------------------------------------------------------------

    def open_session(self, session_id: str, start: float, meta: dict | None = None) -> None:
        if session_id in self.sessions:
            rec = self.sessions[session_id]
            if meta:
                rec.meta.update(bounded_meta(meta))
                if len(rec.meta) > MAX_META_ITEMS:
                    rec.meta = bounded_meta(rec.meta)
            if rec.end is None:
                self.open_sessions.setdefault(session_id, {})
            return
        self.sessions[session_id] = SessionRecord(session_id, start, None, bounded_meta(meta))
        self.open_sessions[session_id] = {}
        if self.window_start is None or start < self.window_start:
            self.window_start = start
        if len(self.sessions) > MAX_SESSIONS:
            self._drop_sessions()

    def _drop_sessions(self) -> None:
        """Let the oldest closed session records go past MAX_SESSIONS (open ones stay)."""
        closed = sorted((rec.start, sid) for sid, rec in self.sessions.items() if rec.end is not None)
        for _start, sid in closed[:len(self.sessions) - MAX_SESSIONS]:
            del self.sessions[sid]
            self.sessions_dropped += 1

    def _refuse(self, session_id: str, key: str) -> bool:
        """Remember a key refused in a session; True the first time (approximately, past the
        sample: then every refusal counts as a new key)."""
        k = (session_id, key)
        if k in self._refused:
            return False
        if len(self._refused) < REFUSED_SAMPLE:
            self._refused.add(k)
        return True

    def observe(self, session_id: str, key: str, count: int, ts: float,
                first: float | None = None) -> None:
        """Add ``count`` occurrences of ``key`` in an open session, the last at wall time ``ts``
        and the first at ``first`` (default ``ts``: one point in time)."""
        if count <= 0:
            return
        first = ts if first is None else min(first, ts)
        per_session = self.open_sessions.get(session_id)
        if per_session is None:
            if session_id in self.sessions:  # closed: a late event, e.g. drained after the exit
                self._observe_late(session_id, key, count, ts, first)
                return
            self.open_session(session_id, first)
            per_session = self.open_sessions[session_id]
        stats = self.behaviours.get(key)
        if stats is None:
            substrate = substrate_of(key)
            if len(key) > MAX_KEY_LEN or self._substrate_count(substrate) >= self.caps.get(
                    substrate, DEFAULT_CAPS.get(substrate, 1024)):
                self._overflow(substrate, count, ts, new=self._refuse(session_id, key))
                self.capped = True
                return
            stats = BehaviourStats(0, 0, first, ts)
            self.behaviours[key] = stats
            self._per_substrate[substrate] = self._per_substrate.get(substrate, 0) + 1
        stats.count += count
        if first < stats.first_seen:
            stats.first_seen = first
        if ts > stats.last_seen:
            stats.last_seen = ts
        prior = per_session.get(key)
        if prior is None:
            stats.sessions += 1
            if len(stats.session_ids) < SESSION_SAMPLE_CAP:
                stats.session_ids.append(sys.intern(session_id))
            per_session[key] = count
        else:
            per_session[key] = prior + count

    def _observe_late(self, session_id: str, key: str, count: int, ts: float, first: float) -> None:
        """Evidence for a session that is already closed: counts and times are added; the session
        is counted for the behaviour when its sample shows it was not yet (exact while the sample
        is complete). Per-session rates are final once a session closes and are left alone."""
        stats = self.behaviours.get(key)
        if stats is None:
            substrate = substrate_of(key)
            if len(key) > MAX_KEY_LEN or self._substrate_count(substrate) >= self.caps.get(
                    substrate, DEFAULT_CAPS.get(substrate, 1024)):
                self._overflow(substrate, count, ts, new=self._refuse(session_id, key))
                self.capped = True
                return
            stats = self.behaviours[key] = BehaviourStats(0, 0, first, ts)
            self._per_substrate[substrate] = self._per_substrate.get(substrate, 0) + 1
        stats.count += count
        stats.first_seen = min(stats.first_seen, first)
        stats.last_seen = max(stats.last_seen, ts)
        if stats.sessions_complete and session_id not in stats.session_ids:
            stats.sessions += 1
            if len(stats.session_ids) < SESSION_SAMPLE_CAP:
                stats.session_ids.append(sys.intern(session_id))

    def close_session(self, session_id: str, end: float, meta: dict | None = None) -> None:
        rec = self.sessions.get(session_id)
        if rec is None or rec.end is not None:
            return
        rec.end = end
        if meta:
            rec.meta.update(meta)
        for key, c in self.open_sessions.pop(session_id, {}).items():
            stats = self.behaviours.get(key)
            if stats is not None:
                stats.session_sum += c
                stats.session_sumsq += c * c
        self.closed_sessions += 1
        if self._refused:
            self._refused = {k for k in self._refused if k[0] != session_id}
        if len(self.sessions) > MAX_SESSIONS:
            self._drop_sessions()

    def add_evidence(self, key: str, item: str, count: int, ts: float) -> None:
        """Remember ``item`` (an address) as evidence of behaviour ``key`` (bounded per key)."""
        if key not in self.behaviours:
            return  # a key refused by the cap keeps no evidence either
        per = self.evidence.setdefault(key, {})
        rec = per.get(item)
        if rec is None:
            if len(per) >= EVIDENCE_CAP:
                return
            per[item] = [count, ts, ts]
            return
        rec[0] += count
        rec[1] = min(rec[1], ts)
        rec[2] = max(rec[2], ts)

    def move_session(self, session_id: str, dest: "NodeContribution", new_id: str | None = None) -> bool:
        """Move an open session and everything counted in it to ``dest`` (another workload's
        contribution on the same node): a cgroup whose identity became known later. Exact: an
        open session keeps its per-behaviour counts. A closed session cannot be taken apart and is
        left where it is (returns False)."""
        per = self.open_sessions.get(session_id)
        rec = self.sessions.get(session_id)
        if per is None or rec is None or rec.end is not None:
            return False
        new_id = new_id or session_id
        dest.open_session(new_id, rec.start, rec.meta)
        for key, n in sorted(per.items()):
            st = self.behaviours.get(key)
            if st is None or n <= 0:  # refused at the cap: nothing was counted for it here
                continue
            first, last = st.first_seen, st.last_seen
            st.count -= n
            st.sessions = max(st.sessions - 1, 0)
            if session_id in st.session_ids:
                st.session_ids.remove(session_id)
            gone = st.count <= 0
            if gone:
                del self.behaviours[key]
                sub = substrate_of(key)
                if self._per_substrate.get(sub):
                    self._per_substrate[sub] -= 1
            dest.observe(new_id, key, n, last, first)
            if gone:  # its evidence (e.g. a name's addresses) goes with it
                for item, (c, f, l) in sorted(self.evidence.pop(key, {}).items()):
                    dest.add_evidence(key, item, c, f)
                    dest.add_evidence(key, item, 0, l)
        del self.open_sessions[session_id]
        del self.sessions[session_id]
        if self._refused:
            self._refused = {k for k in self._refused if k[0] != session_id}
        for key, values in self.fingerprints.items():
            for value, ts in values.items():
                dest.add_fingerprint(key, value, ts)
        if not self.sessions:
            self.window_start = None
        return True

    @property
    def empty(self) -> bool:
        return not self.sessions and not self.behaviours and not self.refused

    def add_fingerprint(self, key: str, value: str, ts: float) -> None:
        key, value = key[:MAX_META_LEN], value[:MAX_META_LEN]
        if key not in self.fingerprints and len(self.fingerprints) >= MAX_META_ITEMS:
            return
        values = self.fingerprints.setdefault(key, {})
        values[value] = ts
        if len(values) > MAX_FINGERPRINT_VALUES:  # the most recent ones stay
            for v, _ in sorted(values.items(), key=lambda kv: (kv[1], kv[0]))[:len(values) - MAX_FINGERPRINT_VALUES]:
                del values[v]

    def add_refusal(self, key: str, count: int, ts: float, first: float | None = None) -> None:
        """Add ``count`` refused attempts of ``key`` (not a behaviour: see the module docstring),
        bounded like the behaviours of its substrate (past the cap, counted as overflow)."""
        if count <= 0:
            return
        first = ts if first is None else min(first, ts)
        r = self.refused.get(key)
        if r is None:
            substrate = substrate_of(key)
            if sum(1 for k in self.refused if substrate_of(k) == substrate) >= self.caps.get(
                    substrate, DEFAULT_CAPS.get(substrate, 1024)):
                self._overflow(substrate, count, ts, new=True)
                self.capped = True
                return
            self.refused[key] = Refusal(count, first, ts)
            return
        r.count += count
        r.first_seen = min(r.first_seen, first)
        r.last_seen = max(r.last_seen, ts)
    def add_blind_spot(self, substrate: str, finding: str, ts: float) -> None:
        self.blind_spots.setdefault(substrate, {})[finding] = ts

    def add_tls_stack(self, exe: str, stack: str, ts: float) -> None:
        self.tls_stacks.setdefault(exe, {})[stack] = ts

    def add_loss(self, counter: str, n: int) -> None:
        if n:
            self.loss[counter] = self.loss.get(counter, 0) + n

    def touch(self, ts: float) -> None:
        self.generation += 1
        self.updated = max(self.updated, ts)

    def _substrate_count(self, substrate: str) -> int:
        if not self._per_substrate and self.behaviours:
            for k in self.behaviours:
                s = substrate_of(k)
                self._per_substrate[s] = self._per_substrate.get(s, 0) + 1
        return self._per_substrate.get(substrate, 0)

    def _overflow(self, substrate: str, count: int, ts: float, new: bool) -> None:
        self.add_overflow(substrate, count, 1 if new else 0, ts, ts)

    def add_overflow(self, substrate: str, count: int, new_keys: int, first: float,
                     last: float) -> None:
        """``count`` occurrences of ``new_keys`` distinct behaviours not kept (past a cap here or
        in the kernel's tables), between ``first`` and ``last``; the contribution is capped."""
        o = self.overflow.setdefault(substrate, Overflow(first_seen=first, last_seen=last))
        o.count += count
        o.new_keys += new_keys
        o.first_seen = min(o.first_seen, first)
        o.last_seen = max(o.last_seen, last)
        self.capped = True

    # ---- serialisation ---------------------------------------------------------------------

    def add_arguments(self, evidence) -> None:
        """Merge MCP argument evidence into this contribution, for behaviours it keeps (a key
        refused by the cap keeps no argument evidence either)."""
        kept = evidence.only(self.behaviours)
        if kept:
            self.arguments = kept if self.arguments is None else self.arguments.merged(kept)

    def pack(self, compact: bool = False) -> dict:
        """The packed form, sorted: the same contribution packs to the same bytes. By default it
        is what profile files hold (msgpack or JSON), behaviours as a dict of stats lists.
        ``compact`` is the cluster's form (msgpack only): behaviours as a
        :class:`~sensor.behaviour_table.BehaviourTable`, and without the per-session counts of
        sessions still open, the node's working state for folding them into the per-session sums
        when they close, which no reader needs (their counts are in the behaviours already)."""
        behaviours = ({"behaviour_table": self.behaviour_table().pack()} if compact else
                      {"behaviours": {k: v.pack() for k, v in sorted(self.behaviours.items())}})
        d = {
            "node": self.node,
            "generation": self.generation,
            "updated": self.updated,
            "window_start": self.window_start,
            **behaviours,
            "sessions": [s.pack() for _, s in sorted(self.sessions.items())],
            **({"open_sessions": {k: dict(sorted(v.items())) for k, v in sorted(self.open_sessions.items())}}
               if not compact else {}),
            "closed_sessions": self.closed_sessions,
            "overflow": {k: [o.count, o.new_keys, o.first_seen, o.last_seen]
                         for k, o in sorted(self.overflow.items())},
            "capped": self.capped,
            "loss": dict(sorted(self.loss.items())),
            "fingerprints": {k: dict(sorted(v.items())) for k, v in sorted(self.fingerprints.items())},
            "caps": dict(sorted(self.caps.items())),
            **({"evidence": {k: dict(sorted(v.items())) for k, v in sorted(self.evidence.items())}}
               if self.evidence else {}),
            "sessions_dropped": self.sessions_dropped,
            **({"blind_spots": {k: dict(sorted(v.items())) for k, v in sorted(self.blind_spots.items())}}
               if self.blind_spots else {}),
            **({"tls_stacks": {k: dict(sorted(v.items())) for k, v in sorted(self.tls_stacks.items())}}
               if self.tls_stacks else {}),
        }
        if self.arguments:
            d["arguments"] = self.arguments.pack()
        if self.refused:
            d["refused"] = {k: v.pack() for k, v in sorted(self.refused.items())}
        return d

    @classmethod
    def unpack(cls, d: dict) -> "NodeContribution":
        """From either of :meth:`pack`'s forms."""
        table = None
        if "behaviour_table" in d:
            table = BehaviourTable.unpack(d["behaviour_table"], _FIRST_TIME, _LAST_TIME)
        arguments = None
        if d.get("arguments"):
            from .mcp_evidence import ArgumentEvidence  # mcp_evidence builds on BehaviourStats

            arguments = ArgumentEvidence.unpack(d["arguments"])
        c = cls(
            node=str(d["node"]),
            generation=int(d["generation"]),
            updated=_when(d["updated"]),
            window_start=None if d["window_start"] is None else _when(d["window_start"]),
            behaviours={} if table is not None else {str(k): BehaviourStats.unpack(v) for k, v in d["behaviours"].items()},
            sessions={str(s[0]): SessionRecord.unpack(s) for s in d["sessions"]},
            open_sessions={str(k): {str(b): int(c) for b, c in v.items()}
                           for k, v in d.get("open_sessions", {}).items()},
            closed_sessions=int(d["closed_sessions"]),
            overflow={str(k): Overflow(int(v[0]), int(v[1]), _when(v[2]), _when(v[3]))
                      for k, v in d["overflow"].items()},
            capped=bool(d["capped"]),
            loss={str(k): int(v) for k, v in d["loss"].items()},
            fingerprints={str(k): {str(a): float(b) for a, b in v.items()}
                          for k, v in d["fingerprints"].items()},
            caps={**DEFAULT_CAPS, **{str(k): int(v) for k, v in d.get("caps", {}).items()}},
            evidence={str(k): {str(i): [int(r[0]), float(r[1]), float(r[2])] for i, r in v.items()}
                      for k, v in d.get("evidence", {}).items()},
            sessions_dropped=int(d.get("sessions_dropped", 0)),
            arguments=arguments,
            refused={str(k): Refusal.unpack(v) for k, v in (d.get("refused") or {}).items()},
            blind_spots={str(k): {str(a): float(b) for a, b in v.items()}
                         for k, v in d.get("blind_spots", {}).items()},
            tls_stacks={str(k): {str(a): float(b) for a, b in v.items()}
                        for k, v in d.get("tls_stacks", {}).items()},
        )
        if table is not None and len(table):
            del c.behaviours  # built from the table on first use
            c._table = table
        return c


def newer_contribution(a: NodeContribution, b: NodeContribution) -> NodeContribution:
    """Of two versions of one node's contribution, the newer by ``(generation, updated)``; a
    tie (the same version seen twice) is broken by content, so the choice is deterministic."""
    ka, kb = (a.generation, a.updated), (b.generation, b.updated)
    if ka == kb:
        pa = msgpack.packb(a.pack(), use_bin_type=True)
        pb = msgpack.packb(b.pack(), use_bin_type=True)
        return a if pa >= pb else b
    return a if ka > kb else b


@dataclass
class Profile:
    """All the evidence about one workload: one contribution per node."""

    workload: Workload
    nodes: dict[str, NodeContribution] = field(default_factory=dict)

    def node(self, name: str) -> NodeContribution:
        """This node's contribution, created on first use."""
        c = self.nodes.get(name)
        if c is None:
            c = self.nodes[name] = NodeContribution(name)
        return c

    # ---- merged views ----------------------------------------------------------------------

    def behaviours(self) -> dict[str, BehaviourStats]:
        """Per behaviour, the evidence summed over nodes, sorted by key, session ids as
        ``<node>/<id>``: the same as merging the nodes' stats pairwise with
        :meth:`BehaviourStats.merged`, in one pass. Contributions read back from the cluster are
        summed from their tables, in columns (:meth:`BehaviourTable.merged
        <sensor.behaviour_table.BehaviourTable.merged>`, numpy); those a process records, which
        hold their stats, in one loop, so a recording daemon never loads numpy."""
        if any(n.tabled for n in self.nodes.values()):
            return BehaviourTable.merged([(name, self.nodes[name].behaviour_table()) for name in sorted(self.nodes)])
        out: dict[str, BehaviourStats] = {}
        ids: dict[str, set] = {}
        for name in sorted(self.nodes):
            node = self.nodes[name]
            merged_id = {i: f"{name}/{i}" for i in node.sessions}  # one string per session, not per behaviour
            for key, s in node.behaviours.items():
                these = [merged_id[i] if i in merged_id else f"{name}/{i}" for i in s.session_ids]
                prev = out.get(key)
                if prev is None:
                    out[key] = BehaviourStats(s.count, s.sessions, s.first_seen, s.last_seen, s.session_sum,
                                              s.session_sumsq)
                    ids[key] = set(these)
                    continue
                prev.count += s.count
                prev.sessions += s.sessions
                prev.first_seen = min(prev.first_seen, s.first_seen)
                prev.last_seen = max(prev.last_seen, s.last_seen)
                prev.session_sum += s.session_sum
                prev.session_sumsq += s.session_sumsq
                ids[key].update(these)
        for key, stats in out.items():
            stats.session_ids = sorted(ids[key])
        return dict(sorted(out.items()))

    def arguments(self):
        """The MCP argument evidence merged over contributions (session ids ``<node>/<id>``, as in
        :meth:`behaviours`); an empty :class:`sensor.mcp_evidence.ArgumentEvidence` when none."""
        from .mcp_evidence import ArgumentEvidence

        out = ArgumentEvidence()
        for name in sorted(self.nodes):
            ev = self.nodes[name].arguments
            if ev:
                out = out.merged(ev.relabelled(f"{name}/"))
        return out

    def refused(self) -> dict[str, Refusal]:
        """Refused attempts per key, summed over nodes, sorted by key."""
        out: dict[str, Refusal] = {}
        for name in sorted(self.nodes):
            for k, r in self.nodes[name].refused.items():
                p = out.get(k)
                out[k] = Refusal(r.count, r.first_seen, r.last_seen) if p is None else Refusal(
                    p.count + r.count, min(p.first_seen, r.first_seen), max(p.last_seen, r.last_seen))
        return dict(sorted(out.items()))

    def observed_sessions(self, substrate: str) -> int:
        """Sessions whose recorder says it observed ``substrate`` (session meta ``observed``;
        see :data:`sensor.workload.MARKED_SUBSTRATES`)."""
        return sum(1 for n in self.nodes.values() for s in n.sessions.values()
                   if substrate in (s.meta.get("observed") or ()))

    def sessions(self) -> list[SessionRecord]:
        recs = [s for n in self.nodes.values() for s in n.sessions.values()]
        return sorted(recs, key=lambda s: (s.start, s.id))

    @property
    def session_count(self) -> int:
        return sum(len(n.sessions) + n.sessions_dropped for n in self.nodes.values())

    @property
    def closed_sessions(self) -> int:
        return sum(n.closed_sessions for n in self.nodes.values())

    def window(self) -> tuple[float | None, float | None]:
        starts = [n.window_start for n in self.nodes.values() if n.window_start is not None]
        ends = [n.updated for n in self.nodes.values() if n.updated]
        ends += [t for t in (n.last_seen() for n in self.nodes.values()) if t is not None]
        return (min(starts) if starts else None, max(ends) if ends else None)

    def loss(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes.values():
            for k, v in n.loss.items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))

    @property
    def capped(self) -> bool:
        return any(n.capped for n in self.nodes.values())

    def overflow(self) -> dict[str, Overflow]:
        out: dict[str, Overflow] = {}
        for n in self.nodes.values():
            for k, o in n.overflow.items():
                p = out.get(k)
                out[k] = Overflow(o.count, o.new_keys, o.first_seen, o.last_seen) if p is None else Overflow(
                    p.count + o.count, p.new_keys + o.new_keys,
                    min(p.first_seen, o.first_seen), max(p.last_seen, o.last_seen))
        return dict(sorted(out.items()))

    def evidence(self) -> dict[str, dict[str, int]]:
        """Per behaviour, its evidence items (addresses) with their counts summed over nodes."""
        out: dict[str, dict[str, int]] = {}
        for name in sorted(self.nodes):
            for key, items in self.nodes[name].evidence.items():
                per = out.setdefault(key, {})
                for item, rec in items.items():
                    per[item] = per.get(item, 0) + rec[0]
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def fingerprints(self) -> dict[str, list[str]]:
        """Fingerprint inputs seen, per key, values ordered by when they were last seen."""
        merged: dict[str, dict[str, float]] = {}
        for n in self.nodes.values():
            for k, vals in n.fingerprints.items():
                m = merged.setdefault(k, {})
                for v, ts in vals.items():
                    m[v] = max(ts, m.get(v, ts))
        return {k: [v for v, _ in sorted(vals.items(), key=lambda kv: (kv[1], kv[0]))]
                for k, vals in sorted(merged.items())}

    def blind_spots(self) -> dict[str, list[str]]:
        """What each substrate could not see, merged over nodes: substrate -> findings (sorted)."""
        merged: dict[str, set] = {}
        for n in self.nodes.values():
            for k, vals in n.blind_spots.items():
                merged.setdefault(k, set()).update(vals)
        return {k: sorted(v) for k, v in sorted(merged.items())}

    def tls_stacks(self) -> dict[str, list[str]]:
        """The TLS stacks seen per executable, merged over nodes (sorted)."""
        merged: dict[str, set] = {}
        for n in self.nodes.values():
            for k, vals in n.tls_stacks.items():
                merged.setdefault(k, set()).update(vals)
        return {k: sorted(v) for k, v in sorted(merged.items())}

    def coverage_timeline(self, behaviours: dict[str, BehaviourStats] | None = None) -> list[tuple[float, str]]:
        """Each behaviour with the time it was first seen, oldest first (of ``behaviours``, the
        merged view, when the caller has it already)."""
        stats = self.behaviours() if behaviours is None else behaviours
        return sorted(((s.first_seen, k) for k, s in stats.items()), key=lambda t: (t[0], t[1]))

    def new_behaviours(self, since: float, until: float | None = None,
                       substrate: str | None = None, timeline: list[tuple[float, str]] | None = None) -> int:
        """How many behaviours were first seen in ``[since, until]``, optionally of one substrate."""
        n = 0
        for ts, key in self.coverage_timeline() if timeline is None else timeline:
            if ts >= since and (until is None or ts <= until) and (
                    substrate is None or substrate_of(key) == substrate):
                n += 1
        return n

    def coverage_rate(self, hours: float = 24.0, timeline: list[tuple[float, str]] | None = None) -> dict[str, int]:
        """New behaviours per substrate in the last ``hours`` of the observation window."""
        _, end = self.window()
        if end is None:
            return {s: 0 for s in SUBSTRATES}
        since = end - hours * 3600.0
        timeline = self.coverage_timeline() if timeline is None else timeline
        return {s: self.new_behaviours(since, end, s, timeline) for s in SUBSTRATES}

    def rate(self, key: str) -> tuple[float, float, int]:
        """Mean and standard deviation of a behaviour's per-session count over closed sessions,
        with the number of sessions the figures rest on."""
        n = self.closed_sessions
        stats = self.behaviours().get(key)
        if not n or stats is None:
            return 0.0, 0.0, n
        mean = stats.session_sum / n
        var = max(stats.session_sumsq / n - mean * mean, 0.0)
        return mean, math.sqrt(var), n

    # ---- merge and serialisation -----------------------------------------------------------

    def merge(self, other: "Profile") -> "Profile":
        """Combine two views of the same workload; per node the newer contribution wins."""
        if other.workload != self.workload:
            raise ValueError(f"cannot merge profiles of {self.workload} and {other.workload}")
        nodes: dict[str, NodeContribution] = {}
        for name in sorted(set(self.nodes) | set(other.nodes)):
            a, b = self.nodes.get(name), other.nodes.get(name)
            nodes[name] = a or b if a is None or b is None else newer_contribution(a, b)
        return Profile(self.workload, nodes)

    def pack(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "workload": self.workload.to_dict(),
            "nodes": [self.nodes[n].pack() for n in sorted(self.nodes)],
        }

    @classmethod
    def unpack(cls, d: dict) -> "Profile":
        if not isinstance(d, dict) or "schema" not in d:
            raise ValueError("not an Envelope profile (no schema field)")
        if d["schema"] != SCHEMA_VERSION:
            raise ValueError(f"unsupported profile schema {d['schema']!r} (this build reads {SCHEMA_VERSION})")
        nodes = [NodeContribution.unpack(n) for n in d["nodes"]]
        return cls(Workload.from_dict(d["workload"]), {n.node: n for n in nodes})

    def to_json(self) -> dict:
        """The documented JSON view (``envelope profile show -o json``)."""
        start, end = self.window()
        sessions = self.sessions()
        behaviours = self.behaviours()
        timeline = self.coverage_timeline(behaviours)
        return {
            "workload": self.workload.to_dict() | {"key": self.workload.key},
            "window": {"start": start, "end": end},
            "sessions": {
                "count": len(sessions),
                "closed": self.closed_sessions,
                "ids": [s.id for s in sessions],
            },
            "behaviours": [
                {
                    "key": k,
                    "substrate": substrate_of(k),
                    "count": s.count,
                    "sessions": s.sessions,
                    "first_seen": s.first_seen,
                    "last_seen": s.last_seen,
                }
                for k, s in behaviours.items()
            ],
            "coverage": {
                "new_last_24h": self.coverage_rate(24.0, timeline),
                "timeline": [{"t": t, "key": k} for t, k in timeline],
            },
            "capped": self.capped,
            "overflow": {k: {"count": o.count, "new_keys": o.new_keys} for k, o in self.overflow().items()},
            "fingerprints": self.fingerprints(),
            "refused": [
                {"key": k, "substrate": substrate_of(k), "count": r.count, "first_seen": r.first_seen,
                 "last_seen": r.last_seen}
                for k, r in self.refused().items()
            ],
            "blind_spots": self.blind_spots(),
            "tls": self.tls_stacks(),
            "nodes": sorted(self.nodes),
            "loss": self.loss(),
        }
