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
    # Capabilities whose use is a way out of the container or around Envelope's own enforcement.
    "capability:SYS_ADMIN": ("the catch-all administrative capability: mount(2), setns(2) and unshare(2) of "
                             "most namespaces, pivot_root, swapon, quotactl and many device ioctls; with it a "
                             "process can mount the host's filesystems or proc and leave the container; admit "
                             "it explicitly"),
    "capability:SYS_PTRACE": ("ptrace(2), process_vm_readv/writev and /proc/PID/mem on any process it can see, "
                              "including other users' and the host's under hostPID: code injection, secrets "
                              "read out of memory, and a tracer that rewrites a traced process's syscalls "
                              "past its seccomp filter; admit it explicitly"),
    "capability:SYS_MODULE": "init_module(2) and delete_module(2): arbitrary code in the kernel; admit it explicitly",
    "capability:SYS_RAWIO": ("iopl(2), ioperm(2), /dev/mem, /dev/port and raw block and SCSI commands: "
                             "physical memory and devices behind every other control; admit it explicitly"),
    "capability:SYS_BOOT": "reboot(2) and kexec_load(2): a new kernel for the whole node; admit it explicitly",
    "capability:BPF": ("bpf(2) programs and maps (with PERFMON, tracing programs that read kernel memory; with "
                       "NET_ADMIN, programs on the network path) and access to pinned BPF objects, Envelope's "
                       "own enforcement among them; admit it explicitly"),
    "capability:PERFMON": ("perf_event_open(2) on the kernel and BPF tracing: reads kernel memory and other "
                           "processes' data through tracepoints and probes; admit it explicitly"),
    "capability:NET_ADMIN": ("interfaces, routes, netfilter, traffic control and XDP of the network namespace: "
                             "it can redirect or sniff traffic and remove the network policy enforced there; "
                             "admit it explicitly"),
    "capability:NET_RAW": ("raw and packet sockets send to any address without a connect or sendmsg, so the "
                           "egress envelope's hooks never see them (envelope compile lifts the seccomp socket "
                           "restriction for a policy that allows NET_RAW); admit it explicitly"),
    "capability:DAC_READ_SEARCH": ("open_by_handle_at(2) opens any file of a mounted filesystem by handle, outside "
                                   "the container's mount namespace (the 'shocker' escape), and read permission "
                                   "checks are bypassed on every file; admit it explicitly"),
    "capability:MAC_ADMIN": ("changes the mandatory access control policy (AppArmor, SELinux, Smack): switches "
                             "the LSM confinement off; admit it explicitly"),
    "capability:MAC_OVERRIDE": ("overrides mandatory access control decisions (Smack), walking past the LSM "
                                "confinement; admit it explicitly"),
    "capability:SYSLOG": ("the kernel log and kernel addresses (/proc/kallsyms, dmesg): the layout that kernel "
                          "exploits need, and syslog(2) administration; admit it explicitly"),
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
