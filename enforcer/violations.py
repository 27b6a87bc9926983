"""Violations: the model, the JSONL store, and the judgement of watch-list and detection rules.

A :class:`Violation` is one out-of-envelope behaviour of one workload::

    {"time": 1795706876.57, "workload": "host/Unit/demo/main", "substrate": "egress",
     "behaviour": "connect:tcp:127.0.0.1:9", "action": "denied", "count": 1,
     "detail": {"pid": 4242, "comm": "python3", "session": "exec-901-1", "cgroup_id": 8123}}

``substrate`` is ``syscall``, ``egress``, ``exec``, ``file`` or ``http`` for what the kernel denied
or alerted on, ``mcp`` for what the MCP gateway refused or alerted on (:mod:`enforcer.mcp_controls`), ``watch``
for a behaviour on the policy's watch list that recurred, ``detection`` for a probabilistic rule
whose live per-session count left its band (a soft violation), and ``integrity`` for enforcement
state someone changed behind Envelope's back (repaired at once). ``action`` is
``denied`` (the kernel refused it) or ``alerted`` (it ran and was reported). ``count`` > 1 folds
identical records (same workload, substrate, behaviour, action and detail) seen within one
flush. Every violation names its process (``pid``, and ``comm`` where the kernel reported it)
and its session (``session``, where the reporter knows it); a network call a seccomp filter
denied names the destination it asked for (``destination``), or for a denied ``socket`` the
``socket`` it asked for.

The store is ``<state-dir>/violations.jsonl``: one JSON object per line, appended under an
exclusive ``flock`` with one ``write`` per batch. Kernel records are turned into violations by
pure functions (:func:`from_record`, :func:`from_egress_event`, :func:`from_dns_event`,
:func:`from_seccomp_event`, :func:`from_file_denial`) on events decoded by :mod:`sensor.events`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable

from sensor.state_dir import StateDir, private_dirs
from sensor.events import (
    DecodeError, DnsViolationEvent, EgressViolationEvent, FileDenialEvent, HttpViolationEvent,
    IoUringOpEvent, SeccompDenialEvent, decode,
)
from sensor.file_access import behaviours as file_behaviours
from sensor.workload import SUBSTRATES as BEHAVIOUR_SUBSTRATES
from sensor.workload import substrate_of, syscall_key

SUBSTRATES = (*BEHAVIOUR_SUBSTRATES, "watch", "detection", "integrity")
ACTIONS = ("denied", "alerted")


class ViolationStoreError(Exception):
    """The violations file cannot be read or written; the message names it."""


@dataclass(frozen=True)
class Violation:
    time: float
    workload: str
    substrate: str
    behaviour: str
    action: str
    detail: dict = field(default_factory=dict, compare=False, hash=False)
    count: int = 1

    def __post_init__(self) -> None:
        if self.substrate not in SUBSTRATES:
            raise ValueError(f"violation substrate {self.substrate!r} is not one of {', '.join(SUBSTRATES)}")
        if self.action not in ACTIONS:
            raise ValueError(f"violation action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.count < 1:
            raise ValueError(f"violation count must be >= 1, got {self.count}")

    def fold_key(self) -> tuple:
        return (self.workload, self.substrate, self.behaviour, self.action,
                json.dumps(self.detail, sort_keys=True, default=str))

    def to_dict(self) -> dict:
        return {"time": self.time, "workload": self.workload, "substrate": self.substrate,
                "behaviour": self.behaviour, "action": self.action, "count": self.count,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict) -> "Violation":
        return cls(float(d["time"]), str(d["workload"]), str(d["substrate"]), str(d["behaviour"]),
                   str(d["action"]), dict(d.get("detail") or {}), int(d.get("count", 1)))


def fold(violations: Iterable[Violation]) -> list[Violation]:
    """Merge identical records (see :meth:`Violation.fold_key`), keeping the first time and
    summing counts; order of first appearance is kept."""
    out: dict[tuple, Violation] = {}
    for v in violations:
        k = v.fold_key()
        prev = out.get(k)
        if prev is None:
            out[k] = v
        else:
            out[k] = Violation(min(prev.time, v.time), v.workload, v.substrate, v.behaviour,
                               v.action, prev.detail, prev.count + v.count)
    return list(out.values())


class ViolationFold:
    """Violations folded as they arrive, in bounded memory whatever the rate.

    :meth:`add` folds by :meth:`Violation.fold_key` (counts summed, first time kept). At most
    ``cap`` distinct keys are held between two :meth:`take` calls; a violation with a new key
    beyond that is folded into one ``overflow`` record per (workload, substrate, action), whose
    detail counts the distinct keys it stands for, so nothing is dropped uncounted.
    """

    def __init__(self, cap: int = 4096):
        self.cap = cap
        self._held: dict[tuple, Violation] = {}
        self._overflow: dict[tuple, list] = {}  # (workload, substrate, action) -> [time, count, keys]
        self.total = 0  # violations (counts) folded since creation

    def __len__(self) -> int:
        return len(self._held) + len(self._overflow)

    def add(self, v: Violation) -> None:
        self.total += v.count
        k = v.fold_key()
        prev = self._held.get(k)
        if prev is not None:
            self._held[k] = Violation(min(prev.time, v.time), v.workload, v.substrate, v.behaviour,
                                      v.action, prev.detail, prev.count + v.count)
        elif len(self._held) < self.cap:
            self._held[k] = v
        else:
            o = self._overflow.setdefault((v.workload, v.substrate, v.action), [v.time, 0, 0])
            o[1] += v.count
            o[2] += 1

    def add_all(self, vs: Iterable[Violation]) -> None:
        for v in vs:
            self.add(v)

    def has_new(self, known: set) -> bool:
        """Is a key held that is not in ``known`` (or an overflow record)?"""
        return bool(self._overflow) or any(k not in known for k in self._held)

    def take(self) -> list[Violation]:
        """Everything folded since the last call, in order of first appearance."""
        out = list(self._held.values())
        for (workload, substrate, action), (t, count, keys) in self._overflow.items():
            out.append(Violation(t, workload, substrate, f"{substrate}:overflow", action,
                                 {"overflow": True, "distinct": keys,
                                  "reason": f"more than {self.cap} distinct violations between "
                                            f"two writes to the store"}, count))
        self._held, self._overflow = {}, {}
        return out


class ViolationStore:
    """Append-only JSONL file of violations under the state dir."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = StateDir(state_dir).violations

    def append(self, violations: Iterable[Violation], durable: bool = True) -> int:
        """Append ``violations`` in one locked ``write``. ``durable`` fsyncs the file (a killed
        writer loses nothing it wrote either way: the write is in the page cache)."""
        lines = "".join(json.dumps(v.to_dict(), sort_keys=True, default=str) + "\n" for v in violations)
        if not lines:
            return 0
        private_dirs(self.path.parent)
        data = lines.encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ViolationStoreError(f"{self.path}: cannot open for append: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        return lines.count("\n")

    def list(self, workload: str | None = None, substrate: str | None = None,
             action: str | None = None, since: float | None = None) -> list[Violation]:
        """Violations in file order, filtered. ``workload`` matches the full key or its name."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text()
        except OSError as e:
            raise ViolationStoreError(f"{self.path}: cannot read: {e.strerror}") from e
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                v = Violation.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                raise ViolationStoreError(f"{self.path}:{n}: bad violation record: {e}") from None
            if workload and not workload_matches(v.workload, workload):
                continue
            if substrate and v.substrate != substrate:
                continue
            if action and v.action != action:
                continue
            if since is not None and v.time < since:
                continue
            out.append(v)
        return out


def workload_matches(key: str, wanted: str) -> bool:
    """``wanted`` is a full workload key or just the workload's name (third field)."""
    if key == wanted:
        return True
    parts = key.split("/")
    return len(parts) == 4 and parts[2] == wanted


# ---- kernel records (decoded by sensor.events, the mirrors of bpf/events.h) ------------------


def egress_behaviour(ev: EgressViolationEvent) -> str:
    key = ev.behaviour_key()
    if key is not None:
        return key
    host = f"[{ev.addr}]" if ":" in ev.addr else ev.addr
    return f"{ev.op}:{ev.proto}:{host}:{ev.port}"  # e.g. an ICMP ping socket's connect


def _process(pid: int, comm: str, session: str | None, cgroup_id: int) -> dict[str, Any]:
    d: dict[str, Any] = {"pid": pid}
    if comm:
        d["comm"] = comm
    if session:
        d["session"] = session
    d["cgroup_id"] = cgroup_id
    return d


def from_egress_event(ev: EgressViolationEvent, workload: str, now: float,
                      session: str | None = None) -> Violation:
    return Violation(now, workload, "egress", egress_behaviour(ev), ev.action,
                     _process(ev.pid, ev.comm, session, ev.cgroup_id))


def from_dns_event(ev: DnsViolationEvent, workload: str, now: float,
                   session: str | None = None) -> Violation:
    """An answer for a name no entry allows: its addresses were not learned, so connects to
    them stay outside the envelope; the answer itself reached the workload (alerted). The
    packet hook runs in no process's context, so only the session names who asked."""
    detail: dict[str, Any] = {"cgroup_id": ev.cgroup_id, "qtype": ev.qtype}
    if session:
        detail["session"] = session
    return Violation(now, workload, "egress", ev.behaviour_key() or "dns:", ev.action, detail)


_IPPROTO_NAMES = {0: "default", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp",
                  255: "raw", 262: "mptcp"}


def socket_arguments(domain: int, type_: int, protocol: int) -> dict:
    """``socket(2)``'s arguments by name, e.g. ``{"family": "AF_PACKET", "type": "SOCK_RAW", ...}``."""
    import socket
    try:
        family = socket.AddressFamily(domain).name
    except ValueError:
        family = str(domain)
    try:
        kind = socket.SocketKind(type_ & 0xF).name
    except ValueError:
        kind = str(type_ & 0xF)
    return {"family": family, "type": kind, "protocol": _IPPROTO_NAMES.get(protocol, str(protocol))}


def from_seccomp_event(ev: SeccompDenialEvent, workload: str, now: float,
                       allowed: Collection[str] = (), session: str | None = None) -> Violation:
    """A denial carries ``ret = -errno``; an alert-mode report (made at entry) carries 0. A
    denied network call names the destination it asked for, a denied ``socket`` the socket; a
    ``socket`` call the profile allows was stopped by its argument checks (the socket
    restriction of :mod:`enforcer.seccomp`): the detail says why."""
    action = "denied" if ev.ret < 0 else "alerted"
    detail = _process(ev.pid, ev.comm, session, ev.cgroup_id)
    detail["nr"] = ev.nr
    if ev.ret < 0:
        detail["errno"] = -ev.ret
    if ev.destination:
        detail["destination"] = ev.destination
    if ev.name == "socket":
        detail["socket"] = socket_arguments(*ev.args)
        if "socket" in allowed:
            from .seccomp import SOCKET_REASON
            detail["why"] = SOCKET_REASON
    return Violation(now, workload, "syscall", ev.behaviour_key(), action, detail)


def from_http_event(ev: HttpViolationEvent, workload: str, now: float,
                    session: str | None = None) -> Violation:
    """A request the probe judged outside the envelope: ``killed`` (enforce) is ``denied``."""
    from sensor.httpkeys import normalize_host
    host = normalize_host(ev.host, ev.tls) if ev.host else "?"
    behaviour = f"http:{ev.method or '?'} {host}{ev.path or '/'}"
    detail = _process(ev.pid, ev.comm, session, ev.cgroup_id)
    detail.update({"method": ev.method, "host": host, "path": ev.path, "tls": ev.tls,
                   "reason": ev.reason})
    if ev.action == "killed":
        detail["enforced"] = "process killed before the request was sent"
    return Violation(now, workload, "http", behaviour, "denied" if ev.action == "killed" else "alerted", detail)


def from_file_denial(ev: FileDenialEvent, workload: str, now: float, path: str | None,
                     allows: Callable[[str], bool], is_dir: bool | None = None) -> list[Violation]:
    """A file call refused with -EACCES (``bpf/files.c``) as violations, one per behaviour the
    call asked for that ``allows`` (the policy) does not admit: Landlock allows what the policy
    allows, so an -EACCES on an allowed access was an ordinary permission check and is not
    reported. ``path`` is the absolute path (None: a relative path that could no longer be
    resolved; it is reported as given); ``is_dir``: the path is a directory."""
    asked = file_behaviours(ev.access, path if path is not None else ev.path, is_dir)
    detail: dict[str, Any] = {"pid": ev.pid, "tid": ev.tid, "comm": ev.comm, "cgroup_id": ev.cgroup_id,
                              "syscall": ev.syscall,
                              "path": ev.path, "access": [b.split(":", 2)[1] if b.startswith("file:") else "exec"
                                                          for b in asked],
                              "errno": "EACCES", "enforcer": "landlock"}
    if path is None:
        detail["unresolved"] = True
    if ev.truncated:
        detail["truncated"] = True
    out = []
    for b in asked:
        if path is not None and allows(b):
            continue
        out.append(Violation(now, workload, "exec" if b.startswith("exec:") else "file", b, "denied", detail))
    return out


def from_io_uring_event(ev: IoUringOpEvent, workload: str, now: float,
                        allowed: Collection[str], session: str | None = None) -> Violation | None:
    """An io_uring operation whose syscall the cgroup's profile does not allow. The ring runs it
    without the syscall, so seccomp cannot stop it: the report is ``alerted``, never ``denied``,
    and names the syscall so an exception or a rebaseline for it covers the operation too."""
    if ev.syscall is None or ev.syscall in allowed:
        return None
    detail = _process(ev.pid, "", session, ev.cgroup_id)
    detail.update({"via": "io_uring", "op": ev.op, "opcode": ev.opcode, "sq_thread": ev.sq_thread})
    return Violation(now, workload, "syscall", syscall_key(ev.syscall), "alerted", detail)


def from_record(raw: bytes, workload_of: Callable[[int], str | None], now: float,
                allowed_of: Callable[[int], Collection[str]] = lambda _cid: (),
                session_of: Callable[[int], str | None] | None = None
                ) -> Violation | DecodeError | None:
    """One ring-buffer record to a violation. A record that does not decode comes back as the
    :class:`sensor.events.DecodeError` (to be counted); the rest as :func:`from_event`."""
    ev = decode(raw)
    if isinstance(ev, DecodeError):
        return ev
    return from_event(ev, workload_of, now, allowed_of, session_of)


def from_event(ev, workload_of: Callable[[int], str | None], now: float,
               allowed_of: Callable[[int], Collection[str]] = lambda _cid: (),
               session_of: Callable[[int], str | None] | None = None) -> Violation | None:
    """One decoded kernel event to a violation. One whose cgroup has no known workload is
    attributed to ``unknown``; other event types give ``None``. ``allowed_of`` gives the
    syscalls a cgroup's profile allows (io_uring operations and sockets are judged against it);
    ``session_of`` the session of a cgroup, when the caller knows it."""
    session = session_of(ev.cgroup_id) if session_of is not None and hasattr(ev, "cgroup_id") else None
    if isinstance(ev, EgressViolationEvent):
        return from_egress_event(ev, workload_of(ev.cgroup_id) or "unknown", now, session)
    if isinstance(ev, SeccompDenialEvent):
        return from_seccomp_event(ev, workload_of(ev.cgroup_id) or "unknown", now,
                                  allowed_of(ev.cgroup_id), session)
    if isinstance(ev, IoUringOpEvent):
        return from_io_uring_event(ev, workload_of(ev.cgroup_id) or "unknown", now,
                                   allowed_of(ev.cgroup_id), session)
    if isinstance(ev, DnsViolationEvent):
        return from_dns_event(ev, workload_of(ev.cgroup_id) or "unknown", now, session)
    if isinstance(ev, HttpViolationEvent):
        return from_http_event(ev, workload_of(ev.cgroup_id) or "unknown", now, session)
    return None


# ---- watch list and probabilistic detection -------------------------------------------------


class Judge:
    """Judges one workload's live behaviour against its policy's watch list and detection rules.

    Feed it observed behaviour keys per session with :meth:`observe`; it returns new violations:

    * ``watch``: a key on the policy's watch list recurs. Reported once per session, the first
      time it is seen there, whether or not the policy allows it.
    * ``detection``: a key with a detection rule ``{key, mean, std, k}`` whose count in the live
      session rises above ``mean + k*std``; reported once per session when it crosses. At
      :meth:`close_session` a count that ended below ``mean - k*std`` (when that is above zero)
      is reported too. Soft violations: always ``alerted``.
    * ``exec`` / ``file``: with ``report_execs`` / ``report_files``, every exec or file access
      outside the policy's allowed entries that happened (``alerted``). Landlock has no log-only
      mode, so in alert mode this is how a run learns what enforce would deny; in enforce mode
      what Landlock refuses never happens (it is a ``denied`` violation from the kernel), and
      what still shows up here got through a ruleset wider than the policy (a ``dir/*`` entry is
      a hierarchy rule). ``enforced`` names the substrates enforced for this workload (Landlock,
      a capability drop), when known; the detail says whether this one was. An exec counts as
      inside the policy when it is allowed or an alerted review item, judged by ``exec_admits``
      when given (names resolved through aliases and symlinks, :mod:`enforcer.exec_paths`).
    * ``capability``: with ``report_capabilities``, every granted capability check outside the
      policy's capabilities, reported once per session and capability: the process held it, so
      whoever starts it (the kubelet with the policy's ``securityContext.capabilities``, a launcher)
      did not drop it.

    A behaviour that was refused (``denied=True``: a kernel denial seen again by detection) is
    only judged against the watch list and detection rules.
    """

    def __init__(self, policy, workload: str | None = None, report_execs: bool = False,
                 report_files: bool = False, report_capabilities: bool = False,
                 enforced: frozenset[str] | set[str] | None = None,
                 exec_admits: Callable[[str], bool] | None = None):
        self.workload = workload or str(policy.workload)
        self.report = {s for s, on in (("exec", report_execs), ("file", report_files),
                                       ("capability", report_capabilities))
                       if on and s in policy.substrates}
        self.enforced = None if enforced is None else frozenset(enforced)
        self._exec_admits = exec_admits
        self._capabilities: set[tuple[str, str]] = set()
        self.watch = frozenset(policy.watch)
        self.rules = {r["key"]: r for r in policy.detection}
        self.counts: dict[str, Counter] = {}
        self._watched: set[tuple[str, str]] = set()
        self._crossed: set[tuple[str, str]] = set()
        self._allows = policy.allows
        self._policy = policy

    def interested(self, key: str) -> bool:
        return key in self.watch or key in self.rules

    @property
    def report_execs(self) -> bool:
        return "exec" in self.report

    def observe(self, session: str, key: str, count: int = 1, now: float = 0.0,
                denied: bool = False) -> list[Violation]:
        out: list[Violation] = []
        c = self.counts.setdefault(session, Counter())
        c[key] += count
        kind = key.split(":", 1)[0]
        if not denied and kind in self.report and not self._admitted(kind, key) \
                and (kind != "capability" or (session, key) not in self._capabilities):
            if kind == "capability":
                self._capabilities.add((session, key))
            detail: dict[str, Any] = {"session": session}
            if self.enforced is not None or kind == "capability":
                detail["enforced"] = kind in (self.enforced or ())
            out.append(Violation(now, self.workload, kind, key, "alerted", detail, count))
        if key in self.watch and (session, key) not in self._watched:
            self._watched.add((session, key))
            try:
                sub = substrate_of(key)
            except ValueError:
                sub = "unknown"
            out.append(Violation(now, self.workload, "watch", key, "alerted",
                                 {"session": session, "substrate": sub,
                                  "allowed": bool(self._safe_allows(key))}))
        rule = self.rules.get(key)
        if rule is not None and (session, key) not in self._crossed:
            upper = float(rule["mean"]) + float(rule["k"]) * float(rule["std"])
            if c[key] > upper:
                self._crossed.add((session, key))
                out.append(Violation(now, self.workload, "detection", key, "alerted",
                                     {"session": session, "count": c[key], "mean": rule["mean"],
                                      "std": rule["std"], "k": rule["k"], "bound": "above",
                                      "threshold": round(upper, 6)}))
        return out

    def close_session(self, session: str, now: float = 0.0) -> list[Violation]:
        out: list[Violation] = []
        c = self.counts.pop(session, Counter())
        for key, rule in sorted(self.rules.items()):
            lower = float(rule["mean"]) - float(rule["k"]) * float(rule["std"])
            if lower > 0 and c[key] < lower and (session, key) not in self._crossed:
                out.append(Violation(now, self.workload, "detection", key, "alerted",
                                     {"session": session, "count": c[key], "mean": rule["mean"],
                                      "std": rule["std"], "k": rule["k"], "bound": "below",
                                      "threshold": round(lower, 6)}))
        self._watched = {x for x in self._watched if x[0] != session}
        self._capabilities = {x for x in self._capabilities if x[0] != session}
        self._crossed = {x for x in self._crossed if x[0] != session}
        return out

    def _admitted(self, kind: str, key: str) -> bool:
        """Is this behaviour let through: allowed, or for an exec allowed or a review item alerted
        (judged by ``exec_admits`` when given: one that resolves aliases and symlinks,
        :mod:`enforcer.exec_paths`)."""
        if kind != "exec":
            return self._safe_allows(key)
        if self._exec_admits is not None:
            return self._exec_admits(key)
        admits = getattr(self._policy, "admits", None)
        try:
            return admits(key) if admits is not None else self._allows(key)
        except ValueError:
            return False

    def _safe_allows(self, key: str) -> bool:
        try:
            return self._allows(key)
        except ValueError:
            return False
