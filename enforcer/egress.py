"""Egress enforcement: load, pin, adopt, attach and atomically update ``bpf/egress.c``.

One :class:`EgressProgram` per workload. Its four cgroup ``sock_addr`` programs (connect4,
connect6, sendmsg4, sendmsg6) and its maps are pinned under
``<bpffs>/envelope/<workload-safe-name>/`` and attached with ``BPF_F_ALLOW_MULTI`` to each of the
workload's cgroups, so they coexist with the sensor's observation programs at the cgroup2 root
and outlive the process that loaded them (a cgroup attachment made with ``BPF_PROG_ATTACH``
holds its own reference to the program). A restarted process :meth:`EgressProgram.adopt`\\ s the
pinned set: it re-opens programs and maps by path and reads the workload and policy hash from the
pinned ``meta`` map; it never attaches a second copy (attachment is checked with
``BPF_PROG_QUERY``).

Rule updates are atomic: :meth:`EgressProgram.write_policy` writes the new rules as the inactive
generation, flips the single 32-bit state word (generation | mode << 8) and only then deletes the
old generation (see ``bpf/egress.c``).

The rule layout (:func:`compile_rules`) is pure and deterministic; everything touching the kernel
goes through the small libbpf seam :class:`Libbpf`.
"""

from __future__ import annotations

import ctypes as ct
import errno as _errno
import hashlib
import ipaddress
import os
import re
import select
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import structlog

log = structlog.get_logger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = BPF_DIR / "egress.c"

# enum bpf_attach_type (uapi/linux/bpf.h)
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_F_ALLOW_MULTI = 1 << 1
BPF_ANY = 0

PROGRAMS = {
    "connect4": BPF_CGROUP_INET4_CONNECT,
    "connect6": BPF_CGROUP_INET6_CONNECT,
    "sendmsg4": BPF_CGROUP_UDP4_SENDMSG,
    "sendmsg6": BPF_CGROUP_UDP6_SENDMSG,
}
MAPS = ("rules", "ports", "config", "meta", "cgroups", "lost", "events")

MODE_CODES = {"observe": 0, "alert": 1, "enforce": 2}
MODE_NAMES = {v: k for k, v in MODE_CODES.items()}
PROTO_NUMBERS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
OP_NAMES = {0: "connect", 1: "send"}
ACTION_NAMES = {0: "alerted", 1: "denied"}  # EGRESS_ACTION_* in bpf/events.h

FIXED_BITS = 32  # generation, protocol, family, pad precede the address in the trie key


@dataclass(frozen=True)
class Limits:
    """Map capacities; passed to the C file as ``-D`` flags."""

    max_rules: int = 32768  # trie entries, both generations together
    max_ports: int = 262144  # exact (rule, port) entries, both generations (allocated on use)
    max_ranges: int = 8  # port ranges per trie entry
    max_cgroups: int = 1024
    ringbuf_pages: int = 64

    def cflags(self) -> list[str]:
        return [f"-DEGRESS_MAX_RULES={self.max_rules}", f"-DEGRESS_MAX_PORTS={self.max_ports}",
                f"-DEGRESS_MAX_RANGES={self.max_ranges}", f"-DEGRESS_MAX_CGROUPS={self.max_cgroups}",
                f"-DEGRESS_RINGBUF_PAGES={self.ringbuf_pages}"]


class EgressError(Exception):
    """Loading, pinning, attaching or updating the egress programs failed; names what and where."""


# ---- pure: rule layout ------------------------------------------------------------------------

KEY = struct.Struct("=IBBBB16s")  # struct egress_key
PORT_KEY = struct.Struct("=IHH")  # struct egress_port_key
META = struct.Struct("=32s192sQII")  # struct egress_meta
CGROUP_REC = struct.Struct("=248sQ")  # struct egress_cgroup


def rule_struct(max_ranges: int) -> struct.Struct:
    """struct egress_rule: rule_id, any_port, nranges, pad, ranges[max_ranges] {lo, hi}."""
    return struct.Struct("=IBBH" + "HH" * max_ranges)


@dataclass
class PortSet:
    any_port: bool = False
    ranges: set[tuple[int, int]] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)

    def add(self, other: "PortSet") -> None:
        self.any_port |= other.any_port
        self.ranges |= other.ranges
        self.ports |= other.ports

    def normalised(self, max_ranges: int, what: str) -> tuple[bool, tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Merge overlapping ranges, drop ports inside ranges, expand small ranges if too many."""
        if self.any_port:
            return True, (), ()
        merged: list[list[int]] = []
        for lo, hi in sorted(self.ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if any(lo <= 1 and hi >= 65535 for lo, hi in merged):
            return True, (), ()
        ports = set(self.ports)
        while len(merged) > max_ranges:
            # Turn the narrowest range into exact ports until the rest fit.
            i = min(range(len(merged)), key=lambda j: (merged[j][1] - merged[j][0], merged[j][0]))
            lo, hi = merged.pop(i)
            if hi - lo > 1024:
                raise EgressError(f"{what}: more than {max_ranges} wide port ranges after merging")
            ports.update(range(lo, hi + 1))
        ranges = tuple((lo, hi) for lo, hi in merged)
        ports = {p for p in ports if not any(lo <= p <= hi for lo, hi in ranges)}
        return False, ranges, tuple(sorted(ports))


@dataclass(frozen=True)
class CompiledRules:
    """Map entries for one generation: trie (key, value) bytes and exact-port keys."""

    generation: int
    trie: tuple[tuple[bytes, bytes], ...]
    ports: tuple[bytes, ...]
    count: int  # number of CIDR entries per generation


def _net_of(rule) -> tuple[str, ipaddress._BaseNetwork, PortSet]:
    net = ipaddress.ip_network(rule.cidr, strict=False)
    ps = PortSet()
    if rule.port_range is not None:
        ps.ranges.add(tuple(rule.port_range))
    else:
        ps.ports.update(rule.ports)
    return rule.proto, net, ps


def compile_rules(rules: Iterable, generation: int, limits: Limits = Limits()) -> CompiledRules:
    """Lay out :class:`enforcer.policy.EgressRule`\\ s as map entries for ``generation`` (0 or 1).

    Each (proto, network) gets one trie entry whose port set also holds the ports of every
    shorter prefix that covers it, so the kernel's single longest-prefix match decides alone.
    Output is sorted and deterministic.
    """
    if generation not in (0, 1):
        raise ValueError(f"generation must be 0 or 1, got {generation}")
    table: dict[tuple[str, int, int, int], PortSet] = {}
    for r in rules:
        proto, net, ps = _net_of(r)
        if proto not in PROTO_NUMBERS:
            raise EgressError(f"egress rule {r}: protocol {proto!r} is not tcp or udp")
        k = (proto, net.version, int(net.network_address), net.prefixlen)
        table.setdefault(k, PortSet()).add(ps)
    # Fold covering prefixes in: for each entry look up every shorter prefix of itself.
    folded: dict[tuple[str, int, int, int], PortSet] = {}
    for (proto, ver, addr, plen), ps in table.items():
        total = PortSet()
        total.add(ps)
        width = 32 if ver == 4 else 128
        for shorter in range(plen):
            mask = ((1 << shorter) - 1) << (width - shorter) if shorter else 0
            anc = table.get((proto, ver, addr & mask, shorter))
            if anc is not None:
                total.add(anc)
        folded[(proto, ver, addr, plen)] = total
    if len(folded) * 2 > limits.max_rules:
        raise EgressError(f"{len(folded)} egress CIDR entries exceed the map capacity "
                          f"({limits.max_rules // 2} per generation; raise Limits.max_rules)")
    rs = rule_struct(limits.max_ranges)
    trie: list[tuple[bytes, bytes]] = []
    port_keys: list[bytes] = []
    for idx, k in enumerate(sorted(folded, key=lambda k: (k[0], k[1], k[3], k[2]))):
        proto, ver, addr, plen = k
        any_port, ranges, ports = folded[k].normalised(limits.max_ranges, f"{proto} {addr}/{plen}")
        rule_id = (generation << 24) | (idx + 1)
        raw = addr.to_bytes(4 if ver == 4 else 16, "big").ljust(16, b"\0")
        key = KEY.pack(FIXED_BITS + plen, generation, PROTO_NUMBERS[proto], ver, 0, raw)
        flat: list[int] = []
        for lo, hi in ranges:
            flat += [lo, hi]
        flat += [0, 0] * (limits.max_ranges - len(ranges))
        value = rs.pack(rule_id, 1 if any_port else 0, len(ranges), 0, *flat)
        trie.append((key, value))
        port_keys.extend(PORT_KEY.pack(rule_id, p, 0) for p in ports)
    if len(port_keys) * 2 > limits.max_ports:
        raise EgressError(f"{len(port_keys)} exact egress ports exceed the map capacity "
                          f"({limits.max_ports // 2} per generation; raise Limits.max_ports)")
    return CompiledRules(generation, tuple(trie), tuple(port_keys), len(folded))


def safe_name(workload_key: str) -> str:
    """A bpffs directory name for a workload key: readable, and unique through a hash suffix.

    bpffs refuses names containing a dot (EPERM), so only [A-Za-z0-9_-] are kept."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", workload_key.replace("/", "_"))[:80]
    return f"{slug}-{hashlib.sha256(workload_key.encode()).hexdigest()[:10]}"


def state_word(generation: int, mode: str) -> int:
    return (MODE_CODES[mode] << 8) | generation


def split_state_word(word: int) -> tuple[int, str]:
    return word & 0xFF, MODE_NAMES.get((word >> 8) & 0xFF, "observe")


# ---- libbpf seam --------------------------------------------------------------------------------


class Libbpf:
    """The few libbpf calls bcc's Python binding does not expose (pin, get, query, info)."""

    _lib = None

    @classmethod
    def lib(cls):
        if cls._lib is None:
            lib = ct.CDLL("libbpf.so.1", use_errno=True)
            lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
            lib.bpf_obj_pin.restype = ct.c_int
            lib.bpf_obj_get.argtypes = [ct.c_char_p]
            lib.bpf_obj_get.restype = ct.c_int
            lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
            lib.bpf_prog_attach.restype = ct.c_int
            lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
            lib.bpf_prog_detach2.restype = ct.c_int
            lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint, ct.POINTER(ct.c_uint),
                                           ct.POINTER(ct.c_uint), ct.POINTER(ct.c_uint)]
            lib.bpf_prog_query.restype = ct.c_int
            lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint)]
            lib.bpf_obj_get_info_by_fd.restype = ct.c_int
            lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong]
            lib.bpf_map_update_elem.restype = ct.c_int
            lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
            lib.bpf_map_lookup_elem.restype = ct.c_int
            lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
            lib.bpf_map_delete_elem.restype = ct.c_int
            lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
            lib.bpf_map_get_next_key.restype = ct.c_int
            cls._lib = lib
        return cls._lib

    @staticmethod
    def _err(res: int) -> int:
        # libbpf >= 1.0 returns -errno; older builds return -1 and set errno.
        return -res if res < -1 else (ct.get_errno() or _errno.EIO)

    @classmethod
    def pin(cls, fd: int, path: Path) -> None:
        res = cls.lib().bpf_obj_pin(fd, str(path).encode())
        if res < 0:
            e = cls._err(res)
            raise OSError(e, f"bpf_obj_pin {path}: {os.strerror(e)}")

    @classmethod
    def get(cls, path: Path) -> int:
        fd = cls.lib().bpf_obj_get(str(path).encode())
        if fd < 0:
            e = cls._err(fd)
            raise OSError(e, f"bpf_obj_get {path}: {os.strerror(e)}")
        return fd

    @classmethod
    def attach(cls, prog_fd: int, cgroup_fd: int, attach_type: int, flags: int) -> None:
        res = cls.lib().bpf_prog_attach(prog_fd, cgroup_fd, attach_type, flags)
        if res < 0:
            e = cls._err(res)
            raise OSError(e, os.strerror(e))

    @classmethod
    def detach(cls, prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
        res = cls.lib().bpf_prog_detach2(prog_fd, cgroup_fd, attach_type)
        if res < 0:
            e = cls._err(res)
            raise OSError(e, os.strerror(e))

    @classmethod
    def query(cls, cgroup_fd: int, attach_type: int) -> list[int]:
        """Ids of the programs attached directly to a cgroup for ``attach_type``."""
        ids = (ct.c_uint * 64)()
        cnt = ct.c_uint(64)
        flags = ct.c_uint(0)
        res = cls.lib().bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt))
        if res < 0:
            e = cls._err(res)
            raise OSError(e, f"bpf_prog_query: {os.strerror(e)}")
        return [ids[i] for i in range(cnt.value)]

    @classmethod
    def _info(cls, fd: int) -> bytes:
        """The raw ``bpf_obj_get_info_by_fd`` struct of a program or map fd."""
        buf = ct.create_string_buffer(256)
        ln = ct.c_uint(256)
        res = cls.lib().bpf_obj_get_info_by_fd(fd, buf, ct.byref(ln))
        if res < 0:
            e = cls._err(res)
            raise OSError(e, f"bpf_obj_get_info_by_fd: {os.strerror(e)}")
        return buf.raw

    @classmethod
    def info_id(cls, fd: int) -> int:
        """The kernel id of a program or map fd (``id`` is the second u32 of both info structs)."""
        return struct.unpack_from("=II", cls._info(fd))[1]

    @classmethod
    def map_info(cls, fd: int) -> dict:
        buf = cls._info(fd)
        typ, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", buf)
        return {"type": typ, "id": mid, "key_size": ks, "value_size": vs, "max_entries": me, "flags": fl}


class RawMap:
    """A BPF map addressed by fd with byte-string keys and values."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        info = Libbpf.map_info(fd)
        self.key_size = info["key_size"]
        self.value_size = info["value_size"]
        self.max_entries = info["max_entries"]
        self.map_type = info["type"]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        res = Libbpf.lib().bpf_map_update_elem(self.fd, key, value, flags)
        if res < 0:
            e = Libbpf._err(res)
            raise EgressError(f"map {self.name}: update: {os.strerror(e)}")

    def lookup(self, key: bytes) -> bytes | None:
        size = self.value_size
        if self.map_type in PERCPU_MAP_TYPES:  # one 8-byte aligned slot per possible CPU
            size = ((self.value_size + 7) // 8 * 8) * possible_cpus()
        buf = ct.create_string_buffer(size)
        res = Libbpf.lib().bpf_map_lookup_elem(self.fd, key, buf)
        if res < 0:
            e = Libbpf._err(res)
            if e == _errno.ENOENT:
                return None
            raise EgressError(f"map {self.name}: lookup: {os.strerror(e)}")
        return buf.raw

    def delete(self, key: bytes) -> bool:
        res = Libbpf.lib().bpf_map_delete_elem(self.fd, key)
        if res < 0:
            e = Libbpf._err(res)
            if e == _errno.ENOENT:
                return False
            raise EgressError(f"map {self.name}: delete: {os.strerror(e)}")
        return True

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        cur = None
        nxt = ct.create_string_buffer(self.key_size)
        while True:
            res = Libbpf.lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if res < 0:
                break
            out.append(nxt.raw)
            cur = ct.create_string_buffer(nxt.raw, self.key_size)
            if len(out) > 4 * max(self.max_entries, 1):
                raise EgressError(f"map {self.name}: key iteration does not terminate")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


PERCPU_MAP_TYPES = (5, 6, 10)  # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def percpu_sum(m: "RawMap", key: bytes) -> int:
    raw = m.lookup(key)
    if raw is None:
        return 0
    return sum(struct.unpack_from("=Q", raw, i * 8)[0] for i in range(len(raw) // 8))


def _open_cgroup(path: str | os.PathLike) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise EgressError(f"open cgroup {path}: {e.strerror}") from e


# ---- the program set ---------------------------------------------------------------------------


@dataclass
class AppliedRules:
    generation: int
    mode: str
    policy_hash: str
    workload: str
    rules: int
    applied_at: float


class EgressProgram:
    """The pinned (or, with ``pin_dir=None``, process-lifetime) program set of one workload."""

    def __init__(self, workload: str, prog_fds: dict[str, int], maps: dict[str, RawMap],
                 pin_dir: Path | None, limits: Limits, bpf=None):
        self.workload = workload
        self.prog_fds = prog_fds
        self.maps = maps
        self.pin_dir = pin_dir
        self.limits = limits
        self._bpf = bpf  # keeps a freshly compiled bcc module (and its fds) alive
        self.prog_ids = {name: Libbpf.info_id(fd) for name, fd in prog_fds.items()}

    # -- construction --

    @classmethod
    def load(cls, workload: str, pin_dir: Path | None = None, limits: Limits = Limits(),
             extra_cflags: Sequence[str] = ()) -> "EgressProgram":
        """Compile and load ``bpf/egress.c``; pin everything under ``pin_dir`` when given.

        The state starts as generation 0, observe mode, no rules: nothing is denied until
        :meth:`write_policy` runs, and nothing is attached until :meth:`attach`.
        """
        try:
            from bcc import BPF
        except ImportError as e:  # Debian's python3-bpfcc; see scripts/setup.sh
            raise EgressError("bcc is not importable (install python3-bpfcc)") from e
        if pin_dir is not None and pin_dir.exists() and any(pin_dir.iterdir()):
            raise EgressError(f"{pin_dir} already holds pinned objects; adopt or remove them first")
        cflags = [f"-I{BPF_DIR}"] + limits.cflags() + list(extra_cflags)
        try:
            bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise EgressError(f"compile {SOURCE}: {e}") from e
        prog_fds: dict[str, int] = {}
        maps: dict[str, RawMap] = {}
        try:
            for name, attach_type in PROGRAMS.items():
                fn = bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
                prog_fds[name] = os.dup(fn.fd)
            for name in MAPS:
                maps[name] = RawMap(os.dup(bpf.get_table(name.encode()).map_fd), name)
        except Exception as e:
            for fd in prog_fds.values():
                os.close(fd)
            for m in maps.values():
                m.close()
            bpf.cleanup()
            raise EgressError(f"load {SOURCE}: {e}") from e
        bpf.cleanup()  # our dup'ed fds keep the programs and maps alive
        prog = cls(workload, prog_fds, maps, pin_dir, limits)
        try:
            prog._write_meta(b"\0" * 32, 0)
            if pin_dir is not None:
                prog._pin_all()
        except Exception:
            prog.unpin()
            prog.close()
            raise
        log.info("egress programs loaded", workload=workload, pinned=str(pin_dir) if pin_dir else None)
        return prog

    @classmethod
    def adopt(cls, pin_dir: Path, limits: Limits = Limits()) -> "EgressProgram":
        """Re-open a pinned set by path. The workload name comes from the pinned ``meta`` map."""
        prog_fds: dict[str, int] = {}
        maps: dict[str, RawMap] = {}
        try:
            for name in PROGRAMS:
                prog_fds[name] = Libbpf.get(pin_dir / f"prog_{name}")
            for name in MAPS:
                maps[name] = RawMap(Libbpf.get(pin_dir / f"map_{name}"), name)
        except OSError as e:
            for fd in prog_fds.values():
                os.close(fd)
            for m in maps.values():
                m.close()
            raise EgressError(f"adopt {pin_dir}: {e.strerror or e}") from e
        rule_size = maps["rules"].value_size
        max_ranges = (rule_size - 8) // 4
        limits = Limits(max_rules=maps["rules"].max_entries, max_ports=maps["ports"].max_entries,
                        max_ranges=max_ranges, max_cgroups=maps["cgroups"].max_entries,
                        ringbuf_pages=limits.ringbuf_pages)
        raw = maps["meta"].lookup(struct.pack("=I", 0))
        _hash, wl, _ns, _rules, _gens = META.unpack(raw)
        workload = wl.rstrip(b"\0").decode()
        prog = cls(workload, prog_fds, maps, pin_dir, limits)
        log.info("egress programs adopted", workload=workload, pinned=str(pin_dir))
        return prog

    def _pin_all(self) -> None:
        assert self.pin_dir is not None
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in self.prog_fds.items():
            Libbpf.pin(fd, self.pin_dir / f"prog_{name}")
        for name, m in self.maps.items():
            Libbpf.pin(m.fd, self.pin_dir / f"map_{name}")

    def unpin(self) -> None:
        """Remove the pins (programs stay alive while attached or open)."""
        if self.pin_dir is None or not self.pin_dir.exists():
            return
        for p in self.pin_dir.iterdir():
            try:
                p.unlink()
            except OSError as e:
                log.warning("unpin failed", path=str(p), error=str(e))
        try:
            self.pin_dir.rmdir()
        except OSError as e:
            log.warning("remove pin dir failed", path=str(self.pin_dir), error=str(e))

    def close(self) -> None:
        for fd in self.prog_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.prog_fds = {}
        for m in self.maps.values():
            m.close()

    # -- state --

    def state(self) -> tuple[int, str]:
        raw = self.maps["config"].lookup(struct.pack("=I", 0))
        return split_state_word(struct.unpack("=I", raw)[0])

    def applied(self) -> AppliedRules:
        gen, mode = self.state()
        raw = self.maps["meta"].lookup(struct.pack("=I", 0))
        h, wl, ns, rules, _gens = META.unpack(raw)
        return AppliedRules(gen, mode, h.hex(), wl.rstrip(b"\0").decode(), rules, ns / 1e9)

    def _write_meta(self, policy_hash: bytes, rules: int) -> None:
        wl = self.workload.encode()[:191]
        self.maps["meta"].update(struct.pack("=I", 0),
                                 META.pack(policy_hash[:32].ljust(32, b"\0"), wl, time.time_ns(), rules, 0))

    def set_mode(self, mode: str) -> None:
        """Change the mode with one map update (no reload, no rule rewrite)."""
        if mode not in MODE_CODES:
            raise EgressError(f"unknown mode {mode!r}")
        gen, _ = self.state()
        self.maps["config"].update(struct.pack("=I", 0), struct.pack("=I", state_word(gen, mode)))

    def write_policy(self, rules: Iterable, mode: str, policy_hash: bytes = b"",
                     grace: float = 0.05) -> CompiledRules:
        """Swap in a new rule set (and mode) atomically.

        1. write every entry of the inactive generation (invisible to the programs);
        2. flip the state word (generation | mode) in one update;
        3. after ``grace`` seconds, delete the old generation's entries.
        A failure in step 1 deletes what it wrote and leaves the active rules in place.
        """
        if mode not in MODE_CODES:
            raise EgressError(f"unknown mode {mode!r}")
        active, _ = self.state()
        new = 1 - active
        # A previous swap may have died between steps 2 and 3: clear the inactive generation.
        self._delete_generation(new)
        compiled = compile_rules(rules, new, self.limits)
        try:
            for k, v in compiled.trie:
                self.maps["rules"].update(k, v)
            one = b"\x01"
            for pk in compiled.ports:
                self.maps["ports"].update(pk, one)
        except EgressError:
            self._delete_generation(new)
            raise
        self.maps["config"].update(struct.pack("=I", 0), struct.pack("=I", state_word(new, mode)))
        self._write_meta(policy_hash, compiled.count)
        if grace > 0:
            time.sleep(grace)  # let programs that read the old word finish their lookups
        self._delete_generation(active)
        log.info("egress rules swapped", workload=self.workload, generation=new, mode=mode,
                 entries=compiled.count, ports=len(compiled.ports))
        return compiled

    def _delete_generation(self, gen: int) -> None:
        rules = self.maps["rules"]
        for k in rules.keys():
            if k[4] == gen:
                rules.delete(k)
        ports = self.maps["ports"]
        for k in ports.keys():
            rule_id = struct.unpack_from("=I", k)[0]
            if rule_id >> 24 == gen:
                ports.delete(k)

    def rule_count(self, gen: int | None = None) -> int:
        return sum(1 for k in self.maps["rules"].keys() if gen is None or k[4] == gen)

    def lost(self) -> int:
        """Violation events dropped because the ring buffer was full (summed over CPUs)."""
        return percpu_sum(self.maps["lost"], struct.pack("=I", 0))

    # -- cgroups --

    def attach(self, cgroup_path: str | os.PathLike) -> bool:
        """Attach all four programs to a cgroup (BPF_F_ALLOW_MULTI). Returns False if they
        already were; on a partial failure detaches what it attached and raises."""
        fd = _open_cgroup(cgroup_path)
        done: list[tuple[str, int]] = []
        try:
            try:
                present = {n: self.prog_ids[n] in Libbpf.query(fd, t) for n, t in PROGRAMS.items()}
            except OSError as e:
                raise EgressError(f"{cgroup_path} is not a cgroup v2 directory "
                                  f"(BPF_PROG_QUERY: {e.strerror})") from e
            if all(present.values()):
                self._record_cgroup(cgroup_path, fd)
                return False
            for name, attach_type in PROGRAMS.items():
                if present[name]:
                    continue
                try:
                    Libbpf.attach(self.prog_fds[name], fd, attach_type, BPF_F_ALLOW_MULTI)
                except OSError as e:
                    raise EgressError(f"attach {name} to cgroup {cgroup_path}: {e.strerror}") from e
                done.append((name, attach_type))
            self._record_cgroup(cgroup_path, fd)
            log.info("egress programs attached", workload=self.workload, cgroup=str(cgroup_path))
            return True
        except Exception:
            for name, attach_type in done:
                try:
                    Libbpf.detach(self.prog_fds[name], fd, attach_type)
                except OSError:
                    pass
            raise
        finally:
            os.close(fd)

    def attached(self, cgroup_path: str | os.PathLike) -> bool:
        fd = _open_cgroup(cgroup_path)
        try:
            return all(self.prog_ids[n] in Libbpf.query(fd, t) for n, t in PROGRAMS.items())
        finally:
            os.close(fd)

    def detach(self, cgroup_path: str | os.PathLike) -> None:
        """Detach from a cgroup; a vanished cgroup (and with it the attachment) is not an error."""
        cid = None
        try:
            fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            raise EgressError(f"open cgroup {cgroup_path}: {e.strerror}") from e
        if fd >= 0:
            try:
                cid = os.fstat(fd).st_ino
                for name, attach_type in PROGRAMS.items():
                    if self.prog_ids[name] in Libbpf.query(fd, attach_type):
                        try:
                            Libbpf.detach(self.prog_fds[name], fd, attach_type)
                        except OSError as e:
                            raise EgressError(f"detach {name} from {cgroup_path}: {e.strerror}") from e
            finally:
                os.close(fd)
        for k, rec in self.cgroups().items():
            if rec == str(cgroup_path) or k == cid:
                self.maps["cgroups"].delete(struct.pack("=Q", k))
        log.info("egress programs detached", workload=self.workload, cgroup=str(cgroup_path))

    def _record_cgroup(self, cgroup_path, fd: int) -> None:
        cid = os.fstat(fd).st_ino
        path = str(cgroup_path).encode()
        if len(path) > 247:
            path = path[-247:]
        self.maps["cgroups"].update(struct.pack("=Q", cid), CGROUP_REC.pack(path, time.time_ns()))

    def cgroups(self) -> dict[int, str]:
        """cgroup id -> path of every cgroup this set was attached to (pruned of vanished ones
        by :meth:`prune_cgroups`)."""
        out: dict[int, str] = {}
        m = self.maps["cgroups"]
        for k in m.keys():
            raw = m.lookup(k)
            if raw is None:
                continue
            path, _ = CGROUP_REC.unpack(raw)
            out[struct.unpack("=Q", k)[0]] = path.rstrip(b"\0").decode(errors="replace")
        return out

    def prune_cgroups(self) -> list[str]:
        """Forget cgroups that no longer exist (their attachments went with them)."""
        gone = []
        for cid, path in self.cgroups().items():
            try:
                alive = os.stat(path).st_ino == cid
            except OSError:
                alive = False
            if not alive:
                self.maps["cgroups"].delete(struct.pack("=Q", cid))
                gone.append(path)
        return gone

    def detach_all(self) -> None:
        for _cid, path in self.cgroups().items():
            self.detach(path)

    def remove(self) -> None:
        """Detach from every recorded cgroup, unpin and close."""
        self.detach_all()
        self.unpin()
        self.close()


class RingBufferReader:
    """Drains any number of BPF ring buffers, given by fd (fresh or adopted from a pin).

    Each buffer is read through mmap by :class:`sensor.probes.RingBufferReader`, so draining
    needs no BCC (whose LLVM would add tens of MB to a long-lived daemon); one epoll waits on all
    of them. ``callback(raw: bytes)`` runs for each record; an exception in it is logged and
    counted in :attr:`callback_errors`, never raised out of :meth:`poll`.
    """

    def __init__(self):
        self._rings: list = []  # (mmap reader, guarded callback)
        self._epoll = select.epoll()
        self.callback_errors = 0

    def add(self, fd: int, callback) -> None:
        from sensor.probes import RingBufferReader as MmapRing

        def guarded(raw: bytes) -> None:
            try:
                callback(raw)
            except Exception as e:  # decoding problems are counted, not raised out of poll
                self.callback_errors += 1
                log.warning("ring buffer callback failed", error=repr(e))

        try:
            ring = MmapRing(fd, Libbpf.map_info(fd)["max_entries"])
            self._epoll.register(fd, select.EPOLLIN)
        except (OSError, ValueError) as e:
            raise EgressError(f"open ring buffer fd {fd}: {e}") from e
        self._rings.append((ring, guarded))

    def poll(self, timeout_ms: int = 100) -> None:
        """Consume what is there; if nothing was, wait up to ``timeout_ms`` for more."""
        if not self._rings:
            if timeout_ms > 0:
                time.sleep(timeout_ms / 1000)
            return
        if self.drain() == 0 and timeout_ms != 0:
            self._epoll.poll(timeout_ms / 1000 if timeout_ms > 0 else -1)
            self.drain()

    def drain(self) -> int:
        return sum(ring.consume(cb) for ring, cb in self._rings)

    def close(self) -> None:
        for ring, _ in self._rings:
            ring.close()
        self._rings = []
        self._epoll.close()


def pin_root(bpffs: str | os.PathLike) -> Path:
    return Path(bpffs) / "envelope"


def pin_dir_for(bpffs: str | os.PathLike, workload_key: str) -> Path:
    return pin_root(bpffs) / safe_name(workload_key)


def pinned_sets(bpffs: str | os.PathLike) -> list[Path]:
    """Directories under ``<bpffs>/envelope`` that hold a complete pinned egress set."""
    root = pin_root(bpffs)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and all((d / f"prog_{n}").exists() for n in PROGRAMS))


def policy_hash(policy) -> bytes:
    """sha256 of the policy's canonical JSON (the value recorded in the pinned meta map)."""
    from .policy import dump_policy
    return hashlib.sha256(dump_policy(policy, "json").encode()).digest()
