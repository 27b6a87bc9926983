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

A table is built and packed with the standard library alone (:mod:`array`): the node's daemon
publishes tables without loading numpy (12 MB of resident memory and a thread of its own).
Checking a table read back and summing many of them use numpy, imported then.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate

# little-endian int64, float64 and int32 columns (array's "q", "d" and "i" on Linux)
_INT, _FLOAT, _INDEX = "q", "d", "i"


def _bytes(typecode: str, values) -> bytes:
    a = array(typecode, values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _values(typecode: str, data: bytes) -> list:
    a = array(typecode)
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _column(np, buf, dtype: str, rows: int, n: int, what: str):
    if not isinstance(buf, (bytes, bytearray)):
        raise TypeError(f"behaviour table {what} is {type(buf).__name__}, not bytes")
    size = array(dtype).itemsize
    if len(buf) != size * rows * n:
        raise ValueError(f"behaviour table {what}: {len(buf)} bytes for {rows} x {n} values")
    a = np.frombuffer(buf, dtype=_DTYPES[dtype])
    return a.reshape(rows, n) if rows > 1 else a


_DTYPES = {_INT: "<i8", _FLOAT: "<f8", _INDEX: "<i4"}


def _exact_sum(np, key, values, size: int) -> list[int]:
    """Per key, the sum of non-negative int64 ``values`` as exact Python ints: the high and low
    32 bits are summed apart (neither can wrap below 2**31 tables), then put together."""
    high, low = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    np.add.at(high, key, values >> 32)
    np.add.at(low, key, values & 0xFFFFFFFF)
    return [(h << 32) + lo for h, lo in zip(high.tolist(), low.tolist())]


@dataclass(frozen=True)
class BehaviourTable:
    keys: list[str]
    counts: bytes  # int64, 2 x n: count, sessions
    times: bytes  # float64, 4 x n: first seen, last seen, session sum, session sum of squares
    ids: list[str]
    offsets: bytes  # int32, n + 1
    index: bytes  # int32, offsets[-1]

    def __len__(self) -> int:
        return len(self.keys)

    def last_seen(self) -> float | None:
        n = len(self.keys)
        return max(_values(_FLOAT, self.times[8 * n:16 * n])) if n else None

    # ---- to and from BehaviourStats ------------------------------------------------------------

    @classmethod
    def from_stats(cls, behaviours: dict) -> "BehaviourTable":
        """The table of a dict of :class:`~sensor.profile.BehaviourStats`, keys sorted."""
        keys = sorted(behaviours)
        stats = [behaviours[k] for k in keys]
        ids = sorted({i for s in stats for i in s.session_ids})
        where = {i: n for n, i in enumerate(ids)}
        try:
            counts = _bytes(_INT, [s.count for s in stats] + [s.sessions for s in stats])
        except OverflowError:
            raise ValueError("a behaviour's count is past the int64 columns") from None
        times = _bytes(_FLOAT, [s.first_seen for s in stats] + [s.last_seen for s in stats]
                       + [s.session_sum for s in stats] + [s.session_sumsq for s in stats])
        offsets = _bytes(_INDEX, accumulate([0] + [len(s.session_ids) for s in stats]))
        index = _bytes(_INDEX, [where[i] for s in stats for i in s.session_ids])
        return cls(keys, counts, times, ids, offsets, index)

    def stats(self) -> dict:
        """The behaviours as a dict of new :class:`~sensor.profile.BehaviourStats`, keys in order."""
        from .profile import BehaviourStats  # profile builds on this module

        n = len(self.keys)
        counts, times = _values(_INT, self.counts), _values(_FLOAT, self.times)
        ids = [sys.intern(i) for i in self.ids]
        index, offsets = _values(_INDEX, self.index), _values(_INDEX, self.offsets)
        return {k: BehaviourStats(counts[i], counts[n + i], times[i], times[n + i], times[2 * n + i],
                                  times[3 * n + i], [ids[j] for j in index[offsets[i]:offsets[i + 1]]])
                for i, k in enumerate(self.keys)}

    # ---- packed form ---------------------------------------------------------------------------

    def pack(self) -> dict:
        return {"keys": list(self.keys), "counts": self.counts, "times": self.times, "ids": list(self.ids),
                "offsets": self.offsets, "index": self.index}

    @classmethod
    def unpack(cls, d: dict, first_time: float, last_time: float) -> "BehaviourTable":
        """A table from its packed form, checked whole: lengths agree, keys and session ids are
        distinct and in order, session offsets and indices are in range, counts and per-session
        sums are not negative and first and last seen lie in ``[first_time, last_time]``. Raises
        ValueError or TypeError otherwise."""
        import numpy as np

        keys, ids = d["keys"], d["ids"]
        if not isinstance(keys, list) or not isinstance(ids, list) or not set(map(type, keys + ids)) <= {str}:
            raise TypeError("behaviour table keys and ids are not lists of strings")
        n = len(keys)
        counts = _column(np, d["counts"], _INT, 2, n, "counts")
        times = _column(np, d["times"], _FLOAT, 4, n, "times")
        offsets = _column(np, d["offsets"], _INDEX, 1, n + 1, "offsets")
        raw = d["index"]
        if not isinstance(raw, (bytes, bytearray)) or len(raw) % 4:
            raise ValueError("behaviour table index is not a whole number of int32 values")
        index = np.frombuffer(raw, dtype="<i4")
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
        return cls(keys, bytes(d["counts"]), bytes(d["times"]), ids, bytes(d["offsets"]), bytes(raw))

    # ---- merging -------------------------------------------------------------------------------

    @staticmethod
    def merged(tables: list[tuple[str, "BehaviourTable"]]) -> dict:
        """Per behaviour, the evidence summed over ``(node name, table)`` pairs, in key order:
        counts, sessions and the per-session sums add up (in the order given), first seen is the
        minimum and last seen the maximum, and session ids become ``<node>/<id>``, their union
        sorted. The same as merging the nodes' stats pairwise with
        :meth:`BehaviourStats.merged <sensor.profile.BehaviourStats.merged>`, in linear time."""
        import numpy as np

        from .profile import BehaviourStats

        every = [k for _, t in tables for k in t.keys]
        vocabulary = sorted(set(every))
        if not vocabulary:
            return {}
        where = {k: i for i, k in enumerate(vocabulary)}
        size = len(vocabulary)
        key = np.fromiter(map(where.__getitem__, every), dtype=np.int64, count=len(every))
        counts = np.concatenate([np.frombuffer(t.counts, "<i8").reshape(2, -1) for _, t in tables], axis=1)
        times = np.concatenate([np.frombuffer(t.times, "<f8").reshape(4, -1) for _, t in tables], axis=1)
        count, sessions = _exact_sum(np, key, counts[0], size), _exact_sum(np, key, counts[1], size)
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
        offsets = [np.frombuffer(t.offsets, "<i4") for _, t in tables]
        index = [np.frombuffer(t.index, "<i4") for _, t in tables]
        per_behaviour = (np.concatenate([o[1:] for o in offsets]).astype(np.int64)
                         - np.concatenate([o[:-1] for o in offsets]))
        pair_key = np.repeat(key, per_behaviour)
        first_id = np.cumsum([0] + [len(t.ids) for _, t in tables[:-1]])  # each table's ids in names
        pair_id = np.concatenate(index).astype(np.int64) + np.repeat(first_id, [len(i) for i in index])
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
