"""Kernel access: every ``bpf(2)`` command Envelope uses, maps, pins, program attachment, the
ring-buffer reader, and the short-lived loader child that compiles BPF programs.

This is the one binding to the BPF subsystem. It needs no bcc and no libbpf: commands are
issued with the raw ``bpf(2)`` syscall through ctypes, ring buffers are read through ``mmap``.

**The loader child.** Compiling with BCC maps LLVM and clang into the process (about 150 MB
resident here). Every program family (observation, egress enforcement, seccomp-denial
visibility, and those to come) is therefore compiled, loaded and, where it says so, attached in
a short-lived child process (``python -m sensor.kernel load``) that hands every map, program
and attachment file descriptor to the caller over a Unix socket (SCM_RIGHTS) and exits with
``os._exit`` so that bcc's cleanup never detaches what the caller now holds. A
:class:`Family` says what to compile and what to attach; :func:`load` returns a
:class:`Loaded` set of fds; :func:`load_all` runs several loader children side by side (the
sensor's families start in about half the time on two CPUs). A long-lived process that only
reads maps and rings never imports bcc.

Attachments come in two lifetimes. An attachment fd (raw tracepoint, perf event, BPF link) lives
exactly as long as its fd: if the holder dies, everything detaches. A program attached to a
cgroup with ``BPF_PROG_ATTACH`` (:func:`prog_attach`) holds its own reference and stays until it
is detached or the cgroup goes; pinned in bpffs (:func:`obj_pin`) it can be re-opened by path
after a restart (:func:`obj_get`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import mmap
import os
import platform
import select
import socket
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import structlog

from .libc import LIBC, function

log = structlog.get_logger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PAGE_SIZE = mmap.PAGESIZE
LOADER_TIMEOUT = 120.0  # seconds the loader child may take to compile, load and attach

# ---- bpf(2) commands, map and program types, attach types (uapi/linux/bpf.h) ------------------

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_DELETE_BATCH = 27
_ENOTSUPP = 524  # the kernel's internal "not supported" errno, not in the errno module
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_RDONLY = 1 << 3  # file_flags of BPF_OBJ_GET
BPF_F_WRONLY = 1 << 4

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                              BPF_MAP_TYPE_LRU_PERCPU_HASH})

BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_LSM = 29

BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_TRACE_FENTRY = 24
BPF_LSM_MAC = 27

#: The cgroup sock_addr hooks: program-name suffix -> attach type.
SOCK_ADDR_HOOKS = {
    "connect4": BPF_CGROUP_INET4_CONNECT,
    "connect6": BPF_CGROUP_INET6_CONNECT,
    "sendmsg4": BPF_CGROUP_UDP4_SENDMSG,
    "sendmsg6": BPF_CGROUP_UDP6_SENDMSG,
}

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_NR_BPF_HERE = _NR_BPF.get(platform.machine(), -1)
_syscall = function("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
_ATTR_SIZE = 128  # larger than every attr used here; the kernel checks the tail is zero


class BpfError(OSError):
    """A ``bpf(2)`` command failed; ``errno`` is the kernel's, the message says which command."""


# ---- raw commands -------------------------------------------------------------------------------


def bpf(cmd: int, attr: bytes, what: str = "") -> int:
    """Issue ``bpf(cmd, attr)``; returns the result or raises :class:`BpfError`."""
    if _NR_BPF_HERE < 0:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, max(len(attr), _ATTR_SIZE))
    ret = _syscall(_NR_BPF_HERE, cmd, ctypes.addressof(buf), _ATTR_SIZE)
    if ret < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"{what or f'bpf cmd {cmd}'}: {os.strerror(e)}")
    return ret


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_ELEM_ATTR_SIZE = ctypes.sizeof(_ElemAttr)


def map_op(cmd: int, fd: int, key=None, value=None, flags: int = 0) -> int:
    """One map element command on ctypes buffers (or None); returns 0 or the errno.

    The fast path for hot loops: no exception, no allocation beyond the attr. For
    ``GET_NEXT_KEY`` ``value`` receives the next key; for queues and stacks ``key`` is None."""
    attr = _ElemAttr(fd, 0, ctypes.addressof(key) if key is not None else 0,
                     ctypes.addressof(value) if value is not None else 0, flags)
    if _syscall(_NR_BPF_HERE, cmd, ctypes.addressof(attr), _ELEM_ATTR_SIZE) < 0:
        return ctypes.get_errno()
    return 0


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


_ENOTSUPP = 524  # the kernel-internal "operation not supported" some map types return
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP)


def map_dump(fd: int, key_size: int, value_size: int, chunk: int = 256) -> tuple[bytes, bytes, int]:
    """Every entry of a map with plain (not per-CPU) values: ``(keys, values, n)``, the keys and
    the values each concatenated, in the map's order.

    Uses ``BPF_MAP_LOOKUP_BATCH`` (Linux 5.6+), one call per ``chunk`` entries, so reading a table
    of thousands of entries costs a few syscalls; where the kernel refuses batch lookups it walks
    the map with ``GET_NEXT_KEY`` and ``LOOKUP``. Entries that come or go during the dump may or
    may not be in it."""
    keys: list[bytes] = []
    values: list[bytes] = []
    total = 0
    kbuf = ctypes.create_string_buffer(key_size * chunk)
    vbuf = ctypes.create_string_buffer(value_size * chunk)
    token = max(key_size, 8)  # hash maps take a u32 bucket index, arrays a key
    in_b, out_b = ctypes.create_string_buffer(token), ctypes.create_string_buffer(token)
    first = True
    while True:
        attr = _BatchAttr(0 if first else ctypes.addressof(in_b), ctypes.addressof(out_b),
                          ctypes.addressof(kbuf), ctypes.addressof(vbuf), chunk, fd, 0, 0)
        ret = _syscall(_NR_BPF_HERE, BPF_MAP_LOOKUP_BATCH, ctypes.addressof(attr),
                       ctypes.sizeof(attr))
        err = ctypes.get_errno() if ret < 0 else 0
        if err == errno.ENOSPC:  # one hash bucket holds more entries than `chunk`
            chunk *= 4
            kbuf = ctypes.create_string_buffer(key_size * chunk)
            vbuf = ctypes.create_string_buffer(value_size * chunk)
            continue
        if err and err != errno.ENOENT:
            if first and err in _NO_BATCH:
                return _dump_by_walking(fd, key_size, value_size)
            raise BpfError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        n = attr.count
        if n:
            keys.append(kbuf.raw[:n * key_size])
            values.append(vbuf.raw[:n * value_size])
            total += n
        if err == errno.ENOENT:
            break
        ctypes.memmove(in_b, out_b, token)
        first = False
    return b"".join(keys), b"".join(values), total


def _dump_by_walking(fd: int, key_size: int, value_size: int) -> tuple[bytes, bytes, int]:
    keys, values = [], []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    val = ctypes.create_string_buffer(value_size)
    for _ in range(1 << 24):  # bounded even if entries churn while the walk runs
        if map_op(BPF_MAP_GET_NEXT_KEY, fd, cur, nxt) != 0:
            break
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
        if map_op(BPF_MAP_LOOKUP_ELEM, fd, cur, val) == 0:
            keys.append(nxt.raw)
            values.append(val.raw)
    return b"".join(keys), b"".join(values), len(keys)


def map_delete_keys(fd: int, keys: bytes, key_size: int) -> None:
    """Delete the concatenated ``keys`` (``BPF_MAP_DELETE_BATCH``, else one by one); keys that
    are already gone are skipped."""
    n = len(keys) // key_size
    if not n:
        return
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    attr = _BatchAttr(0, 0, ctypes.addressof(kbuf), 0, n, fd, 0, 0)
    if _syscall(_NR_BPF_HERE, BPF_MAP_DELETE_BATCH, ctypes.addressof(attr),
                ctypes.sizeof(attr)) == 0:
        return
    # a missing key stops a batch delete part way (count says how far it got): finish one by one
    start = attr.count if attr.count < n else 0
    for i in range(start, n):
        k = ctypes.create_string_buffer(keys[i * key_size:(i + 1) * key_size], key_size)
        map_op(BPF_MAP_DELETE_ELEM, fd, k)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    return bpf(BPF_MAP_CREATE, struct.pack("<IIIII", map_type, key_size, value_size,
                                           max_entries, flags), "BPF_MAP_CREATE")


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0,
              attach_btf_id: int = 0) -> int:
    """Load raw instructions (feature probes use two-instruction programs)."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, prog_type, len(insns) // 8,
                     ctypes.addressof(insn_buf), ctypes.addressof(lic))
    struct.pack_into("<I", attr, 68, expected_attach_type)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    return bpf(BPF_PROG_LOAD, bytes(attr), "BPF_PROG_LOAD")


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    cname = ctypes.create_string_buffer(name.encode())
    return bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI", ctypes.addressof(cname), prog_fd),
               f"BPF_RAW_TRACEPOINT_OPEN {name}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """A BPF link: the attachment lives exactly as long as the returned fd.

    For cgroup programs a link attaches like ``BPF_F_ALLOW_MULTI``: it runs alongside other
    programs on the same cgroup, including enforcement programs attached by other loaders."""
    return bpf(BPF_LINK_CREATE, struct.pack("<IIII", prog_fd, target_fd, attach_type, flags),
               "BPF_LINK_CREATE")


# ---- uprobes: perf events attached to a program fd (no bcc, no LLVM) ---------------------------

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(platform.machine(), -1)
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
_UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe")


def _uprobe_pmu() -> tuple[int, int]:
    """The uprobe PMU's type and the config bit that makes a probe a return probe."""
    try:
        typ = int((_UPROBE_PMU / "type").read_text())
        fmt = (_UPROBE_PMU / "format" / "retprobe").read_text().strip()  # "config:0"
        bit = int(fmt.split(":", 1)[1])
    except (OSError, ValueError, IndexError) as e:
        raise BpfError(errno.ENOENT, f"uprobe PMU: {_UPROBE_PMU} unreadable ({e})") from e
    return typ, bit


def uprobe_open(prog_fd: int, path: str | os.PathLike, offset: int, retprobe: bool = False) -> int:
    """A uprobe (or return probe) at ``offset`` in the file ``path`` that runs ``prog_fd`` (a
    BPF_PROG_TYPE_KPROBE program), for every process mapping that file; returns the perf event
    fd, which holds the attachment: closing it detaches.

    ``perf_event_open`` with the uprobe PMU, then ``PERF_EVENT_IOC_SET_BPF``: what BCC's
    ``attach_uprobe`` does, without bcc, so the long-lived process never maps LLVM."""
    if _NR_PERF_EVENT_OPEN < 0:
        raise BpfError(errno.ENOSYS, f"perf_event_open number unknown on {platform.machine()}")
    typ, bit = _uprobe_pmu()
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    config = (1 << bit) if retprobe else 0
    # type, size, config, sample_period, sample_type, read_format, flags, wakeup, bp_type, config1, config2
    struct.pack_into("<IIQQQQQIIQQ", attr, 0, typ, _PERF_ATTR_SIZE, config, 1, 0, 0, 0, 1, 0,
                     ctypes.addressof(cpath), offset)
    fd = _syscall_perf(ctypes.addressof(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"perf_event_open uprobe {path}+{offset:#x}: {os.strerror(e)}")
    try:
        for req, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
            if LIBC.ioctl(fd, req, arg) < 0:
                e = ctypes.get_errno()
                raise BpfError(e, f"uprobe {path}+{offset:#x}: ioctl {req:#x}: {os.strerror(e)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


# A prototype of its own: the bpf(2) one above is typed for bpf's signature.
_perf_syscall = function("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_ulong)


def _syscall_perf(attr: int, pid: int, cpu: int, group: int, flags: int) -> int:
    return _perf_syscall(_NR_PERF_EVENT_OPEN, attr, pid, cpu, group, flags)


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, struct.pack("<QII", ctypes.addressof(p), fd, 0), f"BPF_OBJ_PIN {path}")


def obj_get(path: str | os.PathLike, flags: int = 0) -> int:
    """Open a pinned object; ``flags`` may ask for a read-only (BPF_F_RDONLY) map fd."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, struct.pack("<QII", ctypes.addressof(p), 0, flags),
               f"BPF_OBJ_GET {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    bpf(BPF_PROG_ATTACH, struct.pack("<IIIII", target_fd, prog_fd, attach_type, flags, 0),
        "BPF_PROG_ATTACH")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    bpf(BPF_PROG_DETACH, struct.pack("<IIIII", target_fd, prog_fd, attach_type, 0, 0),
        "BPF_PROG_DETACH")


def prog_query(target_fd: int, attach_type: int, capacity: int = 64) -> list[int]:
    """Ids of the programs attached directly to a cgroup for ``attach_type``."""
    ids = (ctypes.c_uint32 * capacity)()
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids),
                     capacity)
    if _syscall(_NR_BPF_HERE, BPF_PROG_QUERY, ctypes.addressof(attr), _ATTR_SIZE) < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"BPF_PROG_QUERY: {os.strerror(e)}")
    count = struct.unpack_from("<I", attr, 24)[0]
    return [ids[i] for i in range(min(count, capacity))]


def obj_info(fd: int, size: int = 256) -> bytes:
    """The raw ``bpf_{prog,map}_info`` of a program or map fd."""
    info = ctypes.create_string_buffer(size)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, size, ctypes.addressof(info)),
        "BPF_OBJ_GET_INFO_BY_FD")
    return info.raw


def obj_id(fd: int) -> int:
    """The kernel id of a program or map (``id`` is the second u32 of both info structs)."""
    return struct.unpack_from("<II", obj_info(fd))[1]


def link_prog_id(fd: int) -> int:
    """The id of the program behind a link fd (a raw tracepoint's fd is a link): ``prog_id`` is
    the third u32 of ``bpf_link_info``."""
    return struct.unpack_from("<III", obj_info(fd))[2]


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for the loaded program ``prog_id`` (the caller closes it)."""
    return bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id), "BPF_PROG_GET_FD_BY_ID")


_PROG_INFO_RUN_CNT = 200  # offset of run_cnt in struct bpf_prog_info (after run_time_ns at 192)


def prog_run_count(fd: int) -> int:
    """How many times the program ``fd`` has run while run-time statistics were on
    (:func:`run_stats`); the kernel counts nothing otherwise."""
    return struct.unpack_from("<Q", obj_info(fd), _PROG_INFO_RUN_CNT)[0]


@contextlib.contextmanager
def run_stats():
    """Run-time statistics of every BPF program on (``BPF_ENABLE_STATS``) for the block.

    Node-wide and not free (each program run is timed), so for short checks only, never
    around a measurement."""
    fd = bpf(BPF_ENABLE_STATS, struct.pack("<I", BPF_STATS_RUN_TIME), "BPF_ENABLE_STATS")
    try:
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = obj_info(fd)
    typ, mid, ks, vs, me, fl = struct.unpack_from("<IIIIII", raw)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(typ, mid, ks, vs, me, fl, name)


def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a value for (``/sys/devices/system/cpu/possible``)."""
    n = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def close_fds(fds: Iterable[int | None]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# ---- maps ---------------------------------------------------------------------------------------


class Map:
    """A BPF map addressed by fd, with byte-string keys and values.

    Per-CPU maps return one value slot per possible CPU, each rounded up to 8 bytes
    (:meth:`percpu_values`). Errors raise :class:`BpfError` naming the map and the command;
    a missing key is ``None`` or ``False``, not an error."""

    def __init__(self, fd: int, name: str = ""):
        self.fd = fd
        info = map_info(fd)
        self.name = name or info.name
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.id = info.id
        self.percpu = info.type in PERCPU_MAP_TYPES
        self._slot = (self.value_size + 7) // 8 * 8
        self._buf_size = self._slot * possible_cpus() if self.percpu else self.value_size

    def _key(self, key: bytes | None):
        if key is None:
            return None
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, expected {self.key_size}")
        return ctypes.create_string_buffer(key, self.key_size)

    def _fail(self, op: str, err: int) -> BpfError:
        return BpfError(err, f"map {self.name}: {op}: {os.strerror(err)}")

    def lookup(self, key: bytes | None) -> bytes | None:
        buf = ctypes.create_string_buffer(max(self._buf_size, 1))
        err = map_op(BPF_MAP_LOOKUP_ELEM, self.fd, self._key(key), buf)
        if err == errno.ENOENT:
            return None
        if err:
            raise self._fail("lookup", err)
        return buf.raw[:self._buf_size]

    def update(self, key: bytes | None, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self._buf_size:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, expected "
                             f"{self._buf_size}")
        err = map_op(BPF_MAP_UPDATE_ELEM, self.fd, self._key(key),
                     ctypes.create_string_buffer(value, len(value)), flags)
        if err:
            raise self._fail("update", err)

    def delete(self, key: bytes) -> bool:
        err = map_op(BPF_MAP_DELETE_ELEM, self.fd, self._key(key))
        if err == errno.ENOENT:
            return False
        if err:
            raise self._fail("delete", err)
        return True

    def push(self, value: bytes) -> None:
        """Queue or stack: add ``value``."""
        self.update(None, value)

    def pop(self) -> bytes | None:
        """Queue or stack: take one value, or None when empty."""
        buf = ctypes.create_string_buffer(self.value_size)
        err = map_op(BPF_MAP_LOOKUP_AND_DELETE_ELEM, self.fd, None, buf)
        if err == errno.ENOENT:
            return None
        if err:
            raise self._fail("pop", err)
        return buf.raw

    def keys(self, limit: int | None = None) -> list[bytes]:
        """Every key, bounded even if entries churn while the walk runs."""
        out: list[bytes] = []
        cur = None
        nxt = ctypes.create_string_buffer(self.key_size)
        bound = limit if limit is not None else 4 * max(self.max_entries, 1)
        while len(out) < bound:
            if map_op(BPF_MAP_GET_NEXT_KEY, self.fd, cur, nxt) != 0:
                break
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return out

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def batch_items(self, chunk: int = 1024) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map with ``BPF_MAP_LOOKUP_BATCH``: one syscall per
        ``chunk`` entries instead of two per entry. Falls back to :meth:`items` where the kernel
        or the map type has no batch lookup. Entries that change during the walk may be seen in
        either state; one added meanwhile may be missed until the next call."""
        out: list[tuple[bytes, bytes]] = []
        vsize = self._buf_size
        n = max(int(chunk), 1)
        keys = ctypes.create_string_buffer(self.key_size * n)
        vals = ctypes.create_string_buffer(vsize * n)
        tokens = (ctypes.create_string_buffer(8), ctypes.create_string_buffer(8))
        first = True
        for _ in range(1 << 20):  # bounded even if the map churns while we walk
            attr = struct.pack("<QQQQIIQQ", 0 if first else ctypes.addressof(tokens[0]),
                               ctypes.addressof(tokens[1]), ctypes.addressof(keys),
                               ctypes.addressof(vals), n, self.fd, 0, 0)
            buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
            ret = _syscall(_NR_BPF_HERE, BPF_MAP_LOOKUP_BATCH, ctypes.addressof(buf), _ATTR_SIZE)
            err = ctypes.get_errno() if ret < 0 else 0
            if err in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP) and first:
                return self.items()
            if err == errno.ENOSPC:  # one bucket holds more than the chunk: grow and retry
                n *= 2
                keys = ctypes.create_string_buffer(self.key_size * n)
                vals = ctypes.create_string_buffer(vsize * n)
                continue
            if err and err != errno.ENOENT:
                raise self._fail("lookup batch", err)
            got = struct.unpack_from("<I", buf.raw, 32)[0]
            kraw, vraw = keys.raw, vals.raw
            for i in range(got):
                out.append((kraw[i * self.key_size:(i + 1) * self.key_size], vraw[i * vsize:(i + 1) * vsize]))
            if err == errno.ENOENT:  # the walk is complete
                return out
            ctypes.memmove(tokens[0], tokens[1], 8)
            first = False
        return out

    def percpu_values(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i:i + self.value_size] for i in range(0, len(raw), self._slot)]

    def percpu_sum(self, key: bytes) -> int:
        """Sum over CPUs of a per-CPU u64 counter (0 when absent)."""
        return sum(struct.unpack_from("<Q", v)[0] for v in self.percpu_values(key))

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def open_cgroup(path: str | os.PathLike) -> int:
    """An ``O_RDONLY | O_DIRECTORY`` fd of a cgroup v2 directory (what the attach commands take)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# ---- ring buffers -------------------------------------------------------------------------------

_RB_BUSY = 1 << 31
_RB_DISCARD = 1 << 30
_RB_HDR = 8


class Ring:
    """Consumer side of one BPF ring buffer map, through mmap (what libbpf's ring_buffer does).

    Page 0 holds the consumer position (ours to write); page 1 the producer position; then the
    data area, mapped twice back to back so a record that wraps reads as one slice.

    The consumer position is stored with one aligned 8-byte store (a ctypes ``c_uint64`` over
    the page), as libbpf's ``smp_store_release`` does. Producers read it at every reservation;
    ``struct.pack_into`` zeroes its destination before it writes the bytes, so a producer could
    read 0 there and refuse the reservation as if the ring were full (measured here: about 100
    spurious reserve failures per 20 s at 40,000 records/s, whatever the ring's size; see
    BENCHMARKS.md).
    """

    def __init__(self, map_fd: int, size: int):
        if size <= 0 or size & (size - 1) or size % PAGE_SIZE:
            raise ValueError(f"ring buffer size {size} is not a power-of-two number of pages")
        self.fd, self.size, self.mask = map_fd, size, size - 1
        self._cons = mmap.mmap(map_fd, PAGE_SIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, PAGE_SIZE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=PAGE_SIZE)
        self._cons_pos = ctypes.c_uint64.from_buffer(self._cons)

    def pending(self) -> int:
        """Bytes the producer has committed or reserved that this consumer has not read."""
        cons = self._cons_pos.value
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return max(prod - cons, 0)

    def consume(self, callback: Callable[[bytes], None], limit: int | None = None) -> int:
        """Hand committed records to ``callback(bytes)``, at most ``limit``; returns how many."""
        cons_pos, prod_map, mask = self._cons_pos, self._prod, self.mask
        cons = cons_pos.value
        n = 0
        while limit is None or n < limit:
            prod = struct.unpack_from("<Q", prod_map, 0)[0]
            if cons >= prod:
                return n
            while cons < prod and (limit is None or n < limit):
                off = PAGE_SIZE + (cons & mask)
                hdr = struct.unpack_from("<I", prod_map, off)[0]
                if hdr & _RB_BUSY:  # reserved, not yet committed: stop here for now
                    return n
                length = hdr & ~(_RB_BUSY | _RB_DISCARD)
                cons += (length + _RB_HDR + 7) & ~7
                if not hdr & _RB_DISCARD:
                    callback(prod_map[off + _RB_HDR:off + _RB_HDR + length])
                    n += 1
                cons_pos.value = cons  # one 8-byte store: never a torn or zeroed position
        return n

    def close(self) -> None:
        self._cons_pos = None  # the mmap cannot close while ctypes holds a view of it
        self._cons.close()
        self._prod.close()


class RingReader:
    """Drains any number of BPF ring buffers, given by fd; one epoll waits on all of them.

    ``callback(raw: bytes)`` runs for each record. An exception in a callback is logged and
    counted in :attr:`callback_errors`, never raised out of :meth:`poll` or :meth:`drain`.
    ``limit`` bounds the records handed out per call, so a caller under a flood still gets
    control back on time."""

    def __init__(self) -> None:
        self._rings: dict[int, tuple[Ring, Callable[[bytes], None]]] = {}
        self._epoll = select.epoll()
        self.callback_errors = 0

    def __contains__(self, fd: int) -> bool:
        return fd in self._rings

    def __len__(self) -> int:
        return len(self._rings)

    def add(self, fd: int, callback: Callable[[bytes], None], size: int | None = None) -> None:
        if fd in self._rings:
            return

        def guarded(raw: bytes) -> None:
            try:
                callback(raw)
            except Exception as e:  # noqa: BLE001 - counted, never raised out of poll
                self.callback_errors += 1
                log.warning("ring buffer callback failed", error=repr(e))

        if size is None:
            size = map_info(fd).max_entries
        ring = Ring(fd, size)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except OSError:
            ring.close()
            raise
        self._rings[fd] = (ring, guarded)

    def remove(self, fd: int) -> None:
        entry = self._rings.pop(fd, None)
        if entry is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        entry[0].close()

    def drain(self, limit: int | None = None) -> int:
        """Consume what is committed in every ring (at most ``limit`` records in all)."""
        n = 0
        for ring, cb in list(self._rings.values()):
            n += ring.consume(cb, None if limit is None else max(limit - n, 0))
            if limit is not None and n >= limit:
                break
        return n

    def poll(self, timeout_ms: int = 100, limit: int | None = None) -> int:
        """Consume what is there; if nothing was, wait up to ``timeout_ms`` for more."""
        n = self.drain(limit)
        if n or timeout_ms == 0:
            return n
        if not self._rings:
            if timeout_ms > 0:
                select.select([], [], [], timeout_ms / 1000)
            return 0
        self._epoll.poll(timeout_ms / 1000 if timeout_ms > 0 else -1)
        return self.drain(limit)

    def pending(self) -> int:
        return sum(r.pending() for r, _ in self._rings.values())

    def close(self) -> None:
        for ring, _ in self._rings.values():
            ring.close()
        self._rings = {}
        self._epoll.close()


# ---- program families and the loader child ------------------------------------------------------

#: Program kinds the loader knows: how BCC loads each and whether it attaches it.
PROGRAM_KINDS = ("raw_tracepoint", "tracepoint", "cgroup_sock_addr", "cgroup_skb", "uprobe", "kprobe",
                 "kretprobe")
_LOAD_TYPES = {"cgroup_sock_addr": BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
               "cgroup_skb": BPF_PROG_TYPE_CGROUP_SKB, "uprobe": BPF_PROG_TYPE_KPROBE}


class LoadError(RuntimeError):
    """A program family could not be compiled, loaded or attached:
    ``"<what>: <what failed>; fix: <action>"``."""


@dataclass(frozen=True)
class Program:
    """One program of a family.

    ``kind`` is one of :data:`PROGRAM_KINDS`. ``target`` says what the loader attaches it to:
    the tracepoint (``cat:event``) or raw tracepoint name, the kernel function of a ``kprobe`` or
    ``kretprobe`` (a perf event fd through the kprobe PMU: it lives as long as its fd), ``"cgroup2-root"`` for a cgroup
    program linked to the root of the cgroup v2 hierarchy (lives as long as its link fd), or
    ``""`` to load it only and hand back the program fd (the caller attaches it, e.g. to
    workload cgroups or to uprobes with :func:`uprobe_open`, or puts it in a program array). ``fn`` is the C function name (BCC's probe macros name
    them ``raw_tracepoint__<tp>`` and ``tracepoint__<cat>__<event>``)."""

    fn: str
    kind: str
    target: str = ""
    attach_type: int = 0


@dataclass(frozen=True)
class Family:
    """A C file under ``bpf/``, its ``-D`` flags, its programs and the maps to hand back.

    ``setup`` names a function ``"module:function"`` that the loader child calls with the map
    fds (``{name: fd}``) after loading and before attaching anything, to fill maps the programs
    need from their first run on (free slots, seeded process parents)."""

    name: str
    source: str
    cflags: tuple[str, ...] = ()
    programs: tuple[Program, ...] = ()
    maps: tuple[str, ...] = ()
    setup: str | None = None
    fix: str = "run `envelope doctor`"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Family":
        d = json.loads(text)
        d["cflags"] = tuple(d["cflags"])
        d["maps"] = tuple(d["maps"])
        d["programs"] = tuple(Program(**p) for p in d["programs"])
        return cls(**d)


@dataclass
class Loaded:
    """The fds of a loaded family: maps, program fds (load-only programs) and attachments."""

    family: str
    maps: dict[str, int] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)
    attachments: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        """Attachments first (they detach as their fds close), then programs, then maps."""
        close_fds(self.attachments.values())
        close_fds(self.programs.values())
        close_fds(self.maps.values())
        self.attachments, self.programs, self.maps = {}, {}, {}


def load(family: Family, timeout: float = LOADER_TIMEOUT) -> Loaded:
    """Compile, load and attach ``family`` in a loader child; receive its fds.

    Raises :class:`LoadError` with the child's one-line reason. Nothing stays attached when it
    fails: the child exits, and fds it sent are closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    root = str(BPF_DIR.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "sensor.kernel", "load", family.to_json(), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], cwd=root, env=env, stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    fds: list[int] = []
    try:
        ours.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(ours, 1 << 16, 253)
        except (socket.timeout, OSError) as e:
            child.kill()
            raise LoadError(f"{family.name}: no answer from the loader child "
                            f"({sys.executable} -m sensor.kernel: {e}); fix: {family.fix}") from e
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
    finally:
        ours.close()
    try:
        msg = json.loads(data.decode() or "{}")
    except ValueError:
        msg = {}
    if not msg.get("ok"):
        close_fds(fds)
        raise LoadError(msg.get("error") or f"{family.name}: loader exited with status "
                        f"{child.returncode} and no answer; fix: {family.fix}")
    names = msg.get("names", [])
    if len(fds) != len(names):
        close_fds(fds)
        raise LoadError(f"{family.name}: loader sent {len(fds)} fds for {len(names)} names; "
                        "fix: report this as a bug")
    out = Loaded(family.name)
    for name, fd in zip(names, fds):
        kind, _, n = name.partition(":")
        {"map": out.maps, "prog": out.programs, "attach": out.attachments}[kind][n] = fd
    log.debug("program family loaded", family=family.name, maps=len(out.maps),
              programs=len(out.programs), attachments=len(out.attachments))
    return out


def load_all(families: Sequence[Family], timeout: float = LOADER_TIMEOUT,
             parallel: int | None = None) -> list[Loaded]:
    """:func:`load` for several families at once, their loader children running side by side
    (``parallel`` at a time: at most the CPUs, four at most; each child holds LLVM, ~150 MB).
    Returns them in the order given. All or nothing: when one fails, the others are closed and
    the first failure in that order is raised."""
    from concurrent.futures import ThreadPoolExecutor

    families = list(families)
    workers = parallel or max(1, min(len(families), os.cpu_count() or 1, 4))

    def one(f: Family) -> Loaded | Exception:
        try:
            return load(f, timeout)
        except Exception as e:  # noqa: BLE001 - any failure (a fork refused too): the others are closed
            return e

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bpf-loader") as pool:
        results = list(pool.map(one, families))
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        for r in results:
            if isinstance(r, Loaded):
                r.close()
        raise failed[0]
    return results


def _load_in_child(family: Family) -> list[tuple[str, int]]:
    """Runs in the loader child, the only place bcc is imported."""
    from bcc import BPF

    class _BPF(BPF):
        def _trace_autoload(self):  # attach explicitly, each with its own error
            pass

    src = Path(family.source)
    if not src.is_absolute():
        src = BPF_DIR / src
    try:
        b = _BPF(src_file=str(src).encode(), cflags=list(family.cflags))
    except Exception as e:
        raise LoadError(f"{family.name}: compile {src}: {e}; fix: {family.fix} (kernel headers "
                        f"at /lib/modules/{os.uname().release}/build; -D flags "
                        f"{list(family.cflags)})") from e
    out: list[tuple[str, int]] = []
    maps = {}
    for name in family.maps:
        try:
            maps[name] = b[name.encode()].map_fd
        except KeyError as e:
            raise LoadError(f"{family.name}: no map {name!r} in {src}; fix: report this as a bug"
                            ) from e
        out.append((f"map:{name}", maps[name]))
    if family.setup:
        mod, _, fn = family.setup.partition(":")
        getattr(importlib.import_module(mod), fn)(maps)
    root_fd = None
    try:
        for p in family.programs:
            what = f"{family.name}: {p.kind} {p.fn}" + (f" on {p.target}" if p.target else "")
            try:
                if p.kind == "raw_tracepoint" and not p.target:
                    # load only: a program other programs tail-call (e.g. a sensor hook)
                    fn = b.load_func(p.fn.encode(), BPF_PROG_TYPE_RAW_TRACEPOINT)
                    out.append((f"prog:{p.fn}", fn.fd))
                elif p.kind == "raw_tracepoint":
                    b.attach_raw_tracepoint(tp=p.target.encode(), fn_name=p.fn.encode())
                    out.append((f"attach:{p.fn}", b.raw_tracepoint_fds[p.target.encode()]))
                elif p.kind == "tracepoint":
                    b.attach_tracepoint(tp=p.target.encode(), fn_name=p.fn.encode())
                    out.append((f"attach:{p.fn}", b.tracepoint_fds[p.target.encode()]))
                elif p.kind in ("kprobe", "kretprobe") and not p.target:  # load only (verified, not attached)
                    out.append((f"prog:{p.fn}", b.load_func(p.fn.encode(), BPF.KPROBE).fd))
                elif p.kind in ("kprobe", "kretprobe"):
                    entry = p.kind == "kprobe"
                    (b.attach_kprobe if entry else b.attach_kretprobe)(event=p.target.encode(), fn_name=p.fn.encode())
                    ev_name = (b"p_" if entry else b"r_") + p.target.encode().replace(b"+", b"_").replace(b".", b"_")
                    out.append((f"attach:{p.fn}", b.kprobe_fds[ev_name][p.fn.encode()]))
                elif p.kind in _LOAD_TYPES:
                    fn = b.load_func(p.fn.encode(), _LOAD_TYPES[p.kind], attach_type=p.attach_type)
                    if p.target == "cgroup2-root":
                        if root_fd is None:
                            from .cgroup import cgroup2_mount_point
                            root_fd = open_cgroup(cgroup2_mount_point())
                        out.append((f"attach:{p.fn}", link_create(fn.fd, root_fd, p.attach_type)))
                    elif p.target:
                        raise LoadError(f"{what}: unknown target; fix: report this as a bug")
                    else:
                        out.append((f"prog:{p.fn}", fn.fd))
                else:
                    raise LoadError(f"{what}: unknown program kind; fix: report this as a bug")
            except LoadError:
                raise
            except Exception as e:
                raise LoadError(f"{what}: {e}; fix: {family.fix}") from e
    finally:
        if root_fd is not None:
            os.close(root_fd)
    return out


def _loader_main(argv: list[str]) -> int:
    """``python -m sensor.kernel load FAMILY_JSON SOCKET_FD``: load, hand over the fds, exit.

    Exits with os._exit: bcc's atexit cleanup would detach and close what the parent now holds."""
    sock = socket.socket(fileno=int(argv[2]))
    try:
        family = Family.from_json(argv[1])
        named = _load_in_child(family)
        msg = {"ok": True, "names": [n for n, _ in named]}
        socket.send_fds(sock, [json.dumps(msg).encode()], [fd for _, fd in named])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        err = str(e) if isinstance(e, LoadError) else f"loader: {type(e).__name__}: {e}"
        sock.sendall(json.dumps({"ok": False, "error": err}).encode())
    sock.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "load":
        sys.exit(_loader_main(sys.argv[1:]))
    sys.exit("usage: python -m sensor.kernel load FAMILY_JSON SOCKET_FD (used by sensor.kernel.load)")
