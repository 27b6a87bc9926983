"""A contribution's behaviours in columns: how they are stored, shipped and summed over nodes.

A node's :class:`~sensor.profile.NodeContribution` keeps its behaviours as a dict of
:class:`~sensor.profile.BehaviourStats` while it records. Stored and published, the same
evidence is a :class:`BehaviourTable`: the keys in order, their numbers in typed columns and
their session ids as indices into one list of ids. A profile merged from thousands of nodes is
summed from the tables with array operations, without building a Python object per behaviour per
node; a contribution read back builds its dict only when something asks for it.

Packed form (``NodeContribution.pack()["behaviour_table"]``, schema 2)::

    keys     [str]        sorted behaviour keys, n of them
    counts   bytes        int64 little-endian, 2 x n: count, sessions
    times    bytes        float64 little-endian, 4 x n: first seen, last seen, per-session sum
                          and sum of squares (over closed sessions)
    ids      [str]        the distinct session ids the behaviours list, sorted
    offsets  bytes        int32 little-endian, n + 1: behaviour i's ids are
    index    bytes        int32 little-endian, indices into ids, index[offsets[i]:offsets[i+1]]

The same behaviours always pack to the same bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

_INT = np.dtype("<i8")
_FLOAT = np.dtype("<f8")
_INDEX = np.dtype("<i4")


def _column(buf, dtype: np.dtype, rows: int, n: int, what: str) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray)):
        raise TypeError(f"behaviour table {what} is {type(buf).__name__}, not bytes")
    if len(buf) != dtype.itemsize * rows * n:
        raise ValueError(f"behaviour table {what}: {len(buf)} bytes for {rows} x {n} values")
    a = np.frombuffer(buf, dtype=dtype)
    return a.reshape(rows, n) if rows > 1 else a


def _exact_sum(key: np.ndarray, values: np.ndarray, size: int) -> list[int]:
    """Per key, the sum of non-negative int64 ``values`` as exact Python ints: the high and low
    32 bits are summed apart (neither can wrap below 2**31 tables), then put together."""
    high, low = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    np.add.at(high, key, values >> 32)
    np.add.at(low, key, values & 0xFFFFFFFF)
    return [(h << 32) + lo for h, lo in zip(high.tolist(), low.tolist())]


@dataclass(frozen=True, eq=False)  # numpy columns: compare packed forms, not tables
class BehaviourTable:
    keys: list[str]
    counts: np.ndarray  # int64, (2, n): count, sessions
    times: np.ndarray  # float64, (4, n): first seen, last seen, session sum, session sum of squares
    ids: list[str]
    offsets: np.ndarray  # int32, n + 1
    index: np.ndarray  # int32, offsets[-1]

    def __len__(self) -> int:
        return len(self.keys)

    def last_seen(self) -> float | None:
        return float(self.times[1].max()) if len(self.keys) else None

    # ---- to and from BehaviourStats ------------------------------------------------------------

    @classmethod
    def from_stats(cls, behaviours: dict) -> "BehaviourTable":
        """The table of a dict of :class:`~sensor.profile.BehaviourStats`, keys sorted."""
        keys = sorted(behaviours)
        stats = [behaviours[k] for k in keys]
        ids = sorted({i for s in stats for i in s.session_ids})
        where = {i: n for n, i in enumerate(ids)}
        n = len(keys)
        try:
            counts = np.array([[s.count for s in stats], [s.sessions for s in stats]], dtype=_INT).reshape(2, n)
        except OverflowError:
            raise ValueError("a behaviour's count is past the int64 columns") from None
        times = np.array([[s.first_seen for s in stats], [s.last_seen for s in stats],
                          [s.session_sum for s in stats], [s.session_sumsq for s in stats]],
                         dtype=_FLOAT).reshape(4, n)
        offsets = np.zeros(n + 1, dtype=_INDEX)
        np.cumsum([len(s.session_ids) for s in stats], out=offsets[1:])
        index = np.array([where[i] for s in stats for i in s.session_ids], dtype=_INDEX)
        return cls(keys, counts, times, ids, offsets, index)

    def stats(self) -> dict:
        """The behaviours as a dict of new :class:`~sensor.profile.BehaviourStats`, keys in order."""
        from .profile import BehaviourStats  # profile builds on this module

        count, sessions = self.counts.tolist()
        first, last, ssum, ssq = self.times.tolist()
        ids = [sys.intern(i) for i in self.ids]
        index, offsets = self.index.tolist(), self.offsets.tolist()
        return {k: BehaviourStats(count[n], sessions[n], first[n], last[n], ssum[n], ssq[n],
                                  [ids[j] for j in index[offsets[n]:offsets[n + 1]]])
                for n, k in enumerate(self.keys)}

    # ---- packed form ---------------------------------------------------------------------------

    def pack(self) -> dict:
        return {"keys": list(self.keys), "counts": self.counts.astype(_INT).tobytes(),
                "times": self.times.astype(_FLOAT).tobytes(), "ids": list(self.ids),
                "offsets": self.offsets.astype(_INDEX).tobytes(), "index": self.index.astype(_INDEX).tobytes()}

    @classmethod
    def unpack(cls, d: dict, first_time: float, last_time: float) -> "BehaviourTable":
        """A table from its packed form, checked whole: lengths agree, keys are distinct and in
        order, session indices are in range and first and last seen lie in
        ``[first_time, last_time]``. Raises ValueError or TypeError otherwise."""
        keys, ids = d["keys"], d["ids"]
        if not isinstance(keys, list) or not isinstance(ids, list) or not set(map(type, keys + ids)) <= {str}:
            raise TypeError("behaviour table keys and ids are not lists of strings")
        n = len(keys)
        counts = _column(d["counts"], _INT, 2, n, "counts")
        times = _column(d["times"], _FLOAT, 4, n, "times")
        offsets = _column(d["offsets"], _INDEX, 1, n + 1, "offsets")
        raw = d["index"]
        if not isinstance(raw, (bytes, bytearray)) or len(raw) % _INDEX.itemsize:
            raise ValueError("behaviour table index is not a whole number of int32 values")
        index = np.frombuffer(raw, dtype=_INDEX)
        if keys != sorted(keys) or len(set(keys)) != n:
            raise ValueError("behaviour table keys are not distinct and sorted")
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise ValueError("behaviour table session ids are not distinct and sorted")
        if offsets[0] != 0 or offsets[-1] != len(index) or (offsets[1:] < offsets[:-1]).any():
            raise ValueError("behaviour table session offsets do not cover its index")
        if len(index) and (index.min() < 0 or index.max() >= len(ids)):
            raise ValueError("behaviour table session index out of range")
        if n:  # NaN fails the comparisons too
            seen = times[:2]
            if not (first_time <= seen.min() and seen.max() <= last_time):
                raise ValueError("behaviour table time is off the calendar")
            if counts.min() < 0 or not (times[2:] >= 0).all() or not np.isfinite(times[2:]).all():
                raise ValueError("behaviour table count or session sum is not a finite non-negative number")
        return cls(keys, counts, times, ids, offsets, index)

    # ---- merging -------------------------------------------------------------------------------

    @staticmethod
    def merged(tables: list[tuple[str, "BehaviourTable"]]) -> dict:
        """Per behaviour, the evidence summed over ``(node name, table)`` pairs, in key order:
        counts, sessions and the per-session sums add up (in the order given), first seen is the
        minimum and last seen the maximum, and session ids become ``<node>/<id>``, their union
        sorted. The same as merging the nodes' stats pairwise with
        :meth:`BehaviourStats.merged <sensor.profile.BehaviourStats.merged>`, in linear time."""
        from .profile import BehaviourStats

        every = [k for _, t in tables for k in t.keys]
        vocabulary = sorted(set(every))
        if not vocabulary:
            return {}
        where = {k: i for i, k in enumerate(vocabulary)}
        size = len(vocabulary)
        key = np.fromiter(map(where.__getitem__, every), dtype=np.int64, count=len(every))
        counts = np.concatenate([t.counts for _, t in tables], axis=1)
        times = np.concatenate([t.times for _, t in tables], axis=1)
        count, sessions = _exact_sum(key, counts[0], size), _exact_sum(key, counts[1], size)
        first, last = np.full(size, np.inf), np.full(size, -np.inf)
        np.minimum.at(first, key, times[0])
        np.maximum.at(last, key, times[1])
        ssum = np.bincount(key, weights=times[2], minlength=size)
        ssq = np.bincount(key, weights=times[3], minlength=size)

        # session ids: (behaviour, id) pairs, ids ranked by their node-qualified text, each once
        names = [f"{node}/{i}" for node, t in tables for i in t.ids]
        unique = sorted(set(names))
        rank_of = {n: i for i, n in enumerate(unique)}
        rank = np.fromiter(map(rank_of.__getitem__, names), dtype=np.int64, count=len(names))
        per_behaviour = (np.concatenate([t.offsets[1:] for _, t in tables]).astype(np.int64)
                         - np.concatenate([t.offsets[:-1] for _, t in tables]))
        pair_key = np.repeat(key, per_behaviour)
        first_id = np.cumsum([0] + [len(t.ids) for _, t in tables[:-1]])  # each table's ids in names
        pair_id = (np.concatenate([t.index for _, t in tables]).astype(np.int64)
                   + np.repeat(first_id, [len(t.index) for _, t in tables]))
        width = max(len(unique), 1)
        pairs = np.sort(pair_key * width + rank[pair_id])  # sorted and deduplicated by hand
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs  # (np.unique hashes: slower)
        pair_key, pair_rank = np.divmod(pairs, width)
        bounds = np.searchsorted(pair_key, np.arange(size + 1)).tolist()
        ids = np.array(unique, dtype=object)[pair_rank].tolist()

        first_l, last_l, ssum_l, ssq_l = first.tolist(), last.tolist(), ssum.tolist(), ssq.tolist()
        return {name: BehaviourStats(count[i], sessions[i], first_l[i], last_l[i], ssum_l[i], ssq_l[i],
                                     ids[bounds[i]:bounds[i + 1]])
                for i, name in enumerate(vocabulary)}
