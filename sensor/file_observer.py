"""The file substrate's observation: a sensor extension (:class:`sensor.probes.Extension`) that
loads ``bpf/files.c`` in its observation role and turns what the kernel counts into
``file:KIND:PATH`` behaviours.

The kernel counts each successful access per (cgroup, access bits, path as given) in one hash
map, cumulatively, and announces a new key once (``EV_FILE_FIRST``). Here:

* :meth:`FileObserver.consume` learns a new key at once: a relative path is resolved against
  the process's working directory or directory fd while the process still runs
  (:class:`sensor.proc_paths.ProcPaths`), and a path opened for reading that is a directory
  becomes a ``list``;
* :meth:`FileObserver.behaviour_counts` reads the whole map (batched, one syscall per 1024 keys)
  and sums kernel keys into behaviour keys (an ``O_RDWR`` open is a read and a write; one
  relative path opened by many processes is one behaviour), as
  :class:`sensor.aggregate.KeyReading`; a key whose announcement was lost is learned from the
  map itself;
* :meth:`FileObserver.loss` reports the kernel's node-wide loss counters (ring buffer full, map
  full, a path unreadable or longer than the kernel keeps), and :meth:`FileObserver.cgroup_loss`
  what belongs to one cgroup: accesses over its key bound, and relative paths that could not be
  resolved any more (the process or its directory fd was gone);
* :meth:`FileObserver.forget_cgroup` drops the keys of a cgroup that is gone.

Costs measured here: the programs sit on ``syscalls:sys_exit_*`` of the file syscalls only; the
kernel's perf syscall-exit hook then runs for every syscall (~3.5 ns, a bitmap test); a counted
open reads its path, hashes it (a keyed 64-bit hash, seeded at random per load) and looks up a
32-byte key (``bench/bench_files.py``).
"""

from __future__ import annotations

import secrets
import struct
from pathlib import Path
from typing import Sequence

import structlog

from . import features, kernel
from .aggregate import KeyReading
from .events import FILE_ACC_CREATE, FILE_ACC_READ, FileFirstEvent
from .file_access import behaviours
from .kernel import Family, Map, Program
from .mirrors import (FILE_LOSS_MAP_FULL, FILE_LOSS_PATH_TRUNCATED, FILE_LOSS_PATH_UNREADABLE,
                      FILE_LOSS_RINGBUF_DENIAL, FILE_LOSS_RINGBUF_FIRST, U32, U64, FileCgroup, FileCount,
                      FileKey)
from .proc_paths import ProcPaths

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "files.c"
#: The syscalls whose exits bpf/files.c programs (one program each).
SYSCALLS = ("open", "openat", "openat2", "creat", "truncate", "execve", "execveat", "unlink", "unlinkat",
            "rmdir", "mkdir", "mkdirat", "mknod", "mknodat", "rename", "renameat", "renameat2", "link",
            "linkat", "symlink", "symlinkat")
LOSS_NAMES = {
    FILE_LOSS_RINGBUF_FIRST: "ringbuf_full_first",
    FILE_LOSS_RINGBUF_DENIAL: "ringbuf_full_denial",
    FILE_LOSS_MAP_FULL: "map_full",
    FILE_LOSS_PATH_UNREADABLE: "path_unreadable",
    FILE_LOSS_PATH_TRUNCATED: "path_too_long",
}
# FILE_LOSS_CGROUP_OVERFLOW is the node-wide sum of what file_cgroups holds per cgroup: the
# per-cgroup values are reported (cgroup_loss), so the profile that overflowed says so.
_NEEDS_DIR_CHECK = FILE_ACC_READ | FILE_ACC_CREATE  # a read of a directory is a list, ...


class FileProbeError(RuntimeError):
    """The file programs cannot run here: ``"<what>: <why>; fix: <action>"``."""


def exit_tracepoints(syscalls: Sequence[str] = SYSCALLS) -> tuple[str, ...]:
    """The ``syscalls:sys_exit_*`` tracepoints of ``syscalls`` that this kernel has (an
    architecture without ``open`` or ``rename`` simply lacks them)."""
    base = features.tracefs_path()
    if base is None:
        raise FileProbeError("file programs: tracefs is not mounted; fix: mount -t tracefs nodev "
                             "/sys/kernel/tracing")
    return tuple(sc for sc in syscalls if (base / "events" / "syscalls" / f"sys_exit_{sc}").is_dir())


def family(name: str, role_flags: Sequence[str], maps: Sequence[str], cflags: Sequence[str] = ()) -> Family:
    """``bpf/files.c`` with its role (``-DFILES_OBSERVE=1`` and/or ``-DFILES_DENIALS=1``): one
    tracepoint program per syscall exit this kernel has. It reads each call's arguments from
    the caller's register frame through ``bpf_task_pt_regs``, which needs the kernel's BTF."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise FileProbeError("file programs: no /sys/kernel/btf/vmlinux (bpf_task_pt_regs needs BTF); fix: a "
                             "kernel built with CONFIG_DEBUG_INFO_BTF=y")
    programs = tuple(Program(f"tracepoint__syscalls__sys_exit_{sc}", "tracepoint", f"syscalls:sys_exit_{sc}")
                     for sc in exit_tracepoints())
    return Family(name, str(SOURCE), (f"-I{kernel.BPF_DIR}", *role_flags, *cflags), programs, tuple(maps),
                  fix="run `envelope doctor` (needs syscall tracepoints, BTF and bpf_task_pt_regs)")


def read_loss(loss_map: Map) -> dict[str, int]:
    return {name: loss_map.percpu_sum(U32.pack(i)) for i, name in LOSS_NAMES.items()}


class FileObserver:
    """The sensor extension of the file substrate (see the module docstring)."""

    name = "files"
    rings = ("events",)
    MAPS = ("file_counts", "file_cgroups", "file_loss", "events")

    def __init__(self, max_keys: int = 131072, per_cgroup: int = 8192, ringbuf_pages: int = 64,
                 paths: ProcPaths | None = None, event_cgroup: int = 0):
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two, got {ringbuf_pages}")
        self.flags = [f"-DFILES_MAX_KEYS={int(max_keys)}", f"-DFILES_PER_CGROUP={int(per_cgroup)}",
                      f"-DFILES_RINGBUF_PAGES={int(ringbuf_pages)}", f"-DFILES_EVENT_CGROUP={int(event_cgroup)}",
                      f"-DFILES_HASH_SEED={secrets.randbits(64)}ULL"]
        self.paths = paths or ProcPaths()
        self._loaded: kernel.Loaded | None = None
        self._counts: Map | None = None
        self._cgroups: Map | None = None
        self._loss: Map | None = None
        self._wall = None
        self._known: dict[bytes, tuple[str, ...] | None] = {}  # kernel key -> behaviour keys (None: unresolved)
        self._gone: set[int] = set()  # forgotten cgroups whose keys the next reading deletes
        self.unresolved: dict[int, int] = {}  # cgroup id -> kernel keys whose relative path was not resolved

    # ---- the Extension protocol -----------------------------------------------------------

    def family(self, base_cflags: Sequence[str]) -> Family:
        return family("files", ["-DFILES_OBSERVE=1"], self.MAPS, self.flags)

    def attached(self, loaded: kernel.Loaded, sensor) -> None:
        self._loaded = loaded
        self._counts = Map(loaded.maps["file_counts"], "file_counts")
        self._cgroups = Map(loaded.maps["file_cgroups"], "file_cgroups")
        self._loss = Map(loaded.maps["file_loss"], "file_loss")
        self._wall = sensor.wall_time

    def tick(self) -> None:
        pass

    def consume(self, ev) -> bool:
        """An announcement: learn the key while its process still runs. The event still goes out
        with the sensor's (False): it is counted by type, but holds no occurrence (the map does)."""
        if not isinstance(ev, FileFirstEvent) or ev.truncated:
            return False
        raw = FileKey.pack(cgroup_id=ev.cgroup_id, access=ev.access, pid=ev.key_pid, dirfd=ev.dirfd,
                           path_hash=ev.path_hash)
        if raw not in self._known:
            self._known[raw] = self._learn(ev.cgroup_id, ev.access, ev.key_pid, ev.dirfd, ev.path, ev.pid)
        return False

    def behaviour_counts(self) -> dict[int, dict[str, KeyReading]]:
        if self._counts is None:
            return {}
        out: dict[int, dict[str, list]] = {}
        gone, self._gone = self._gone, set()
        for raw, val in self._counts.batch_items():
            if gone and struct.unpack_from("<Q", raw)[0] in gone:  # forgotten: its keys go now
                self._counts.delete(raw)
                self._known.pop(raw, None)
                continue
            count, first, last, path_len, _flags, _pad, path = FileCount.unpack_tuple(val)
            keys = self._known.get(raw, False)
            if keys is False:  # its announcement was lost: learn it from the map itself
                k = FileKey.unpack(raw)
                path_text = path[:path_len].decode("utf-8", "backslashreplace")
                keys = self._known[raw] = self._learn(k["cgroup_id"], k["access"], k["pid"], k["dirfd"], path_text,
                                                      k["pid"])
            if not keys:
                continue
            cg = struct.unpack_from("<Q", raw)[0]
            per = out.setdefault(cg, {})
            for b in keys:
                cur = per.get(b)
                if cur is None:
                    per[b] = [count, first, last]
                else:
                    cur[0] += count
                    cur[1] = min(cur[1], first)
                    cur[2] = max(cur[2], last)
        wall = self._wall
        return {cg: {b: KeyReading(c, wall(f), wall(l)) for b, (c, f, l) in per.items()}
                for cg, per in out.items()}

    def loss(self) -> dict[str, int]:
        if self._loss is None:
            return {}
        return read_loss(self._loss)

    def cgroup_loss(self) -> dict[int, dict[str, int]]:
        if self._cgroups is None:
            return {}
        out: dict[int, dict[str, int]] = {cg: {"unresolved": n} for cg, n in self.unresolved.items()}
        for raw, val in self._cgroups.batch_items():
            over = FileCgroup.unpack(val)["overflow"]
            if over:
                out.setdefault(struct.unpack("<Q", raw)[0], {})["cgroup_overflow"] = over
        return out

    def forget_cgroup(self, cgroup_id: int) -> None:
        """The cgroup is gone (its last counts were read): drop its bound now and its keys in the
        next reading's one pass over the map (a pass per gone cgroup would cost the map's size
        in syscalls each, and a node forgets many cgroups at once)."""
        if self._counts is None:
            return
        self._gone.add(cgroup_id)
        self._cgroups.delete(U64.pack(cgroup_id))
        self.unresolved.pop(cgroup_id, None)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded = None  # the sensor closes the fds it received
        self._counts = self._cgroups = self._loss = None

    # ---- kernel keys -> behaviour keys ------------------------------------------------------

    def _learn(self, cgroup_id: int, access: int, key_pid: int, dirfd: int, path: str,
               pid: int) -> tuple[str, ...] | None:
        absolute = self.paths.resolve(key_pid, dirfd, path)
        if absolute is None:
            self.unresolved[cgroup_id] = self.unresolved.get(cgroup_id, 0) + 1
            log.debug("relative file path not resolved", path=path, pid=key_pid, dirfd=dirfd)
            return None
        is_dir = self.paths.is_dir(pid, absolute) if access & _NEEDS_DIR_CHECK else None
        return behaviours(access, absolute, is_dir)
