"""The sensor's loader: compiles ``bpf/sensor.c`` with BCC, attaches it, and reads it back.

:class:`Sensor` is the whole userspace API of the kernel side:

- :meth:`Sensor.poll` drains the ring buffer and returns decoded events
  (:mod:`sensor.events`); decode failures are counted, never raised.
- :meth:`Sensor.syscall_counts` reads the cumulative per-(cgroup, syscall) counters, summed
  over CPUs. Nothing is drained: callers take deltas.
- :meth:`Sensor.behaviour_counts` reads the cumulative per-(cgroup, destination) and
  per-(cgroup, exec path) counters with their first and last seen times; the ring buffer
  announced only the first sighting of each (:class:`sensor.events.NetFirstEvent`,
  :class:`sensor.events.ExecFirstEvent`).
- :meth:`Sensor.dropped_counts` reads what each cgroup did beyond its caps in those tables.
- :meth:`Sensor.loss` reports ring-buffer reserve failures per event type (counted in the
  kernel) plus decode failures (counted here), for the whole node; :meth:`Sensor.cgroup_loss`
  the part of it that belongs to one cgroup (the kernel knew the cgroup when the reservation
  failed), which is the only loss a workload's profile is charged with.
- With ``tracked_only`` (``envelope record``, ``envelope exec``) the kernel observes only the
  cgroups given to :meth:`Sensor.track_cgroup` and their descendants: another cgroup's
  activity is neither counted nor put in the ring buffer, so it cannot cost the tracked ones
  events.
- :meth:`Sensor.forget_cgroup` frees the counter slot of a cgroup that is gone.

The program family is compiled, loaded and attached by the loader child of
:mod:`sensor.kernel` (BCC's LLVM never maps into this process); this process reads maps with
raw ``bpf(2)`` calls and the ring buffer through ``mmap``: it never imports bcc.

Every attachment is tied to a file descriptor of this process (raw tracepoint, perf event, BPF
link), so if the process dies everything detaches; nothing is pinned.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from itertools import compress
from typing import Container, Protocol, Sequence

import psutil
import structlog

from . import features, kernel, sketch, syscalls
from .aggregate import DropReading, KeyReading
from .events import (
    EV_EXEC, EV_EXEC_FIRST, EV_EXIT, EV_FORK, EV_NET, EV_NET_FIRST, EV_SYSCALL_FIRST,
    LOSS_CGROUP_REMOVED_DROPPED, LOSS_EXEC_TABLE_FULL, LOSS_EXEC_UNATTRIBUTED,
    LOSS_NET_TABLE_FULL, LOSS_NET_UNATTRIBUTED, LOSS_SYSCALL_UNATTRIBUTED, Decoder, Event,
    exec_count_behaviour, net_count_behaviour,
)
from .mirrors import (
    LOSS_RESERVE_TYPES, SYSCALL_BANKS, SYSCALL_NR_SLOTS, BehaviourCount, BehaviourSlot,
    ExecCountKey, NetCountKey, SlotLoss, SyscallSlotCounts, SyscallSlotState,
)
from .kernel import (
    BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_MAP_LOOKUP_AND_DELETE_ELEM,
    BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_NOEXIST, PAGE_SIZE, Family, LoadError, Program,
    RingReader, map_delete_keys, map_dump, map_op,
)

log = structlog.get_logger(__name__)

SENSOR_C = kernel.BPF_DIR / "sensor.c"

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
         "parents", "removed_cgroups", "events", "net_counts", "exec_counts", "behaviour_slots",
         "hooks", "hooked_cgroups", "hook_slots", "slot_loss", "tracked_cgroups")
# The counter tables: map name, key mirror, key decoder, substrate of what it counts.
_COUNT_TABLES = (("net_counts", NetCountKey, net_count_behaviour, "egress"),
                 ("exec_counts", ExecCountKey, exec_count_behaviour, "exec"))
DEFAULT_NET_CGROUP_CAP = 4096  # bpf/sensor.c defaults
DEFAULT_EXEC_CGROUP_CAP = 2048
#: Syscall hooks an extension can put a program on (``hooks`` in bpf/sensor.c).
HOOK_SOCKET = 0  # write, writev, sendto, sendmsg, connect, close
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
    EV_EXEC_FIRST: "ringbuf_full_exec_first",
    EV_NET_FIRST: "ringbuf_full_net_first",
    LOSS_SYSCALL_UNATTRIBUTED: "syscall_unattributed",
    LOSS_CGROUP_REMOVED_DROPPED: "cgroup_removed_dropped",
    LOSS_NET_UNATTRIBUTED: "net_unattributed",
    LOSS_EXEC_UNATTRIBUTED: "exec_unattributed",
    LOSS_NET_TABLE_FULL: "net_table_full",
    LOSS_EXEC_TABLE_FULL: "exec_table_full",
}
SLOT_REUSE_GRACE = 0.1  # seconds a forgotten slot waits before reuse (see forget_cgroup)


class ProbeAttachError(RuntimeError):
    """A probe could not be loaded or attached: ``"<probe>: <what failed>; fix: <action>"``."""


class Extension(Protocol):
    """A further program family the sensor loads beside ``bpf/sensor.c`` (DNS answers, file
    access, request capture, ...). Its ring buffers are drained with the sensor's and decoded by
    the same decoder, so its records are ``bpf/events.h`` types; what it counts in the kernel it
    reports through :meth:`behaviour_counts`.

    ``family`` gets the sensor's base ``-D`` flags (ring size, cgroup slots, syscall numbers).
    ``attached`` runs in this process once the fds arrived (open maps, attach uprobes, seed
    state, put a program on a syscall hook with :meth:`Sensor.set_hook`); ``tick`` runs at every
    counter read (periodic work such as attaching to libraries that newly appeared). ``rings``
    names the ring-buffer maps to drain.

    Optional, looked up with ``getattr`` (an extension without them works as before):

    - ``watch(cgroup_id, path)`` / ``unwatch(cgroup_id)``: a cgroup the pump bound (a workload's
      session) or forgot; an extension that follows only the workloads' cgroups attaches there;
    - ``consume(event) -> bool``: each event decoded from the extension's own rings; True keeps
      it from the sensor's output (the extension makes something of it itself);
    - ``events() -> list``: what the extension made, handed out with the next :meth:`Sensor.poll`
      (objects with ``cgroup_id``, ``ktime`` and ``behaviour_keys()``, see
      :meth:`sensor.aggregate.Aggregator.on_event`);
    - ``forget_cgroup(cgroup_id)``: runs after the next reading of counts once the sensor forgets a
      cgroup that is gone (to drop its kernel state);
    - ``substrates``: the substrates the extension observes (:data:`sensor.workload.MARKED_SUBSTRATES`
      among them are recorded as observed in each session the pump binds);
    - ``phases``: True means the extension counts a cgroup's activity before its first exec (a
      runtime's or launcher's setup) apart, and its ``behaviour_counts`` and ``refused_counts``
      take ``after_exec``, the cgroups for which only what came after is wanted;
    - ``refused_counts()``: reports, like ``behaviour_counts``, attempts the kernel refused
      (evidence, never behaviour);
    - ``cgroup_loss() -> {cgroup id: {name: cumulative count}}``: loss the extension can
      attribute to one cgroup (see :meth:`Sensor.cgroup_loss`; the pump charges it to that
      cgroup's profile only, while ``loss()`` stays the node's)."""

    name: str
    rings: tuple[str, ...]

    def family(self, base_cflags: Sequence[str]) -> Family: ...

    def attached(self, loaded: kernel.Loaded, sensor: "Sensor") -> None: ...

    def tick(self) -> None: ...

    def behaviour_counts(self) -> dict[int, dict[str, KeyReading]]: ...

    def loss(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def _define(cflags: Sequence[str], name: str) -> str | None:
    val = None
    for f in cflags:
        m = re.fullmatch(rf"-D\s*{name}(?:=(.*))?", f)
        if m:
            val = m.group(1) if m.group(1) is not None else "1"
    return val


def _read_ppids() -> dict[int, int]:
    """pid -> parent pid of every process that exists now."""
    out = {}
    for p in psutil.process_iter(["ppid"]):
        ppid = p.info.get("ppid")
        if ppid is not None:
            out[p.pid] = ppid
    return out


# ---- the program family --------------------------------------------------------------------


def family(cflags: Sequence[str], net_result: bool) -> Family:
    """The observation programs of ``bpf/sensor.c``: syscall counting on raw ``sys_enter``, the
    process-lifecycle and cgroup tracepoints, and observe-only sock_addr programs linked to the
    cgroup v2 root (they detach when this process exits)."""
    tps = _TRACEPOINTS + (_NET_RESULT_TRACEPOINTS if net_result else ())
    programs = [Program("raw_tracepoint__sys_enter", "raw_tracepoint", "sys_enter")]
    programs += [Program("tracepoint__{}__{}".format(*tp.split(":")), "tracepoint", tp)
                 for tp in tps]
    programs += [Program(f"envelope_{hook}", "cgroup_sock_addr", "cgroup2-root", attach_type)
                 for hook, attach_type in kernel.SOCK_ADDR_HOOKS.items()]
    return Family("sensor", str(SENSOR_C), tuple(cflags), tuple(programs), _MAPS,
                  setup="sensor.probes:seed_maps",
                  fix="run `envelope doctor` (needs raw tracepoints, tracefs, cgroup v2 with "
                      "CONFIG_CGROUP_BPF)")


def seed_maps(maps: dict[str, int]) -> None:
    """Loader-child setup, before anything is attached: every counter slot free (a stack: slot
    0 pops first), and the parents of processes that exist already (fork tracking wins later,
    so NOEXIST)."""
    slot = ctypes.c_uint32()
    n = kernel.Map(maps["cgroup_slots"]).max_entries
    for i in reversed(range(n)):
        slot.value = i
        map_op(BPF_MAP_UPDATE_ELEM, maps["free_slots"], None, slot)
    k, v = ctypes.c_uint32(), ctypes.c_uint32()
    for pid, ppid in _read_ppids().items():
        k.value, v.value = pid, ppid
        map_op(BPF_MAP_UPDATE_ELEM, maps["parents"], k, v, BPF_NOEXIST)


# ---- the sensor ---------------------------------------------------------------------------------


class Sensor:
    """Kernel observation: syscall, destination and exec counters, first-seen events (and, with
    ``trace_events``, one record per exec, fork, exit and connect/send)."""

    def __init__(self, ringbuf_pages: int = 256, max_cgroups: int = 1024,
                 cflags: Sequence[str] = (), extensions: Sequence[Extension] = (),
                 trace_events: bool = False, tracked_only: bool = False):
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, got {ringbuf_pages}")
        if not 1 <= max_cgroups <= 65535:
            raise ValueError(f"max_cgroups must be within 1..65535, got {max_cgroups}")
        self.ringbuf_pages = ringbuf_pages
        self.max_cgroups = max_cgroups
        self.cflags = [f"-I{kernel.BPF_DIR}", f"-DRINGBUF_PAGES={ringbuf_pages}",
                       f"-DMAX_CGROUPS={max_cgroups}", *syscalls.kernel_cflags(),
                       *(["-DTRACE_EVENTS=1"] if trace_events else []),
                       *(["-DTRACKED_ONLY=1"] if tracked_only else []), *cflags]
        self.net_result = _define(self.cflags, "NET_RESULT") not in (None, "0")
        self.trace_events = _define(self.cflags, "TRACE_EVENTS") not in (None, "0")
        self.tracked_only = _define(self.cflags, "TRACKED_ONLY") not in (None, "0")
        self.caps = {"egress": int(_define(self.cflags, "NET_CGROUP_CAP") or DEFAULT_NET_CGROUP_CAP),
                     "exec": int(_define(self.cflags, "EXEC_CGROUP_CAP") or DEFAULT_EXEC_CGROUP_CAP)}
        # Counter-table reading state: decoded keys and last raw values (bounded by the tables),
        # and cgroups forgotten since the last read, whose entries go after that read.
        self._count_keys: dict[str, dict[bytes, tuple[int, str | None]]] = {
            name: {} for name, *_ in _COUNT_TABLES}
        self._count_values: dict[str, dict[bytes, bytes]] = {name: {} for name, *_ in _COUNT_TABLES}
        self._forgotten: set[int] = set()
        self._slots_read: dict[int, int] | None = None
        self.extensions = list(extensions)
        self._extension_fds: list[kernel.Loaded] = []
        self.decoder = Decoder()
        self._loaded: kernel.Loaded | None = None
        self._maps: dict[str, int] = {}
        self._ring: RingReader | None = None
        self._events: list[Event] = []
        self._quarantine: list[tuple[float, int]] = []
        self._wall_offset = 0.0
        self._ncpus = kernel.possible_cpus()
        self._counts_buf = ctypes.create_string_buffer(SyscallSlotCounts.size() * self._ncpus)
        self._loss_buf = ctypes.create_string_buffer(8 * self._ncpus)
        self._slot_loss_buf = ctypes.create_string_buffer(SlotLoss.size() * self._ncpus)

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
            # the families compile side by side, each in its loader child; all or nothing
            families = [family(self.cflags, self.net_result)] + [ext.family(self.cflags) for ext in self.extensions]
            try:
                loaded_all = kernel.load_all(families)
            except LoadError as e:
                raise ProbeAttachError(str(e)) from e
            self._loaded = loaded_all[0]
            self._extension_fds = list(loaded_all[1:])
            self._maps = self._loaded.maps
            ring = RingReader()
            ring.add(self._maps["events"], self._on_record, self.ringbuf_pages * PAGE_SIZE)
            self._ring = ring
            for ext, loaded in zip(self.extensions, loaded_all[1:]):
                ext.attached(loaded, self)
                for name in ext.rings:
                    ring.add(loaded.maps[name], self._extension_record(ext))
        except BaseException:
            self.close()
            raise
        self._sync_wall_clock()
        log.info("sensor attached", ringbuf_pages=self.ringbuf_pages,
                 max_cgroups=self.max_cgroups, net_result=self.net_result,
                 trace_events=self.trace_events, tracked_only=self.tracked_only, attachments=len(self._loaded.attachments))

    def close(self) -> None:
        """Detach everything: attachments first (raw tracepoint, perf events, links), then maps."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for ext in self.extensions:
            try:
                ext.close()
            except Exception as e:  # noqa: BLE001 - the rest still closes
                log.warning("sensor extension close failed", extension=ext.name, error=str(e))
        for loaded in self._extension_fds:
            loaded.close()
        self._extension_fds = []
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._maps = {}

    def attachment(self, fn: str) -> int:
        """The attachment fd of program ``fn`` (a raw tracepoint's is its link), e.g. for
        checking with :func:`sensor.kernel.link_prog_id` that it ran; KeyError if not attached."""
        if self._loaded is None:
            raise KeyError(fn)
        return self._loaded.attachments[fn]

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

    def _extension_record(self, ext):
        consume = getattr(ext, "consume", None)

        def on_record(data: bytes) -> None:
            ev = self.decoder.decode(data)
            if ev is not None and not (consume is not None and consume(ev)):
                self._events.append(ev)
        return on_record

    def poll(self, timeout_ms: int = 100, limit: int | None = None) -> list[Event]:
        """Decoded events waiting in the ring buffer (at most ``limit``), waiting up to
        ``timeout_ms`` for some."""
        self._require()
        self._ring.poll(timeout_ms, limit)
        for ext in self.extensions:
            made = getattr(ext, "events", None)
            if made is not None:
                self._events.extend(made())
        out, self._events = self._events, []
        if self._extension_fds:
            # The sensor's ring is drained before the extensions': hand the batch out in kernel
            # time order, so that e.g. a DNS answer comes before the connect that used it.
            out.sort(key=lambda e: e.ktime)
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
        err = map_op(BPF_MAP_LOOKUP_ELEM, self._maps[map_name], k, buf)
        if err:
            raise OSError(err, f"bpf map lookup {map_name}[{key}]: {os.strerror(err)}")
        return memoryview(buf).cast("B").cast("Q")

    def cgroup_slots(self) -> dict[int, int]:
        """cgroup id -> counter slot, for every cgroup the kernel has given a slot."""
        self._require()
        fd = self._maps["cgroup_slots"]
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
        slots = self._slots_read = self.cgroup_slots()
        for cg, slot in slots.items():
            try:
                vals = self._percpu_u64("syscall_counts", slot, buf).tolist()
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
        fd = self._maps["removed_cgroups"]
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
        These are the node's: the part that belongs to one cgroup is also in
        :meth:`cgroup_loss`.
        """
        self._require()
        out = {}
        for idx, name in LOSS_NAMES.items():
            out[name] = sum(self._percpu_u64("loss_counts", idx, self._loss_buf).tolist())
        for kind, n in self.decoder.errors.items():
            out[kind] = n
        for ext in self.extensions:
            for name, n in ext.loss().items():
                out[f"{ext.name}_{name}"] = n
        return out

    def observed_substrates(self) -> tuple[str, ...]:
        """The substrates the loaded extensions observe (their optional ``substrates``)."""
        return tuple(sorted({s for ext in self.extensions for s in getattr(ext, "substrates", ())}))

    def behaviour_counts(self, changed_only: bool = False,
                         after_exec: Container[int] = ()) -> dict[int, dict[str, KeyReading]]:
        """cgroup id -> behaviour key -> cumulative reading, for what the programs count in the
        kernel beside syscalls: network destinations and exec paths, and every extension's.
        Nothing is drained: callers take deltas.

        Times are the kernel's: the first and the latest occurrence (``bpf_ktime_get_ns``, as wall
        seconds). Each table is read with a few batch lookups; keys are decoded once. With
        ``changed_only`` the sensor's own entries that did not change since the previous such
        call are left out (their deltas are zero). For the cgroups in ``after_exec``, extensions
        that tell phases apart count only what came from the cgroup's first exec on (as
        :meth:`syscall_counts` does). Cgroups forgotten since the previous call
        (:meth:`forget_cgroup`) appear one last time; then their entries are deleted and the
        extensions forget them."""
        self._require()
        out: dict[int, dict[str, KeyReading]] = {}
        forgotten, self._forgotten = self._forgotten, set()
        wall = self._wall_offset
        unpack = BehaviourCount._struct.unpack_from
        vsize = BehaviourCount.size()
        for name, key_mirror, decode, _ in _COUNT_TABLES:
            ksize = key_mirror.size()
            keys, values, n = map_dump(self._maps[name], ksize, vsize)
            names, last = self._count_keys[name], self._count_values[name]
            doomed = []
            for i in range(n):
                k = keys[i * ksize:(i + 1) * ksize]
                ident = names.get(k)
                if ident is None:
                    ident = names[k] = decode(k)
                cg, key = ident
                if cg in forgotten:
                    doomed.append(k)
                v = values[i * vsize:(i + 1) * vsize]
                if changed_only:
                    if last.get(k) == v:
                        continue
                    last[k] = v
                if key is None:
                    continue
                count, first_ns, last_ns, _ = unpack(v)
                out.setdefault(cg, {})[key] = KeyReading(count, first_ns / 1e9 + wall,
                                                         last_ns / 1e9 + wall)
            if doomed:
                map_delete_keys(self._maps[name], b"".join(doomed), ksize)
                for k in doomed:
                    names.pop(k, None)
                    last.pop(k, None)
            if len(names) > n:  # entries gone by other means: keep the caches to the table
                live = {keys[i * ksize:(i + 1) * ksize] for i in range(n)}
                for cache in (names, last):
                    for k in [k for k in cache if k not in live]:
                        del cache[k]
        for ext in self.extensions:
            ext.tick()
            counts = ext.behaviour_counts(after_exec) if getattr(ext, "phases", False) else ext.behaviour_counts()
            for cg, per_key in counts.items():
                out.setdefault(cg, {}).update(per_key)
        for ext in self.extensions:
            forget = getattr(ext, "forget_cgroup", None)
            for cg in sorted(forgotten) if forget is not None else ():
                try:
                    forget(cg)
                except Exception as e:  # noqa: BLE001 - the others are still forgotten
                    log.warning("sensor extension forget failed", extension=ext.name, error=str(e))
        return out

    def refused_counts(self, after_exec: Container[int] = ()) -> dict[int, dict[str, KeyReading]]:
        """cgroup id -> key -> cumulative reading of attempts the kernel refused (extensions with
        ``refused_counts``: capability checks without the capability). Read it before
        :meth:`behaviour_counts`, which then forgets the cgroups that are gone."""
        self._require()
        out: dict[int, dict[str, KeyReading]] = {}
        for ext in self.extensions:
            refused = getattr(ext, "refused_counts", None)
            if refused is None:
                continue
            counts = refused(after_exec) if getattr(ext, "phases", False) else refused()
            for cg, per_key in counts.items():
                out.setdefault(cg, {}).update(per_key)
        return out

    def behaviour_slot(self, cgroup_id: int) -> dict | None:
        """The cgroup's ``behaviour_slot`` (:class:`sensor.mirrors.BehaviourSlot` fields:
        entries held in the counter tables, what was dropped beyond the caps), or None when it
        has no counter slot."""
        self._require()
        slot = ctypes.c_uint32()
        if map_op(BPF_MAP_LOOKUP_ELEM, self._maps["cgroup_slots"], ctypes.c_uint64(cgroup_id), slot):
            return None
        return self._behaviour_slot(slot.value)

    def _behaviour_slot(self, slot: int) -> dict | None:
        buf = ctypes.create_string_buffer(BehaviourSlot.size())
        if map_op(BPF_MAP_LOOKUP_ELEM, self._maps["behaviour_slots"], ctypes.c_uint32(slot), buf):
            return None
        return BehaviourSlot.unpack(buf.raw)

    def dropped_counts(self) -> dict[int, dict[str, DropReading]]:
        """cgroup id -> substrate (``egress``, ``exec``) -> cumulative reading of what the
        cgroup did beyond its cap in the kernel's counter tables (or when the table was full):
        occurrences not counted, an estimate of how many distinct behaviours they were, first
        and last time. Only cgroups that dropped something appear. Uses the cgroup slots of
        the last :meth:`syscall_counts` call when there was one."""
        self._require()
        slots = self._slots_read if self._slots_read is not None else self.cgroup_slots()
        out: dict[int, dict[str, DropReading]] = {}
        wall = self._wall_offset
        for cg, slot in slots.items():
            s = self._behaviour_slot(slot)
            if s is None:
                continue
            for prefix, substrate in (("net", "egress"), ("exec", "exec")):
                n = s[f"{prefix}_dropped"]
                if n:
                    out.setdefault(cg, {})[substrate] = DropReading(
                        n, sketch.estimate(s[f"{prefix}_sketch"]),
                        s[f"{prefix}_dropped_first_ns"] / 1e9 + wall,
                        s[f"{prefix}_dropped_last_ns"] / 1e9 + wall)
        return out

    # ---- extensions: syscall hooks and watched cgroups ----------------------------------------

    def set_hook(self, hook: int, prog_fd: int | None) -> None:
        """Put a program (a raw tracepoint program of an extension's family) on syscall hook
        ``hook`` (:data:`HOOK_SOCKET`), or take it off (None). It runs, tail-called at the end of
        sys_enter, for the hook's syscalls of the cgroups hooked with :meth:`hook_cgroup`."""
        self._require()
        key = ctypes.c_uint32(hook)
        if prog_fd is None:
            map_op(BPF_MAP_DELETE_ELEM, self._maps["hooks"], key)
            return
        err = map_op(BPF_MAP_UPDATE_ELEM, self._maps["hooks"], key, ctypes.c_uint32(prog_fd))
        if err:
            raise ProbeAttachError(f"sensor hook {hook}: {os.strerror(err)}; fix: report this as a bug")

    def hook_cgroup(self, cgroup_id: int, bits: int) -> None:
        """Run the hooks in ``bits`` (``1 << HOOK_*``) for the syscalls of cgroup ``cgroup_id``
        (0 stops them). Written for the cgroup first, then for its counter slot if it has one:
        the kernel copies the cgroup's bits into a slot it hands out, so either way the slot
        ends up with them."""
        self._require()
        key, val = ctypes.c_uint64(cgroup_id), ctypes.c_uint32(bits)
        if bits:
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["hooked_cgroups"], key, val)
        else:
            map_op(BPF_MAP_DELETE_ELEM, self._maps["hooked_cgroups"], key)
        slot = ctypes.c_uint32()
        if map_op(BPF_MAP_LOOKUP_ELEM, self._maps["cgroup_slots"], key, slot) == 0:
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["hook_slots"], slot, val)

    def cgroup_loss(self) -> dict[int, dict[str, int]]:
        """cgroup id -> loss counter -> cumulative loss that belongs to that cgroup: ring-buffer
        reservations that failed for its records (``ringbuf_full_<type>``, the names of
        :meth:`loss`, counted in its counter slot), and what the extensions attribute to it
        (``<extension>_<name>``). Only cgroups that lost something appear; the values of a
        forgotten cgroup go with its slot. Uses the cgroup slots of the last
        :meth:`syscall_counts` call when there was one."""
        self._require()
        slots = self._slots_read if self._slots_read is not None else self.cgroup_slots()
        out: dict[int, dict[str, int]] = {}
        width = LOSS_RESERVE_TYPES
        for cg, slot in slots.items():
            vals = self._percpu_u64("slot_loss", slot, self._slot_loss_buf)
            for idx, name in LOSS_NAMES.items():
                if idx >= width:
                    continue
                n = sum(vals[c * width + idx] for c in range(self._ncpus))
                if n:
                    out.setdefault(cg, {})[name] = n
        for ext in self.extensions:
            read = getattr(ext, "cgroup_loss", None)
            for cg, per in (read() if read is not None else {}).items():
                d = out.setdefault(cg, {})
                for name, n in per.items():
                    d[f"{ext.name}_{name}"] = n
        return out

    def track_cgroup(self, cgroup_id: int) -> None:
        """With ``tracked_only``: observe ``cgroup_id`` and the cgroups that will be made below
        it (write it before a process joins it; a no-op without ``tracked_only``, where every
        cgroup is observed)."""
        self._require()
        if not self.tracked_only:
            return
        err = map_op(BPF_MAP_UPDATE_ELEM, self._maps["tracked_cgroups"], ctypes.c_uint64(cgroup_id),
                     ctypes.c_uint32(1))
        if err:
            raise ProbeAttachError(f"sensor tracked_cgroups: {os.strerror(err)}; fix: fewer than "
                                   f"{self.max_cgroups} cgroups can be tracked at once")

    def watch_cgroup(self, cgroup_id: int, path: str | None) -> None:
        """A cgroup the pump bound to a workload session: tracked (see :meth:`track_cgroup`),
        and the extensions that follow workloads' cgroups (``watch``) start on it."""
        self.track_cgroup(cgroup_id)
        for ext in self.extensions:
            watch = getattr(ext, "watch", None)
            if watch is None:
                continue
            try:
                watch(cgroup_id, path)
            except Exception as e:  # noqa: BLE001 - one extension must not stop the others
                log.warning("sensor extension watch failed", extension=ext.name, cgroup=cgroup_id,
                            error=str(e))

    def forget_cgroup(self, cgroup_id: int) -> None:
        """Free the counter slot of a cgroup that is gone (read its counts first).

        The slot's owner is cleared before its hash entry goes, so per-CPU cache entries that
        still name the slot stop matching at once. The slot is zeroed and handed back to the
        kernel only after :data:`SLOT_REUSE_GRACE`, by which time any program that passed the
        owner check before the clear has finished; its stray increments are zeroed with the
        rest. A cgroup that is forgotten while still alive gets a fresh slot, not a wrong one.

        Its destination and exec entries are reported once more by the next
        :meth:`behaviour_counts` and deleted after it.
        """
        self._require()
        self._forgotten.add(cgroup_id)  # after the next reading (behaviour_counts)
        for ext in self.extensions:
            unwatch = getattr(ext, "unwatch", None)
            if unwatch is not None:
                try:
                    unwatch(cgroup_id)
                except Exception as e:  # noqa: BLE001
                    log.warning("sensor extension unwatch failed", extension=ext.name, error=str(e))
        key = ctypes.c_uint64(cgroup_id)
        map_op(BPF_MAP_DELETE_ELEM, self._maps["hooked_cgroups"], key)
        map_op(BPF_MAP_DELETE_ELEM, self._maps["tracked_cgroups"], key)
        slot = ctypes.c_uint32()
        if map_op(BPF_MAP_LOOKUP_ELEM, self._maps["cgroup_slots"], key, slot) != 0:
            return
        self._write_slot_state(slot.value)
        map_op(BPF_MAP_DELETE_ELEM, self._maps["cgroup_slots"], key)
        self._quarantine.append((time.monotonic(), slot.value))
        self._release_quarantine()

    def _write_slot_state(self, slot: int) -> None:
        zero = ctypes.create_string_buffer(SyscallSlotState.size())
        map_op(BPF_MAP_UPDATE_ELEM, self._maps["slot_state"], ctypes.c_uint32(slot), zero)

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
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["syscall_counts"], k, zeros)
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["behaviour_slots"], k,
                   ctypes.create_string_buffer(BehaviourSlot.size()))
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["slot_loss"], k,
                   ctypes.create_string_buffer(SlotLoss.size() * self._ncpus))
            self._write_slot_state(slot)
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["hook_slots"], k, ctypes.c_uint32(0))
            map_op(BPF_MAP_UPDATE_ELEM, self._maps["free_slots"], None, k)
        self._quarantine = keep


