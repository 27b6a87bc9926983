"""Seccomp denial visibility: the loader for ``bpf/denials.c``.

A syscall that a seccomp filter denies never reaches the ``sys_enter`` tracepoint (seccomp runs
first) but does reach raw ``sys_exit`` with its number and ``-errno``. For each watched cgroup
the program marks every thread's syscall at raw ``sys_enter``; a raw ``sys_exit`` that returns
``-deny_errno`` without a matching mark was stopped before entry, i.e. by seccomp. An ordinary
EPERM from a permission check has entered and is not reported. In alert mode (the filter's
default action is ``SCMP_ACT_LOG``) calls outside the cgroup's allowed set are reported at entry.

One :class:`DenialProbe` serves many cgroups: :meth:`DenialProbe.watch` adds one with its mode,
errno and allowed set. Every denial is counted in the kernel (``counts``, keyed by cgroup,
process, syscall, the call's context and kind), whatever the rate; the first of each key comes
out of the ``events`` ring buffer with its context (read them with a
:class:`sensor.kernel.RingReader` on :attr:`DenialProbe.events_fd`), and :meth:`counts` reads
the running totals. The programs are compiled by
the loader child of :mod:`sensor.kernel` and attached to raw tracepoints for as long as this
object's fds are open; they are not pinned: the seccomp filters themselves live in the kernel
independently of them, and a restarted loader re-registers the cgroups it enforces.
"""

from __future__ import annotations

from typing import Iterable

import structlog

from sensor import features, kernel, syscalls
from sensor.kernel import BpfError, Family, LoadError, Map, Program
from sensor.mirrors import (DENIAL_F_SOCKETS, DENIAL_KIND_ALERTED, DENIAL_KIND_DENIED,
                            DENIALS_LOST_COUNTS_FULL, DENIALS_LOST_RINGBUF, DENIALS_MODE_ALERT,
                            DENIALS_MODE_ENFORCE, DENIALS_MODE_WATCH, DENIALS_NR_SLOTS, U32, U64,
                            DenialCgroup, DenialCount, DenialKey)

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "denials.c"
#: "watch": cgroup migrations only (a policy that leaves syscalls out still keeps its cgroup)
MODE_CODES = {"watch": DENIALS_MODE_WATCH, "alert": DENIALS_MODE_ALERT, "enforce": DENIALS_MODE_ENFORCE}
MAPS = ("cgroups", "counts", "lost", "events")
#: the syscalls whose arguments the programs read (socket's, and the destination of the others)
ARGUMENT_SYSCALLS = ("socket", "connect", "sendto", "sendmsg", "sendmmsg")


class DenialProbeError(Exception):
    """The denial probe could not be loaded or configured; the message says where."""


IO_URING_TRACEPOINT = "io_uring/io_uring_submit_req"


def io_uring_traceable() -> bool:
    """Whether this kernel has the io_uring submission tracepoint (CONFIG_IO_URING)."""
    root = features.tracefs_path()
    return root is not None and (root / "events" / IO_URING_TRACEPOINT).is_dir()


def family(max_cgroups: int = 1024, max_threads: int = 32768, ringbuf_pages: int = 64,
           io_uring: bool | None = None, max_keys: int = 16384) -> Family:
    """The denial programs; with ``io_uring`` (default: when the kernel has the tracepoint) also
    the program announcing each io_uring opcode an enforced cgroup submits."""
    if io_uring is None:
        io_uring = io_uring_traceable()
    programs = (Program("raw_tracepoint__sys_enter", "raw_tracepoint", "sys_enter"),
                Program("raw_tracepoint__sys_exit", "raw_tracepoint", "sys_exit"),
                Program("tracepoint__cgroup__cgroup_attach_task", "tracepoint",
                        "cgroup:cgroup_attach_task"))
    if io_uring:
        programs += (Program("tracepoint__io_uring__io_uring_submit_req", "tracepoint",
                             IO_URING_TRACEPOINT.replace("/", ":")),)
    return Family(
        "seccomp-denials", str(SOURCE),
        (f"-I{kernel.BPF_DIR}", f"-DDENIALS_MAX_CGROUPS={max_cgroups}",
         f"-DDENIALS_MAX_THREADS={max_threads}", f"-DDENIALS_RINGBUF_PAGES={ringbuf_pages}",
         f"-DDENIALS_IO_URING={int(io_uring)}", f"-DDENIALS_MAX_KEYS={max_keys}",
         *(f"-DDENIALS_NR_{n.upper()}={syscalls.NUMBERS[n]}" for n in ARGUMENT_SYSCALLS)),
        programs, MAPS, fix="needs BPF raw tracepoints; run `envelope doctor`")


def syscall_numbers(names: Iterable[str]) -> list[int]:
    """Syscall numbers (the sensor's x86_64 table) for ``names``; unknown names are skipped."""
    out = set()
    for n in names:
        nr = syscalls.number(n)
        if nr is None:
            log.debug("syscall name not in the table", name=n)
        else:
            out.add(nr)
    return sorted(out)


def allowed_bitmap(numbers: Iterable[int]) -> list[int]:
    words = [0] * (DENIALS_NR_SLOTS // 64)
    for nr in numbers:
        if 0 <= nr < DENIALS_NR_SLOTS:
            words[nr // 64] |= 1 << (nr % 64)
    return words


def denial_key(cgroup_id: int, pid: int, nr: int, context: int, denied: bool) -> bytes:
    """The ``counts`` key of a record (pure): what the first sighting and the totals share."""
    return DenialKey.pack(cgroup_id=cgroup_id, pid=pid, nr=nr, context=context,
                          kind=DENIAL_KIND_DENIED if denied else DENIAL_KIND_ALERTED)


def parse_denial_key(key: bytes) -> dict:
    d = DenialKey.unpack(key)
    d["denied"] = d.pop("kind") == DENIAL_KIND_DENIED
    return d


def cgroup_entry(mode: str, deny_errno: int, allowed_syscalls: Iterable[str] = (),
                 restrict_sockets: bool = False) -> bytes:
    """The ``struct denial_cgroup`` value for one watched cgroup (pure). ``restrict_sockets``:
    the filter allows ``socket`` only for :data:`enforcer.seccomp.SOCKET_ALLOWED`."""
    if mode not in MODE_CODES:
        raise DenialProbeError(f"unknown mode {mode!r} (watch, alert or enforce)")
    words = allowed_bitmap(syscall_numbers(allowed_syscalls))
    return DenialCgroup.pack(mode=MODE_CODES[mode], deny_errno=int(deny_errno),
                             flags=DENIAL_F_SOCKETS if restrict_sockets else 0,
                             **{f"allowed{i}": w for i, w in enumerate(words)})


class DenialProbe:
    """raw sys_enter + raw sys_exit programs reporting seccomp denials for watched cgroups."""

    def __init__(self, max_cgroups: int = 1024, max_threads: int = 32768, ringbuf_pages: int = 64):
        try:
            self._loaded = kernel.load(family(max_cgroups, max_threads, ringbuf_pages))
        except LoadError as e:
            raise DenialProbeError(str(e)) from e
        self._cgroups = Map(self._loaded.maps["cgroups"], "cgroups")
        self._counts = Map(self._loaded.maps["counts"], "counts")
        self._lost = Map(self._loaded.maps["lost"], "lost")
        self.events_fd = self._loaded.maps["events"]
        #: io_uring operations are announced (the kernel has the submission tracepoint)
        self.io_uring = any("io_uring" in name for name in self._loaded.attachments)
        self.watched: dict[int, str] = {}
        log.info("seccomp denial probe loaded")

    def watch(self, cgroup_id: int, mode: str, deny_errno: int,
              allowed_syscalls: Iterable[str] = (), restrict_sockets: bool = False) -> None:
        """Report for ``cgroup_id``: denials returning ``-deny_errno`` (enforce) or calls outside
        ``allowed_syscalls`` (alert; with ``restrict_sockets`` also ``socket`` calls outside the
        filter's socket table). Observe mode watches nothing."""
        if mode == "observe":
            self.unwatch(cgroup_id)
            return
        try:
            self._cgroups.update(U64.pack(cgroup_id),
                                 cgroup_entry(mode, deny_errno, allowed_syscalls, restrict_sockets))
        except BpfError as e:
            raise DenialProbeError(f"watch cgroup {cgroup_id}: {e}") from e
        self.watched[cgroup_id] = mode

    def unwatch(self, cgroup_id: int) -> None:
        self._cgroups.delete(U64.pack(cgroup_id))
        self.watched.pop(cgroup_id, None)

    def mode_of(self, cgroup_id: int) -> str | None:
        return self.watched.get(cgroup_id)

    def counts(self) -> list[tuple[bytes, int]]:
        """Every key's running total: (``counts`` key, calls so far)."""
        try:
            return [(k, DenialCount.unpack(v)["count"]) for k, v in self._counts.items()]
        except BpfError as e:
            raise DenialProbeError(f"read counts: {e}") from e

    def forget(self, key: bytes) -> None:
        """Drop a key whose total was read (a later call announces it again, counting from 1)."""
        self._counts.delete(key)

    def lost(self) -> int:
        """First-sighting records dropped because the ring buffer was full (summed over CPUs);
        their calls are still counted."""
        return self._lost.percpu_sum(U32.pack(DENIALS_LOST_RINGBUF))

    def uncounted(self) -> int:
        """Calls announced one record each because ``counts`` was full."""
        return self._lost.percpu_sum(U32.pack(DENIALS_LOST_COUNTS_FULL))

    def close(self) -> None:
        """Detach (the raw tracepoint fds close) and drop the maps."""
        self._loaded.close()
