"""The sensor's loader: compiles ``bpf/sensor.c`` with BCC, attaches it, and reads it back.

:class:`Sensor` is the whole userspace API of the kernel side:

- :meth:`Sensor.poll` drains the ring buffer and returns decoded events
  (:mod:`sensor.events`); decode failures are counted, never raised.
- :meth:`Sensor.syscall_counts` reads the cumulative per-(cgroup, syscall) counters, summed
  over CPUs. Nothing is drained: callers take deltas.
- :meth:`Sensor.loss` reports ring-buffer reserve failures per event type (counted in the
  kernel) plus decode failures (counted here).
- :meth:`Sensor.forget_cgroup` frees the counter slot of a cgroup that is gone.

Every attachment is tied to a file descriptor of this process (raw tracepoint, perf event, BPF
link), so if the process dies everything detaches; nothing is pinned.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from itertools import compress
from pathlib import Path
from typing import Sequence

import structlog

from . import features, syscalls
from .events import (
    EV_EXEC, EV_EXIT, EV_FORK, EV_NET, EV_SYSCALL_FIRST, LOSS_CGROUP_REMOVED_DROPPED,
    LOSS_SYSCALL_UNATTRIBUTED,
    SYSCALL_NR_SLOTS, Decoder, Event, SyscallSlotCounts, SyscallSlotState,
)

log = structlog.get_logger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SENSOR_C = BPF_DIR / "sensor.c"

# bpf_attach_type values of the cgroup sock_addr hooks (uapi/linux/bpf.h).
_SOCK_ADDR_HOOKS = (
    ("envelope_connect4", 10, "connect4"),
    ("envelope_connect6", 11, "connect6"),
    ("envelope_sendmsg4", 14, "sendmsg4"),
    ("envelope_sendmsg6", 15, "sendmsg6"),
)
_TRACEPOINTS = (
    "cgroup:cgroup_attach_task",
    "cgroup:cgroup_transfer_tasks",
    "cgroup:cgroup_rmdir",
    "sched:sched_process_fork",
    "sched:sched_process_exec",
    "sched:sched_process_exit",
)
_NET_RESULT_TRACEPOINTS = (
    "syscalls:sys_exit_connect",
    "syscalls:sys_exit_sendto",
    "syscalls:sys_exit_sendmsg",
    "syscalls:sys_exit_sendmmsg",
)
# Checks whose failure makes attaching pointless; the others are reported by `envelope doctor`.
_REQUIRED = (
    features.check_root, features.check_arch, features.check_bcc,
    features.check_bpf_permission, features.check_kernel_headers, features.check_tracefs,
    features.check_tracepoints, features.check_raw_tracepoint, features.check_ringbuf,
    features.check_cgroup2, features.check_cgroup_bpf,
)
LOSS_NAMES = {
    EV_EXEC: "ringbuf_full_exec",
    EV_FORK: "ringbuf_full_fork",
    EV_EXIT: "ringbuf_full_exit",
    EV_NET: "ringbuf_full_net",
    EV_SYSCALL_FIRST: "ringbuf_full_syscall_first",
    LOSS_SYSCALL_UNATTRIBUTED: "syscall_unattributed",
    LOSS_CGROUP_REMOVED_DROPPED: "cgroup_removed_dropped",
}
SLOT_REUSE_GRACE = 0.1  # seconds a forgotten slot waits before reuse (see forget_cgroup)
_BPF_NOEXIST = 1


class ProbeAttachError(RuntimeError):
    """A probe could not be loaded or attached: ``"<probe>: <what failed>; fix: <action>"``."""


def _define(cflags: Sequence[str], name: str) -> str | None:
    val = None
    for f in cflags:
        m = re.fullmatch(rf"-D\s*{name}(?:=(.*))?", f)
        if m:
            val = m.group(1) if m.group(1) is not None else "1"
    return val


def _read_ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path("/proc", d, "stat").read_bytes()
        except OSError:
            continue
        rest = stat.rsplit(b")", 1)[-1].split()
        if len(rest) > 1:
            out[int(d)] = int(rest[1])
    return out


class Sensor:
    """Kernel observation: syscall counters, process, network and first-seen events."""

    def __init__(self, ringbuf_pages: int = 256, max_cgroups: int = 1024,
                 cflags: Sequence[str] = ()):
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, got {ringbuf_pages}")
        if not 1 <= max_cgroups <= 65535:
            raise ValueError(f"max_cgroups must be within 1..65535, got {max_cgroups}")
        self.ringbuf_pages = ringbuf_pages
        self.max_cgroups = max_cgroups
        self.cflags = [f"-I{BPF_DIR}", f"-DRINGBUF_PAGES={ringbuf_pages}",
                       f"-DMAX_CGROUPS={max_cgroups}", *syscalls.kernel_cflags(), *cflags]
        self.net_result = _define(self.cflags, "NET_RESULT") not in (None, "0")
        self.decoder = Decoder()
        self._bpf = None
        self._links: list[int] = []
        self._cgroup_fd: int | None = None
        self._events: list[Event] = []
        self._quarantine: list[tuple[float, int]] = []
        self._wall_offset = 0.0
        self._ncpus = 0
        self._counts_buf = None
        self._cb = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def attach(self) -> None:
        if self._bpf is not None:
            return
        for check in _REQUIRED:
            c = check()
            if not c.ok:
                raise ProbeAttachError(f"{c.name}: {c.detail}; fix: {c.fix}")
        try:
            self._attach()
        except BaseException:
            self.close()
            raise
        log.info("sensor attached", ringbuf_pages=self.ringbuf_pages,
                 max_cgroups=self.max_cgroups, net_result=self.net_result)

    def _attach(self) -> None:
        from bcc import BPF
        from bcc.utils import get_possible_cpus

        class _BPF(BPF):
            def _trace_autoload(self):  # attach explicitly, each with its own error
                pass

        try:
            self._bpf = b = _BPF(src_file=str(SENSOR_C).encode(), cflags=self.cflags)
        except Exception as e:
            raise ProbeAttachError(
                f"compile {SENSOR_C}: {e}; fix: run `envelope doctor` (kernel headers at "
                f"/lib/modules/{os.uname().release}/build) and check the -D cflags "
                f"{self.cflags}") from e
        self._ncpus = len(get_possible_cpus())
        self._counts_buf = ctypes.create_string_buffer(SyscallSlotCounts.size() * self._ncpus)
        self._fds = {name: b[name.encode()].map_fd for name in (
            "syscall_counts", "slot_state", "cgroup_slots", "free_slots", "loss_counts",
            "parents", "removed_cgroups")}
        free = b[b"free_slots"]
        for slot in reversed(range(self.max_cgroups)):  # a stack: slot 0 pops first
            free.push(ctypes.c_uint32(slot))

        # Syscall counting.
        try:
            b.attach_raw_tracepoint(tp=b"sys_enter", fn_name=b"raw_tracepoint__sys_enter")
        except Exception as e:
            raise ProbeAttachError(f"raw_tracepoint sys_enter: {e}; fix: run `envelope doctor` "
                                   "(needs BPF raw tracepoints)") from e
        # Process lifecycle (and slot-cache invalidation on fork and cgroup migration).
        tps = _TRACEPOINTS + (_NET_RESULT_TRACEPOINTS if self.net_result else ())
        for tp in tps:
            cat, ev = tp.split(":")
            try:
                b.attach_tracepoint(tp=tp.encode(), fn_name=f"tracepoint__{cat}__{ev}".encode())
            except Exception as e:
                raise ProbeAttachError(f"tracepoint {tp}: {e}; fix: mount tracefs "
                                       "(mount -t tracefs nodev /sys/kernel/tracing) and run "
                                       "`envelope doctor`") from e
        self._seed_parents()
        # Network destinations: observe-only sock_addr programs linked to the cgroup v2 root.
        from .cgroup import cgroup2_mount_point
        root = cgroup2_mount_point()
        self._cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for fn_name, attach_type, hook in _SOCK_ADDR_HOOKS:
            try:
                fn = b.load_func(fn_name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
                self._links.append(features.link_create(fn.fd, self._cgroup_fd, attach_type))
            except Exception as e:
                raise ProbeAttachError(f"cgroup {hook} on {root}: {e}; fix: needs "
                                       "CONFIG_CGROUP_BPF and cgroup v2; run `envelope doctor`"
                                       ) from e
        # Ring buffer.
        def on_record(_ctx, data, size):
            ev = self.decoder.decode(ctypes.string_at(data, size))
            if ev is not None:
                self._events.append(ev)
            return 0

        self._cb = on_record
        try:
            b[b"events"].open_ring_buffer(on_record)
        except Exception as e:
            raise ProbeAttachError(f"ring buffer events: {e}; fix: run `envelope doctor`") from e
        self._sync_wall_clock()

    def _seed_parents(self) -> None:
        """Processes that existed before attach: their parent from /proc, so exec events of
        long-running processes carry a ppid. Entries from fork tracking win (NOEXIST)."""
        from bcc.libbcc import lib
        fd = self._fds["parents"]
        k, v = ctypes.c_uint32(), ctypes.c_uint32()
        for pid, ppid in _read_ppids().items():
            k.value, v.value = pid, ppid
            lib.bpf_update_elem(fd, ctypes.byref(k), ctypes.byref(v), _BPF_NOEXIST)

    def close(self) -> None:
        for fd in self._links:
            try:
                os.close(fd)
            except OSError:
                pass
        self._links = []
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    def __enter__(self) -> "Sensor":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- events -------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Decoded events waiting in the ring buffer, waiting up to ``timeout_ms`` for some."""
        self._require()
        self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()
        out, self._events = self._events, []
        self._release_quarantine()
        self._sync_wall_clock()  # follow NTP steps and slews of the wall clock
        return out

    def _sync_wall_clock(self) -> None:
        best = None
        for _ in range(5):
            t0 = time.monotonic_ns()
            w = time.time_ns()
            t1 = time.monotonic_ns()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, w - (t0 + t1) // 2)
        self._wall_offset = best[1] / 1e9

    def wall_time(self, ktime_ns: int) -> float:
        """CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) as epoch seconds."""
        return ktime_ns / 1e9 + self._wall_offset

    # ---- counters -----------------------------------------------------------------------------

    def _require(self) -> None:
        if self._bpf is None:
            raise RuntimeError("sensor is not attached; call attach() first")

    def _percpu_u64(self, map_fd: int, key: int, buf) -> memoryview:
        from bcc.libbcc import lib
        k = ctypes.c_uint32(key)
        if lib.bpf_lookup_elem(map_fd, ctypes.byref(k), buf) != 0:
            raise OSError(ctypes.get_errno(), f"bpf_lookup_elem(fd {map_fd}, key {key})")
        return memoryview(buf).cast("B").cast("Q")

    def cgroup_slots(self) -> dict[int, int]:
        """cgroup id -> counter slot, for every cgroup the kernel has given a slot."""
        self._require()
        from bcc.libbcc import lib
        fd = self._fds["cgroup_slots"]
        key, nxt, val = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint32()
        out: dict[int, int] = {}
        prev = None
        for _ in range(self.max_cgroups * 2):  # bounded even if entries churn while we walk
            if lib.bpf_get_next_key(fd, prev, ctypes.byref(nxt)) != 0:
                break
            key.value = nxt.value
            if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(val)) == 0:
                out[key.value] = val.value
            prev = ctypes.byref(key)
        return out

    def syscall_counts(self) -> dict[int, dict[int, int]]:
        """cgroup id -> {syscall nr: cumulative count over all CPUs}, zero counts left out.

        One ``bpf_lookup_elem`` per cgroup into a reused buffer viewed as u64s; only non-zero
        counters are visited in Python. A cgroup removed since the last call appears one last
        time with its final counts; then its slot is freed (see :meth:`forget_cgroup`) and it
        is gone from later results.
        """
        self._require()
        self._release_quarantine()
        removed = self._removed_cgroups()
        fd = self._fds["syscall_counts"]
        buf, n, cpus = self._counts_buf, SYSCALL_NR_SLOTS, self._ncpus
        nrs = range(n)
        out = {}
        for cg, slot in self.cgroup_slots().items():
            try:
                vals = self._percpu_u64(fd, slot, buf).tolist()
            except OSError:
                continue
            per_nr: dict[int, int] = {}
            for c in range(cpus):
                part = vals[c * n:(c + 1) * n]
                for nr in compress(nrs, part):
                    per_nr[nr] = per_nr.get(nr, 0) + part[nr]
            out[cg] = dict(sorted(per_nr.items()))
        for cg in removed:
            self.forget_cgroup(cg)
        return out

    def _removed_cgroups(self) -> list[int]:
        """Drain the kernel's queue of removed cgroups that hold a slot."""
        from bcc.libbcc import lib
        fd = self._fds["removed_cgroups"]
        v = ctypes.c_uint64()
        out = []
        for _ in range(self.max_cgroups):
            if lib.bpf_lookup_and_delete(fd, None, ctypes.byref(v)) != 0:
                break
            out.append(v.value)
        return out

    def loss(self) -> dict[str, int]:
        """Cumulative loss counters.

        ``ringbuf_full_<type>``: ring-buffer reservations that failed in the kernel, one per
        event dropped. For ``syscall_first`` the event is retried at the cgroup's next call of
        that syscall, so each failed attempt counts and the event arrives late, not never.
        ``syscall_unattributed``: syscalls counted while no cgroup slot was free.
        ``decode_error``, ``unknown_version``, ``unknown_type``: records that did not decode.
        """
        self._require()
        buf = ctypes.create_string_buffer(8 * self._ncpus)
        out = {}
        for idx, name in LOSS_NAMES.items():
            out[name] = sum(self._percpu_u64(self._fds["loss_counts"], idx, buf).tolist())
        for kind, n in self.decoder.errors.items():
            out[kind] = n
        return out

    def forget_cgroup(self, cgroup_id: int) -> None:
        """Free the counter slot of a cgroup that is gone (read its counts first).

        The slot's owner is cleared before its hash entry goes, so per-CPU cache entries that
        still name the slot stop matching at once. The slot is zeroed and handed back to the
        kernel only after :data:`SLOT_REUSE_GRACE`, by which time any program that passed the
        owner check before the clear has finished; its stray increments are zeroed with the
        rest. A cgroup that is forgotten while still alive gets a fresh slot, not a wrong one.
        """
        self._require()
        from bcc.libbcc import lib
        key = ctypes.c_uint64(cgroup_id)
        slot = ctypes.c_uint32()
        if lib.bpf_lookup_elem(self._fds["cgroup_slots"], ctypes.byref(key),
                               ctypes.byref(slot)) != 0:
            return
        self._write_slot_state(slot.value)
        lib.bpf_delete_elem(self._fds["cgroup_slots"], ctypes.byref(key))
        self._quarantine.append((time.monotonic(), slot.value))
        self._release_quarantine()

    def _write_slot_state(self, slot: int) -> None:
        from bcc.libbcc import lib
        k = ctypes.c_uint32(slot)
        zero = ctypes.create_string_buffer(SyscallSlotState.size())
        lib.bpf_update_elem(self._fds["slot_state"], ctypes.byref(k), zero, 0)

    def _release_quarantine(self) -> None:
        if not self._quarantine:
            return
        from bcc.libbcc import lib
        now = time.monotonic()
        keep = []
        zeros = None
        for t, slot in self._quarantine:
            if now - t < SLOT_REUSE_GRACE:
                keep.append((t, slot))
                continue
            if zeros is None:
                zeros = ctypes.create_string_buffer(SyscallSlotCounts.size() * self._ncpus)
            k = ctypes.c_uint32(slot)
            lib.bpf_update_elem(self._fds["syscall_counts"], ctypes.byref(k), zeros, 0)
            self._write_slot_state(slot)
            lib.bpf_update_elem(self._fds["free_slots"], None, ctypes.byref(k), 0)
        self._quarantine = keep
