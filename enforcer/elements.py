"""Elements: the units the confidence decision judges.

An :class:`Element` is one literal behaviour or an envelope around several (a CIDR with a port
set, ``/dir/*``, a group of syscalls that do one kind of thing, ...). It names the closure rule that made it, the
behaviour keys it covers (``members``, whose evidence it sums) and the policy entries it admits
if it passes (``entries``, e.g. ``syscall:openat``, ``egress:tcp:10.0.3.0/24:443``,
``exec:/usr/bin/*``, ``file:read:/etc/ssl/certs/*``). Entries admitted only by association (a
syscall of a group that was never seen itself) are listed in ``unobserved``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from sensor.profile import BehaviourStats
from sensor.timestamps import iso_time
from sensor.workload import SUBSTRATES, BehaviourKeyError, substrate_of

#: Confidence: an element needs at least this many occurrences over this many distinct sessions.
DEFAULT_MIN_COUNT = 5
DEFAULT_MIN_SESSIONS = 3
#: Per substrate. A syscall is judged by the sessions it recurs in, not by its volume: programs
#: make many calls exactly once per run (exit_group, set_tid_address, a reaper's wait4), and
#: a call made once in most sessions is part of the baseline. One occurrence per session is
#: what the session threshold already demands, so the count threshold for syscalls is 1.
DEFAULT_MIN_COUNTS = MappingProxyType({s: (1 if s == "syscall" else DEFAULT_MIN_COUNT) for s in SUBSTRATES})
#: Closure: more than this many distinct siblings in one directory widen to the directory.
DEFAULT_MAX_SIBLINGS = 3

#: Behaviours that open a way around enforcement: evidence alone never admits them; they stay in
#: review (and on the watch list) until ``--admit KEY --reason TEXT`` admits them explicitly.
ADMIT_ONLY = {
    "syscall:io_uring_setup": ("io_uring runs reads, writes, connects and sends inside the kernel "
                               "where seccomp cannot see them; admit it explicitly"),
}


def admit_only(members) -> str:
    """Why an element covering ``members`` needs an explicit admit, or ``""``."""
    return next((ADMIT_ONLY[m] for m in members if m in ADMIT_ONLY), "")


SESSION_RULES = {
    "union": ("an element's distinct sessions are the union of the session ids of the behaviours it "
              "covers: exact while each behaviour's session sample is complete (under the profile's "
              "cap), otherwise the larger of that union and the largest member count, a lower bound"),
    "max": ("an element's distinct sessions are the largest session count among the behaviours it "
            "covers: a lower bound, because per-behaviour counts cannot show which sessions overlap"),
    "sum": ("an element's distinct sessions are the sum of the session counts of the behaviours it "
            "covers: an upper bound that assumes they never share a session (chosen explicitly)"),
}


@dataclass
class Element:
    """One unit the confidence rule judges (see the module docstring)."""

    id: str
    substrate: str
    rule: str
    members: list[str]
    detail: str = ""
    flags: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()
    unobserved: frozenset[str] = frozenset()
    encodable: bool = True

    def evidence(self, stats: Mapping[str, BehaviourStats], session_rule: str = "union") -> dict:
        ss = [stats[m] for m in self.members]
        if session_rule == "sum":
            sessions = sum(s.sessions for s in ss)
        elif session_rule == "union":
            union = len(set().union(*(s.session_ids for s in ss)))
            exact = all(s.sessions_complete for s in ss)
            sessions = union if exact else max([union] + [s.sessions for s in ss])
        else:
            sessions = max((s.sessions for s in ss), default=0)
        return {
            "count": sum(s.count for s in ss),
            "sessions": sessions,
            "firstSeen": iso_time(min(s.first_seen for s in ss)),
            "lastSeen": iso_time(max(s.last_seen for s in ss)),
            "behaviours": sorted(self.members),
        }


def provenance_record(substrate: str, rule: str, evidence: dict, reason: str | None = None, detail: str = "",
                      flags: tuple[str, ...] = ()) -> dict:
    """What provenance says of an admitted element: its rule, how it was admitted (threshold, or
    an explicit admit with its reason), its evidence, and its detail and flags when it has them."""
    out = {"substrate": substrate, "rule": rule, "admitted": "admit" if reason is not None else "threshold",
           "evidence": evidence}
    if reason is not None:
        out["reason"] = reason
    if detail:
        out["detail"] = detail
    if flags:
        out["flags"] = list(flags)
    return out


def shortfall(evidence: dict, min_count: int, min_sessions: int) -> str:
    """Why an element is below the confidence threshold, e.g. ``count 1 < 5; sessions 1 < 3``."""
    short = []
    if evidence["count"] < min_count:
        short.append(f"count {evidence['count']} < {min_count}")
    if evidence["sessions"] < min_sessions:
        short.append(f"sessions {evidence['sessions']} < {min_sessions}")
    return "; ".join(short) or "below threshold"


def substrate_or_none(key: str) -> str | None:
    """The substrate of a behaviour key, or None for a kind no substrate encodes."""
    try:
        return substrate_of(key)
    except BehaviourKeyError:
        return None
