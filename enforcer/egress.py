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

The programs are compiled by the loader child of :mod:`sensor.kernel` (no LLVM in this
process); the rule layout is the pure :mod:`enforcer.egress_rules`. Rule updates are atomic:
:meth:`EgressProgram.write_policy` writes the new rules as the inactive generation, flips the
single 32-bit state word (generation | mode << 8) and only then deletes the old generation.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import structlog

from sensor import kernel
from sensor.kernel import BPF_F_ALLOW_MULTI, BpfError, Family, LoadError, Map, Program
from sensor.mirrors import EGRESS_CGROUP_PATH_LEN, EGRESS_WORKLOAD_LEN, U32, U64, EgressCgroup, EgressMeta
from sensor.state_dir import PRIVATE_DIR, private_dirs, trusted_uids, untrusted

from .egress_rules import (
    MODE_CODES, CompiledRules, EgressRuleError, Limits, compile_rules, split_state_word,
    state_word,
)

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "egress.c"
PROGRAMS = dict(kernel.SOCK_ADDR_HOOKS)  # program name -> attach type
MAPS = ("rules", "ports", "config", "meta", "cgroups", "lost", "events")
OP_NAMES = {0: "connect", 1: "send"}
ACTION_NAMES = {0: "alerted", 1: "denied"}  # EGRESS_ACTION_* in bpf/events.h
_ZERO = U32.pack(0)


class EgressError(Exception):
    """Loading, pinning, attaching or updating the egress programs failed; names what and where."""


def family(limits: Limits, extra_cflags: Sequence[str] = ()) -> Family:
    """``bpf/egress.c``: four sock_addr programs loaded but not attached (they are attached to
    each cgroup of the workload), and their maps."""
    return Family("egress", str(SOURCE),
                  tuple([f"-I{kernel.BPF_DIR}", *limits.cflags(), *extra_cflags]),
                  tuple(Program(name, "cgroup_sock_addr", "", t) for name, t in PROGRAMS.items()),
                  MAPS, fix="needs CONFIG_CGROUP_BPF and cgroup v2; run `envelope doctor`")


def safe_name(workload_key: str) -> str:
    """A bpffs directory name for a workload key: at most 97 bytes whatever the key, readable,
    and unique through the first 64 bits of the key's SHA-256.

    bpffs refuses names containing a dot (EPERM), so only [A-Za-z0-9_-] are kept."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", workload_key.replace("/", "_"))[:80]
    return f"{slug}-{hashlib.sha256(workload_key.encode()).hexdigest()[:16]}"


def make_pin_dir(pin_dir: Path) -> None:
    """``<bpffs>/envelope/<name>/``, 0700 like ``<bpffs>/envelope`` itself, whatever the umask:
    nobody but root may unlink a pin or open a map by path (the pins themselves are 0600)."""
    private_dirs(pin_dir)
    for d in (pin_dir.parent, pin_dir):
        st = os.lstat(d)
        if st.st_uid not in trusted_uids():
            raise EgressError(f"{d}: owned by uid {st.st_uid}, not root; refusing to pin there")
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
            os.chmod(d, PRIVATE_DIR)


def check_pins(pin_dir: Path) -> None:
    """Refuse (:class:`EgressError`) a pinned set that anyone but root could have changed: the
    directory and every pin must be root's and writable by nobody else."""
    for p in [pin_dir.parent, pin_dir, *sorted(pin_dir.iterdir())]:
        st = os.lstat(p)
        why = untrusted(st, directory=stat.S_ISDIR(st.st_mode))
        if why:
            raise EgressError(f"{p}: {why}; refusing the pinned set (fix: chown root, chmod go-w, "
                              f"then check its rules)")


def _open_cgroup(path: str | os.PathLike) -> int:
    try:
        return kernel.open_cgroup(path)
    except OSError as e:
        raise EgressError(f"open cgroup {path}: {os.strerror(e.errno or 0)}") from e


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

    def __init__(self, workload: str, prog_fds: dict[str, int], maps: dict[str, Map],
                 pin_dir: Path | None, limits: Limits):
        self.workload = workload
        self.prog_fds = prog_fds
        self.maps = maps
        self.pin_dir = pin_dir
        self.limits = limits
        self.prog_ids = {name: kernel.obj_id(fd) for name, fd in prog_fds.items()}
        self._swap = None  # an unfinished write_policy (see finish_swap, revert_swap)

    @property
    def events_fd(self) -> int:
        return self.maps["events"].fd

    # -- construction --

    @classmethod
    def load(cls, workload: str, pin_dir: Path | None = None, limits: Limits = Limits(),
             extra_cflags: Sequence[str] = ()) -> "EgressProgram":
        """Compile and load ``bpf/egress.c``; pin everything under ``pin_dir`` when given.

        The state starts as generation 0, observe mode, no rules: nothing is denied until
        :meth:`write_policy` runs, and nothing is attached until :meth:`attach`.
        """
        if pin_dir is not None and pin_dir.exists() and any(pin_dir.iterdir()):
            raise EgressError(f"{pin_dir} already holds pinned objects; adopt or remove them first")
        try:
            loaded = kernel.load(family(limits, extra_cflags))
        except LoadError as e:
            raise EgressError(str(e)) from e
        try:
            maps = {name: Map(fd, name) for name, fd in loaded.maps.items()}
        except BpfError as e:
            loaded.close()
            raise EgressError(f"egress maps: {e}") from e
        prog = cls(workload, dict(loaded.programs), maps, pin_dir, limits)
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
        maps: dict[str, Map] = {}
        try:
            check_pins(pin_dir)
        except OSError as e:
            raise EgressError(f"adopt {pin_dir}: {e.strerror or e}") from e
        try:
            for name in PROGRAMS:
                prog_fds[name] = kernel.obj_get(pin_dir / f"prog_{name}")
            for name in MAPS:
                maps[name] = Map(kernel.obj_get(pin_dir / f"map_{name}"), name)
        except OSError as e:
            kernel.close_fds(prog_fds.values())
            for m in maps.values():
                m.close()
            raise EgressError(f"adopt {pin_dir}: {e.strerror or e}") from e
        max_ranges = (maps["rules"].value_size - 8) // 4
        limits = Limits(max_rules=maps["rules"].max_entries, max_ports=maps["ports"].max_entries,
                        max_ranges=max_ranges, max_cgroups=maps["cgroups"].max_entries,
                        ringbuf_pages=maps["events"].max_entries // kernel.PAGE_SIZE)
        meta = EgressMeta.unpack(maps["meta"].lookup(_ZERO))
        workload = meta["workload"].rstrip(b"\0").decode()
        prog = cls(workload, prog_fds, maps, pin_dir, limits)
        log.info("egress programs adopted", workload=workload, pinned=str(pin_dir))
        return prog

    def _pin_all(self) -> None:
        assert self.pin_dir is not None
        make_pin_dir(self.pin_dir)
        for name, fd in self.prog_fds.items():
            kernel.obj_pin(fd, self.pin_dir / f"prog_{name}")
        for name, m in self.maps.items():
            kernel.obj_pin(m.fd, self.pin_dir / f"map_{name}")

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
        return split_state_word(U32.unpack(self.maps["config"].lookup(_ZERO))[0])

    def applied(self) -> AppliedRules:
        gen, mode = self.state()
        meta = EgressMeta.unpack(self.maps["meta"].lookup(_ZERO))
        return AppliedRules(gen, mode, meta["policy_hash"].hex(),
                            meta["workload"].rstrip(b"\0").decode(), meta["rules"],
                            meta["applied_ns"] / 1e9)

    def _write_meta(self, policy_hash: bytes, rules: int) -> None:
        self.maps["meta"].update(_ZERO, EgressMeta.pack(
            policy_hash=policy_hash[:32].ljust(32, b"\0"),
            workload=self.workload.encode()[:EGRESS_WORKLOAD_LEN - 1],
            applied_ns=time.time_ns(), rules=rules))

    def set_mode(self, mode: str) -> None:
        """Change the mode with one map update (no reload, no rule rewrite)."""
        if mode not in MODE_CODES:
            raise EgressError(f"unknown mode {mode!r}")
        gen, _ = self.state()
        self.maps["config"].update(_ZERO, U32.pack(state_word(gen, mode)))

    def write_policy(self, rules: Iterable, mode: str, policy_hash: bytes = b"",
                     grace: float = 0.05, *, finish: bool = True) -> CompiledRules:
        """Swap in a new rule set (and mode) atomically.

        1. write every entry of the inactive generation (invisible to the programs);
        2. flip the state word (generation | mode) in one update;
        3. after ``grace`` seconds, delete the old generation's entries.
        A failure in step 1 deletes what it wrote and leaves the active rules in place. With
        ``finish=False`` step 3 waits for :meth:`finish_swap`, and until then
        :meth:`revert_swap` puts the previous rules back with one flip (an apply whose audit
        entry could not be written is undone this way).
        """
        if mode not in MODE_CODES:
            raise EgressError(f"unknown mode {mode!r}")
        active, _ = self.state()
        new = 1 - active
        # A previous swap may have died between steps 2 and 3: clear the inactive generation.
        self._delete_generation(new)
        try:
            compiled = compile_rules(rules, new, self.limits)
        except EgressRuleError as e:
            raise EgressError(str(e)) from e
        try:
            for k, v in compiled.trie:
                self.maps["rules"].update(k, v)
            one = b"\x01"
            for pk in compiled.ports:
                self.maps["ports"].update(pk, one)
        except BpfError as e:
            self._delete_generation(new)
            raise EgressError(f"write rules for {self.workload}: {e}") from e
        old_word = self.maps["config"].lookup(_ZERO)
        old_meta = self.maps["meta"].lookup(_ZERO)
        self.maps["config"].update(_ZERO, U32.pack(state_word(new, mode)))
        self._write_meta(policy_hash, compiled.count)
        self._swap = (active, new, old_word, old_meta, grace)
        if finish:
            self.finish_swap()
        log.info("egress rules swapped", workload=self.workload, generation=new, mode=mode,
                 entries=compiled.count, ports=len(compiled.ports))
        return compiled

    def finish_swap(self) -> None:
        """Step 3 of :meth:`write_policy`: the old generation goes."""
        swap, self._swap = getattr(self, "_swap", None), None
        if swap is None:
            return
        old_gen, _new, _word, _meta, grace = swap
        if grace > 0:
            time.sleep(grace)  # let programs that read the old word finish their lookups
        self._delete_generation(old_gen)

    def revert_swap(self) -> None:
        """Undo an unfinished :meth:`write_policy`: the previous state word and meta back in
        one flip, then the new generation deleted."""
        swap, self._swap = getattr(self, "_swap", None), None
        if swap is None:
            return
        _old_gen, new_gen, word, meta, grace = swap
        self.maps["config"].update(_ZERO, word)
        if meta is not None:
            self.maps["meta"].update(_ZERO, meta)
        if grace > 0:
            time.sleep(grace)
        self._delete_generation(new_gen)
        log.info("egress rules swap reverted", workload=self.workload)

    def repin(self) -> None:
        """Pin the set again after :meth:`unpin` (a removal that is being rolled back)."""
        if self.pin_dir is not None:
            self._pin_all()

    def _delete_generation(self, gen: int) -> None:
        rules = self.maps["rules"]
        for k in rules.keys():
            if k[4] == gen:
                rules.delete(k)
        ports = self.maps["ports"]
        for k in ports.keys():
            rule_id = U32.unpack_from(k)[0]
            if rule_id >> 24 == gen:
                ports.delete(k)

    def verify(self, rules: Iterable, mode: str, policy_hash: bytes = b"") -> list[str]:
        """What differs between the kernel's state and what ``rules`` in ``mode`` should be: the
        state word's mode, the active generation's trie and port entries, and stray entries of
        the inactive generation. Empty when intact. Someone who could open the pinned maps (a
        root process that reaches bpffs) can change them; the daemon checks and repairs."""
        problems = []
        gen, kmode = self.state()
        if kmode != mode:
            problems.append(f"mode is {kmode}, expected {mode}")
        try:
            compiled = compile_rules(rules, gen, self.limits)
        except EgressRuleError as e:
            return problems + [f"rules do not compile: {e}"]
        have = {k: v for k, v in self.maps["rules"].items() if k[4] == gen}
        want = dict(compiled.trie)
        extra = sorted(set(have) - set(want))
        missing = sorted(set(want) - set(have))
        changed = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        if extra or missing or changed:
            problems.append(f"rules of generation {gen}: {len(extra)} added, {len(missing)} removed, "
                            f"{len(changed)} changed")
        ports = {k for k in self.maps["ports"].keys() if U32.unpack_from(k)[0] >> 24 == gen}
        if ports != set(compiled.ports):
            problems.append(f"exact ports of generation {gen}: {len(ports - set(compiled.ports))} added, "
                            f"{len(set(compiled.ports) - ports)} removed")
        stray = sum(1 for k in self.maps["rules"].keys() if k[4] != gen)
        if stray:
            problems.append(f"{stray} entries in the inactive generation")
        if policy_hash and self.applied().policy_hash != policy_hash[:32].hex():
            problems.append("the recorded policy hash differs")
        return problems

    def rule_count(self, gen: int | None = None) -> int:
        return sum(1 for k in self.maps["rules"].keys() if gen is None or k[4] == gen)

    def lost(self) -> int:
        """Violation events dropped because the ring buffer was full (summed over CPUs)."""
        return self.maps["lost"].percpu_sum(_ZERO)

    # -- cgroups --

    def attach(self, cgroup_path: str | os.PathLike) -> bool:
        """Attach all four programs to a cgroup (BPF_F_ALLOW_MULTI). Returns False if they
        already were; on a partial failure detaches what it attached and raises."""
        fd = _open_cgroup(cgroup_path)
        done: list[tuple[str, int]] = []
        try:
            try:
                present = {n: self.prog_ids[n] in kernel.prog_query(fd, t) for n, t in PROGRAMS.items()}
            except OSError as e:
                raise EgressError(f"{cgroup_path} is not a cgroup v2 directory "
                                  f"(BPF_PROG_QUERY: {os.strerror(e.errno or 0)})") from e
            if all(present.values()):
                self._record_cgroup(cgroup_path, fd)
                return False
            for name, attach_type in PROGRAMS.items():
                if present[name]:
                    continue
                try:
                    kernel.prog_attach(self.prog_fds[name], fd, attach_type, BPF_F_ALLOW_MULTI)
                except OSError as e:
                    raise EgressError(f"attach {name} to cgroup {cgroup_path}: {os.strerror(e.errno or 0)}") from e
                done.append((name, attach_type))
            self._record_cgroup(cgroup_path, fd)
            log.info("egress programs attached", workload=self.workload, cgroup=str(cgroup_path))
            return True
        except Exception:
            for name, attach_type in done:
                try:
                    kernel.prog_detach(self.prog_fds[name], fd, attach_type)
                except OSError:
                    pass
            raise
        finally:
            os.close(fd)

    def attached(self, cgroup_path: str | os.PathLike) -> bool:
        fd = _open_cgroup(cgroup_path)
        try:
            return all(self.prog_ids[n] in kernel.prog_query(fd, t) for n, t in PROGRAMS.items())
        finally:
            os.close(fd)

    def detach(self, cgroup_path: str | os.PathLike) -> None:
        """Detach from a cgroup; a vanished cgroup (and with it the attachment) is not an error."""
        cid = None
        try:
            fd = kernel.open_cgroup(cgroup_path)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            raise EgressError(f"open cgroup {cgroup_path}: {os.strerror(e.errno or 0)}") from e
        if fd >= 0:
            try:
                cid = os.fstat(fd).st_ino
                for name, attach_type in PROGRAMS.items():
                    if self.prog_ids[name] in kernel.prog_query(fd, attach_type):
                        try:
                            kernel.prog_detach(self.prog_fds[name], fd, attach_type)
                        except OSError as e:
                            raise EgressError(f"detach {name} from {cgroup_path}: {os.strerror(e.errno or 0)}") from e
            finally:
                os.close(fd)
        for k, rec in self.cgroups().items():
            if rec == str(cgroup_path) or k == cid:
                self.maps["cgroups"].delete(U64.pack(k))
        log.info("egress programs detached", workload=self.workload, cgroup=str(cgroup_path))

    def _record_cgroup(self, cgroup_path, fd: int) -> None:
        cid = os.fstat(fd).st_ino
        path = str(cgroup_path).encode()[-(EGRESS_CGROUP_PATH_LEN - 1):]
        self.maps["cgroups"].update(U64.pack(cid), EgressCgroup.pack(path=path,
                                                                     attached_ns=time.time_ns()))

    def cgroups(self) -> dict[int, str]:
        """cgroup id -> path of every cgroup this set was attached to (pruned of vanished ones
        by :meth:`prune_cgroups`)."""
        out: dict[int, str] = {}
        m = self.maps["cgroups"]
        for k in m.keys():
            raw = m.lookup(k)
            if raw is None:
                continue
            path = EgressCgroup.unpack(raw)["path"]
            out[U64.unpack(k)[0]] = path.rstrip(b"\0").decode(errors="replace")
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
                self.maps["cgroups"].delete(U64.pack(cid))
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



def pin_root(bpffs: str | os.PathLike) -> Path:
    return Path(bpffs) / "envelope"


def pin_dir_for(bpffs: str | os.PathLike, workload_key: str) -> Path:
    return pin_root(bpffs) / safe_name(workload_key)


def existing_pin_dir(bpffs: str | os.PathLike, workload_key: str) -> Path:
    """Where ``workload_key``'s pinned set is: its directory, or the one an earlier version named
    with a 40-bit digest when only that exists (so a set pinned before is adopted, never
    doubled by a second one)."""
    pin = pin_dir_for(bpffs, workload_key)
    if pin.is_dir():
        return pin
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", workload_key.replace("/", "_"))[:80]
    legacy = pin_root(bpffs) / f"{slug}-{hashlib.sha256(workload_key.encode()).hexdigest()[:10]}"
    return legacy if legacy.is_dir() else pin


def pinned_sets(bpffs: str | os.PathLike) -> list[Path]:
    """Directories under ``<bpffs>/envelope`` that hold a complete pinned egress set."""
    root = pin_root(bpffs)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and all((d / f"prog_{n}").exists() for n in PROGRAMS))
