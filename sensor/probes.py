"""The sensor's loader: compiles ``bpf/sensor.c`` with BCC, attaches it, and reads it back.

:class:`Sensor` is the whole userspace API of the kernel side:

- :meth:`Sensor.poll` drains the ring buffer and returns decoded events
  (:mod:`sensor.events`); decode failures are counted, never raised.
- :meth:`Sensor.syscall_counts` reads the cumulative per-(cgroup, syscall) counters, summed
  over CPUs. Nothing is drained: callers take deltas.
- :meth:`Sensor.loss` reports ring-buffer reserve failures per event type (counted in the
  kernel) plus decode failures (counted here).
- :meth:`Sensor.forget_cgroup` frees the counter slot of a cgroup that is gone.

Compiling with BCC maps LLVM and clang into the process (about 150 MB resident here), so the
compile, load and attach happen in a short-lived child process (``python -m sensor.probes``)
that hands every map and attachment file descriptor to this process over a Unix socket
(SCM_RIGHTS) and exits without detaching. This process then reads maps with raw ``bpf(2)``
calls and the ring buffer through ``mmap``: it never imports bcc.

Every attachment is tied to a file descriptor of this process (raw tracepoint, perf event, BPF
link), so if the process dies everything detaches; nothing is pinned.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from itertools import compress
from pathlib import Path
from typing import Container, Sequence

import structlog

from . import features, syscalls
from .events import (
    EV_EXEC, EV_EXIT, EV_FORK, EV_NET, EV_SYSCALL_FIRST, LOSS_CGROUP_REMOVED_DROPPED,
    LOSS_SYSCALL_UNATTRIBUTED, SYSCALL_BANKS, SYSCALL_NR_SLOTS, Decoder, Event, SyscallSlotCounts,
    SyscallSlotState,
)
from .features import (
    BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_MAP_LOOKUP_AND_DELETE_ELEM,
    BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_NOEXIST, map_op,
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
_MAPS = ("syscall_counts", "slot_state", "cgroup_slots", "free_slots", "loss_counts",
         "parents", "removed_cgroups", "events")
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
LOADER_TIMEOUT = 120.0  # seconds the loader child may take to compile and attach
PAGE_SIZE = mmap.PAGESIZE


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


# ---- ring buffer --------------------------------------------------------------------------------

_RB_BUSY = 1 << 31
_RB_DISCARD = 1 << 30
_RB_HDR = 8


class RingBufferReader:
    """Consumer side of a BPF ring buffer map, through mmap (what libbpf's ring_buffer does).

    Page 0 holds the consumer position (ours to write); page 1 the producer position; then the
    data area, mapped twice back to back so a record that wraps reads as one slice.
    """

    def __init__(self, map_fd: int, size: int):
        if size <= 0 or size & (size - 1) or size % PAGE_SIZE:
            raise ValueError(f"ring buffer size {size} is not a power-of-two number of pages")
        self.fd, self.size, self.mask = map_fd, size, size - 1
        self._cons = mmap.mmap(map_fd, PAGE_SIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, PAGE_SIZE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=PAGE_SIZE)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def consume(self, callback) -> int:
        """Hand every committed record to ``callback(bytes)``; returns how many."""
        cons_map, prod_map, mask = self._cons, self._prod, self.mask
        cons = struct.unpack_from("<Q", cons_map, 0)[0]
        n = 0
        while True:
            prod = struct.unpack_from("<Q", prod_map, 0)[0]
            if cons >= prod:
                return n
            while cons < prod:
                off = PAGE_SIZE + (cons & mask)
                hdr = struct.unpack_from("<I", prod_map, off)[0]
                if hdr & _RB_BUSY:  # reserved, not yet committed: stop here for now
                    return n
                length = hdr & ~(_RB_BUSY | _RB_DISCARD)
                cons += (length + _RB_HDR + 7) & ~7
                if not hdr & _RB_DISCARD:
                    callback(prod_map[off + _RB_HDR:off + _RB_HDR + length])
                    n += 1
                struct.pack_into("<Q", cons_map, 0, cons)

    def wait(self, timeout_ms: int) -> None:
        if timeout_ms != 0:
            self._epoll.poll(timeout_ms / 1000 if timeout_ms > 0 else -1)

    def close(self) -> None:
        self._epoll.close()
        self._cons.close()
        self._prod.close()


# ---- the loader child ---------------------------------------------------------------------------


def _load(cflags: list[str], net_result: bool, max_cgroups: int) -> list[tuple[str, int]]:
    """Compile, load and attach; returns ``(name, fd)`` for every map and attachment. Runs in
    the loader child, the only place bcc is imported."""
    from bcc import BPF
    from bcc.libbcc import lib

    class _BPF(BPF):
        def _trace_autoload(self):  # attach explicitly, each with its own error
            pass

    try:
        b = _BPF(src_file=str(SENSOR_C).encode(), cflags=cflags)
    except Exception as e:
        raise ProbeAttachError(
            f"compile {SENSOR_C}: {e}; fix: run `envelope doctor` (kernel headers at "
            f"/lib/modules/{os.uname().release}/build) and check the -D cflags {cflags}") from e
    out = [(f"map:{name}", b[name.encode()].map_fd) for name in _MAPS]
    free = b[b"free_slots"]
    for slot in reversed(range(max_cgroups)):  # a stack: slot 0 pops first
        free.push(ctypes.c_uint32(slot))

    # Syscall counting.
    try:
        b.attach_raw_tracepoint(tp=b"sys_enter", fn_name=b"raw_tracepoint__sys_enter")
    except Exception as e:
        raise ProbeAttachError(f"raw_tracepoint sys_enter: {e}; fix: run `envelope doctor` "
                               "(needs BPF raw tracepoints)") from e
    out.append(("raw_tracepoint:sys_enter", b.raw_tracepoint_fds[b"sys_enter"]))
    # Process lifecycle, slot-cache invalidation and slot release.
    for tp in _TRACEPOINTS + (_NET_RESULT_TRACEPOINTS if net_result else ()):
        cat, ev = tp.split(":")
        try:
            b.attach_tracepoint(tp=tp.encode(), fn_name=f"tracepoint__{cat}__{ev}".encode())
        except Exception as e:
            raise ProbeAttachError(f"tracepoint {tp}: {e}; fix: mount tracefs (mount -t tracefs "
                                   "nodev /sys/kernel/tracing) and run `envelope doctor`") from e
        out.append((f"tracepoint:{tp}", b.tracepoint_fds[tp.encode()]))
    # Parents of processes that exist already; entries from fork tracking win (NOEXIST).
    k, v = ctypes.c_uint32(), ctypes.c_uint32()
    fd = b[b"parents"].map_fd
    for pid, ppid in _read_ppids().items():
        k.value, v.value = pid, ppid
        lib.bpf_update_elem(fd, ctypes.byref(k), ctypes.byref(v), BPF_NOEXIST)
    # Network destinations: observe-only sock_addr programs linked to the cgroup v2 root.
    from .cgroup import cgroup2_mount_point
    root = cgroup2_mount_point()
    cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for fn_name, attach_type, hook in _SOCK_ADDR_HOOKS:
            try:
                fn = b.load_func(fn_name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
                out.append((f"link:{hook}",
                            features.link_create(fn.fd, cgroup_fd, attach_type)))
            except Exception as e:
                raise ProbeAttachError(f"cgroup {hook} on {root}: {e}; fix: needs "
                                       "CONFIG_CGROUP_BPF and cgroup v2; run `envelope doctor`"
                                       ) from e
    finally:
        os.close(cgroup_fd)
    return out


def _loader_main(argv: list[str]) -> int:
    """``python -m sensor.probes load CONFIG_JSON SOCKET_FD``: load, hand over the fds, exit.

    Exits with os._exit: bcc's atexit cleanup would disable the perf events the parent now
    shares."""
    cfg = json.loads(argv[1])
    sock = socket.socket(fileno=int(argv[2]))
    try:
        named = _load(cfg["cflags"], cfg["net_result"], cfg["max_cgroups"])
        msg = {"ok": True, "names": [n for n, _ in named]}
        socket.send_fds(sock, [json.dumps(msg).encode()], [fd for _, fd in named])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        err = str(e) if isinstance(e, ProbeAttachError) else f"loader: {type(e).__name__}: {e}"
        sock.sendall(json.dumps({"ok": False, "error": err}).encode())
    sock.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- the sensor ---------------------------------------------------------------------------------


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
        self._fds: dict[str, int] = {}
        self._ring: RingBufferReader | None = None
        self._events: list[Event] = []
        self._quarantine: list[tuple[float, int]] = []
        self._wall_offset = 0.0
        self._ncpus = features.possible_cpus()
        self._counts_buf = ctypes.create_string_buffer(SyscallSlotCounts.size() * self._ncpus)
        self._loss_buf = ctypes.create_string_buffer(8 * self._ncpus)

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._ring is not None

    def attach(self) -> None:
        if self.attached:
            return
        for check in _REQUIRED:
            c = check()
            if not c.ok:
                raise ProbeAttachError(f"{c.name}: {c.detail}; fix: {c.fix}")
        try:
            self._fds = self._run_loader()
            self._ring = RingBufferReader(self._fds["map:events"],
                                          self.ringbuf_pages * PAGE_SIZE)
        except BaseException:
            self.close()
            raise
        self._sync_wall_clock()
        log.info("sensor attached", ringbuf_pages=self.ringbuf_pages,
                 max_cgroups=self.max_cgroups, net_result=self.net_result,
                 attachments=sum(1 for n in self._fds if not n.startswith("map:")))

    def _run_loader(self) -> dict[str, int]:
        """Compile and attach in a child process; receive its fds. See the module docstring."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {"cflags": self.cflags, "net_result": self.net_result,
               "max_cgroups": self.max_cgroups}
        env = dict(os.environ)
        root = str(BPF_DIR.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "sensor.probes", "load", json.dumps(cfg),
                 str(theirs.fileno())],
                pass_fds=[theirs.fileno()], cwd=root, env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        try:
            ours.settimeout(LOADER_TIMEOUT)
            try:
                data, fds, _, _ = socket.recv_fds(ours, 1 << 16, 256)
            except (socket.timeout, OSError) as e:
                child.kill()
                raise ProbeAttachError(f"loader: no answer from {sys.executable} -m sensor.probes "
                                       f"({e}); fix: run `envelope doctor`") from e
            child.wait(timeout=LOADER_TIMEOUT)
        finally:
            ours.close()
        try:
            msg = json.loads(data.decode() or "{}")
        except ValueError:
            msg = {}
        if not msg.get("ok"):
            for fd in fds:
                os.close(fd)
            raise ProbeAttachError(msg.get("error") or
                                   f"loader exited with status {child.returncode} and no "
                                   "answer; fix: run `envelope doctor`")
        if len(fds) != len(msg["names"]):
            for fd in fds:
                os.close(fd)
            raise ProbeAttachError(f"loader: sent {len(fds)} fds for {len(msg['names'])} names; "
                                   "fix: report this as a bug")
        return dict(zip(msg["names"], fds))

    def close(self) -> None:
        """Detach everything: attachments first (raw tracepoint, perf events, links), then maps."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for name in sorted(self._fds, key=lambda n: n.startswith("map:")):
            try:
                os.close(self._fds[name])
            except OSError:
                pass
        self._fds = {}

    def __enter__(self) -> "Sensor":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- events -------------------------------------------------------------------------------

    def _on_record(self, data: bytes) -> None:
        ev = self.decoder.decode(data)
        if ev is not None:
            self._events.append(ev)

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Decoded events waiting in the ring buffer, waiting up to ``timeout_ms`` for some."""
        self._require()
        if not self._ring.consume(self._on_record):
            self._ring.wait(timeout_ms)
            self._ring.consume(self._on_record)
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
        if not self.attached:
            raise RuntimeError("sensor is not attached; call attach() first")

    def _percpu_u64(self, map_name: str, key: int, buf) -> memoryview:
        k = ctypes.c_uint32(key)
        err = map_op(BPF_MAP_LOOKUP_ELEM, self._fds[map_name], k, buf)
        if err:
            raise OSError(err, f"bpf map lookup {map_name}[{key}]: {os.strerror(err)}")
        return memoryview(buf).cast("B").cast("Q")

    def cgroup_slots(self) -> dict[int, int]:
        """cgroup id -> counter slot, for every cgroup the kernel has given a slot."""
        self._require()
        fd = self._fds["map:cgroup_slots"]
        key, nxt, val = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint32()
        out: dict[int, int] = {}
        prev = None
        for _ in range(self.max_cgroups * 2):  # bounded even if entries churn while we walk
            if map_op(BPF_MAP_GET_NEXT_KEY, fd, prev, nxt) != 0:
                break
            key.value = nxt.value
            if map_op(BPF_MAP_LOOKUP_ELEM, fd, key, val) == 0:
                out[key.value] = val.value
            prev = key
        return out

    def syscall_counts(self, after_exec: Container[int] = ()) -> dict[int, dict[int, int]]:
        """cgroup id -> {syscall nr: cumulative count over all CPUs}, zero counts left out.

        For the cgroups in ``after_exec`` only what they did from their first exec on is counted
        (a container's own image, without the runtime's setup before it); for the others,
        everything. One map lookup per cgroup into a reused buffer viewed as u64s; only non-zero
        counters are visited in Python. A cgroup removed since the last call appears one last
        time with its final counts; then its slot is freed (see :meth:`forget_cgroup`) and it is
        gone from later results.
        """
        self._require()
        self._release_quarantine()
        removed = self._removed_cgroups()
        buf, mask = self._counts_buf, SYSCALL_NR_SLOTS - 1
        per_cpu = SYSCALL_BANKS * SYSCALL_NR_SLOTS
        # CPU c's counter for bank b, nr n is at c*1024 + b*512 + n
        every = range(per_cpu * self._ncpus)
        out = {}
        for cg, slot in self.cgroup_slots().items():
            try:
                vals = self._percpu_u64("map:syscall_counts", slot, buf).tolist()
            except OSError:
                continue
            post_only = cg in after_exec
            per_nr: dict[int, int] = {}
            for i in compress(every, vals):  # the non-zero counters, found at C speed
                if post_only and i % per_cpu < SYSCALL_NR_SLOTS:
                    continue
                nr = i & mask
                per_nr[nr] = per_nr.get(nr, 0) + vals[i]
            out[cg] = dict(sorted(per_nr.items()))
        for cg in removed:
            self.forget_cgroup(cg)
        return out

    def _removed_cgroups(self) -> list[int]:
        """Drain the kernel's queue of removed cgroups that hold a slot."""
        fd = self._fds["map:removed_cgroups"]
        v = ctypes.c_uint64()
        out = []
        for _ in range(self.max_cgroups):
            if map_op(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, None, v) != 0:
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
        out = {}
        for idx, name in LOSS_NAMES.items():
            out[name] = sum(self._percpu_u64("map:loss_counts", idx, self._loss_buf).tolist())
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
        key = ctypes.c_uint64(cgroup_id)
        slot = ctypes.c_uint32()
        if map_op(BPF_MAP_LOOKUP_ELEM, self._fds["map:cgroup_slots"], key, slot) != 0:
            return
        self._write_slot_state(slot.value)
        map_op(BPF_MAP_DELETE_ELEM, self._fds["map:cgroup_slots"], key)
        self._quarantine.append((time.monotonic(), slot.value))
        self._release_quarantine()

    def _write_slot_state(self, slot: int) -> None:
        zero = ctypes.create_string_buffer(SyscallSlotState.size())
        map_op(BPF_MAP_UPDATE_ELEM, self._fds["map:slot_state"], ctypes.c_uint32(slot), zero)

    def _release_quarantine(self) -> None:
        if not self._quarantine:
            return
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
            map_op(BPF_MAP_UPDATE_ELEM, self._fds["map:syscall_counts"], k, zeros)
            self._write_slot_state(slot)
            map_op(BPF_MAP_UPDATE_ELEM, self._fds["map:free_slots"], None, k)
        self._quarantine = keep


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "load":
        sys.exit(_loader_main(sys.argv[1:]))
    sys.exit("usage: python -m sensor.probes load CONFIG_JSON SOCKET_FD (used by Sensor.attach)")
