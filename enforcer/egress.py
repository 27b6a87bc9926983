"""Egress enforcement: load, pin, adopt, attach and atomically update ``bpf/egress.c``.

One :class:`EgressProgram` per workload. Its four cgroup ``sock_addr`` programs (connect4,
connect6, sendmsg4, sendmsg6), its cgroup ``skb`` ingress program that learns the addresses of
allowed names from DNS answers (dns_ingress), and its maps are pinned under
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
single 32-bit state word (generation | mode << 8 | names << 16) and only then deletes the old
generation and the learned addresses whose names the new rules no longer allow. Learned
addresses live in the pinned ``learned`` map, so a restarted daemon finds them where the
programs left them.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import structlog

from sensor import kernel
from sensor.kernel import BPF_F_ALLOW_MULTI, BpfError, Family, LoadError, Map, Program
from sensor.mirrors import (
    EGRESS_CGROUP_PATH_LEN, EGRESS_DNS_STATS, EGRESS_WORKLOAD_LEN, U32, U64, EgressCgroup,
    EgressLearned, EgressLearnedKey, EgressMeta,
)
from sensor.state_dir import PRIVATE_DIR, private_dirs, trusted_uids, untrusted

from .egress_rules import (
    MODE_CODES, PROTO_NAMES, CompiledRules, EgressRuleError, Limits, compile_rules,
    split_state_word, state_word,
)
from .names import NameRule

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "egress.c"
#: program name -> attach type
PROGRAMS = {**kernel.SOCK_ADDR_HOOKS, "dns_ingress": kernel.BPF_CGROUP_INET_INGRESS}
PROGRAM_KINDS = {name: "cgroup_skb" if name == "dns_ingress" else "cgroup_sock_addr"
                 for name in PROGRAMS}
#: the DNS answer program's later stages, reached by tail call through `dns_stages` (index)
STAGES = {"dns_name": 0, "dns_learn": 1}
TRIES = ("rules4_0", "rules4_1", "rules6_0", "rules6_1")
NAME_TRIES = ("names_0", "names_1")
MAPS = (*TRIES, "ports", *NAME_TRIES, "learned", "config", "meta", "cgroups", "lost",
        "dns_stats", "dns_stages", "events")
DNS_STATS = ("answers", "learned", "not_allowed", "truncated", "malformed", "learn_failed",
             "other_resolver")  # EGRESS_DNS_* in bpf/egress.h, by index
OP_NAMES = {0: "connect", 1: "send"}
ACTION_NAMES = {0: "alerted", 1: "denied"}  # EGRESS_ACTION_* in bpf/events.h
_ZERO = U32.pack(0)


class EgressError(Exception):
    """Loading, pinning, attaching or updating the egress programs failed; names what and where."""


def family(limits: Limits, extra_cflags: Sequence[str] = ()) -> Family:
    """``bpf/egress.c``: four sock_addr programs and the DNS answer program, loaded but not
    attached (they are attached to each cgroup of the workload), and their maps."""
    return Family("egress", str(SOURCE),
                  tuple([f"-I{kernel.BPF_DIR}", *limits.cflags(), *extra_cflags]),
                  tuple(Program(name, PROGRAM_KINDS[name], "", t) for name, t in PROGRAMS.items())
                  + tuple(Program(name, "cgroup_skb") for name in STAGES),
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
        stages = {n: loaded.programs.pop(n) for n in STAGES}
        try:
            maps = {name: Map(fd, name) for name, fd in loaded.maps.items()}
            for name, index in STAGES.items():  # the array holds them from now on
                maps["dns_stages"].update(U32.pack(index), U32.pack(stages[name]))
        except BpfError as e:
            loaded.close()
            raise EgressError(f"egress maps: {e}") from e
        finally:
            kernel.close_fds(stages.values())
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
        max_ranges = (maps["rules4_0"].value_size // 2 - 24) // 4
        limits = Limits(max_rules=maps["rules4_0"].max_entries, max_ports=maps["ports"].max_entries,
                        max_ranges=max_ranges, max_names=maps["names_0"].max_entries,
                        max_learned=maps["learned"].max_entries, dns_grace=limits.dns_grace,
                        dns_max_answers=limits.dns_max_answers,
                        max_cgroups=maps["cgroups"].max_entries,
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

    def _word(self) -> int:
        return U32.unpack(self.maps["config"].lookup(_ZERO))[0]

    def state(self) -> tuple[int, str]:
        return split_state_word(self._word())

    def names_active(self) -> bool:
        return bool(self._word() & (1 << 16))

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
        self.maps["config"].update(_ZERO, U32.pack(state_word(gen, mode, self.names_active())))

    def write_policy(self, rules: Iterable, mode: str, policy_hash: bytes = b"",
                     grace: float = 0.05, names: Iterable[NameRule] = (), *,
                     finish: bool = True) -> CompiledRules:
        """Swap in a new rule set, name set and mode atomically.

        1. write every entry of the inactive generation (invisible to the programs);
        2. flip the state word (generation | mode | names) in one update;
        3. after ``grace`` seconds, delete the old generation's entries and the learned
           addresses whose name entry the new generation no longer has (same pattern, ports
           and label limit keep them, re-labelled to the new entry).
        A failure in step 1 deletes what it wrote and leaves the active rules in place. With
        ``finish=False`` step 3 waits for :meth:`finish_swap`, and until then
        :meth:`revert_swap` puts the previous rules back with one flip (an apply whose audit
        entry could not be written is undone this way).
        """
        if mode not in MODE_CODES:
            raise EgressError(f"unknown mode {mode!r}")
        names = list(names)
        active, _ = self.state()
        new = 1 - active
        # A previous swap may have died between steps 2 and 3: clear the inactive generation.
        self._delete_generation(new)
        try:
            compiled = compile_rules(rules, new, self.limits, names)
        except EgressRuleError as e:
            raise EgressError(str(e)) from e
        old_names = self._name_values(active)
        try:
            for k, v in compiled.trie4:
                self.maps[f"rules4_{new}"].update(k, v)
            for k, v in compiled.trie6:
                self.maps[f"rules6_{new}"].update(k, v)
            one = b"\x01"
            for pk in compiled.ports:
                self.maps["ports"].update(pk, one)
            for k, v in compiled.names:
                self.maps[f"names_{new}"].update(k, v)
        except BpfError as e:
            self._delete_generation(new)
            raise EgressError(f"write rules for {self.workload}: {e}") from e
        old_word = self.maps["config"].lookup(_ZERO)
        old_meta = self.maps["meta"].lookup(_ZERO)
        self.maps["config"].update(_ZERO, U32.pack(state_word(new, mode, bool(compiled.names))))
        self._write_meta(policy_hash, compiled.count)
        self._swap = (active, new, old_word, old_meta, grace, old_names,
                      {k: v for k, v in compiled.names})
        if finish:
            self.finish_swap()
        log.info("egress rules swapped", workload=self.workload, generation=new, mode=mode,
                 entries=compiled.count, ports=len(compiled.ports), names=len(compiled.names))
        return compiled

    def _name_values(self, gen: int) -> dict[bytes, bytes]:
        return dict(self.maps[f"names_{gen}"].items())

    def _relabel_learned(self, old: dict[bytes, bytes], new: dict[bytes, bytes],
                         new_gen: int) -> None:
        """Learned entries of a name entry whose key, kind, label limit and ports are unchanged
        follow it to the new generation; the others go (their name is no longer allowed, or
        allows other ports). Entries the programs learned from the new generation stay."""
        def nid(v: bytes) -> int:
            return U32.unpack_from(v, len(v) - 8)[0]

        carry = {}
        for k, v in old.items():
            nv = new.get(k)
            if nv is not None and _ports_bytes(nv) == _ports_bytes(v) and nv[-4:] == v[-4:]:
                carry[nid(v)] = nid(nv)
        m = self.maps["learned"]
        for k, v in m.items():
            rec = EgressLearned.unpack(v)
            if rec["name_id"] >> 24 == new_gen:
                continue
            to = carry.get(rec["name_id"])
            if to is None:
                m.delete(k)
                continue
            rec["name_id"] = to
            try:
                m.update(k, EgressLearned.pack(**rec), kernel.BPF_EXIST)
            except BpfError:
                pass  # expired and evicted meanwhile

    def finish_swap(self) -> None:
        """Step 3 of :meth:`write_policy`: the old generation goes."""
        swap, self._swap = getattr(self, "_swap", None), None
        if swap is None:
            return
        old_gen, new_gen, _word, _meta, grace, old_names, new_names = swap
        if grace > 0:
            time.sleep(grace)  # let programs that read the old word finish their lookups
        self._relabel_learned(old_names, new_names, new_gen)
        self._delete_generation(old_gen)

    def revert_swap(self) -> None:
        """Undo an unfinished :meth:`write_policy`: the previous state word and meta back in
        one flip, then the new generation deleted."""
        swap, self._swap = getattr(self, "_swap", None), None
        if swap is None:
            return
        _old_gen, new_gen, word, meta, grace, _old_names, _new_names = swap
        self.maps["config"].update(_ZERO, word)
        if meta is not None:
            self.maps["meta"].update(_ZERO, meta)
        if grace > 0:
            time.sleep(grace)
        self._delete_generation(new_gen)
        learned = self.maps["learned"]  # what the reverted names taught goes with them
        for k, v in learned.items():
            if EgressLearned.unpack(v)["name_id"] >> 24 == new_gen:
                learned.delete(k)
        log.info("egress rules swap reverted", workload=self.workload)

    def repin(self) -> None:
        """Pin the set again after :meth:`unpin` (a removal that is being rolled back)."""
        if self.pin_dir is not None:
            self._pin_all()

    def _delete_generation(self, gen: int) -> None:
        for name in (f"rules4_{gen}", f"rules6_{gen}", f"names_{gen}"):
            m = self.maps[name]
            for k in m.keys():
                m.delete(k)
        ports = self.maps["ports"]
        for k in ports.keys():
            rule_id = U32.unpack_from(k)[0]
            if rule_id >> 24 == gen:
                ports.delete(k)

    def verify(self, rules: Iterable, mode: str, policy_hash: bytes = b"",
               names: Iterable[NameRule] = ()) -> list[str]:
        """What differs between the kernel's state and what ``rules`` and ``names`` in ``mode``
        should be: the state word's mode and names flag, the active generation's address, port
        and name entries, and stray entries of the inactive generation. Empty when intact.
        Someone who could open the pinned maps (a root process that reaches bpffs) can change
        them; the daemon checks and repairs. (Learned addresses are the programs' own writes and
        are not judged here.)"""
        problems = []
        gen, kmode = self.state()
        if kmode != mode:
            problems.append(f"mode is {kmode}, expected {mode}")
        try:
            compiled = compile_rules(rules, gen, self.limits, list(names))
        except EgressRuleError as e:
            return problems + [f"rules do not compile: {e}"]
        if self.names_active() != bool(compiled.names):
            problems.append(f"the state word says names are {'on' if self.names_active() else 'off'}")
        for what, have, want in (
                ("rules", dict(self.maps[f"rules4_{gen}"].items()) | dict(self.maps[f"rules6_{gen}"].items()),
                 dict(compiled.trie)),
                ("names", dict(self.maps[f"names_{gen}"].items()), dict(compiled.names))):
            extra = set(have) - set(want)
            missing = set(want) - set(have)
            changed = [k for k in set(have) & set(want) if have[k] != want[k]]
            if extra or missing or changed:
                problems.append(f"{what} of generation {gen}: {len(extra)} added, {len(missing)} "
                                f"removed, {len(changed)} changed")
        ports = {k for k in self.maps["ports"].keys() if U32.unpack_from(k)[0] >> 24 == gen}
        if ports != set(compiled.ports):
            problems.append(f"exact ports of generation {gen}: {len(ports - set(compiled.ports))} added, "
                            f"{len(set(compiled.ports) - ports)} removed")
        other = 1 - gen
        stray = sum(len(self.maps[f"{m}_{other}"].keys()) for m in ("rules4", "rules6", "names"))
        if stray:
            problems.append(f"{stray} entries in the inactive generation")
        if policy_hash and self.applied().policy_hash != policy_hash[:32].hex():
            problems.append("the recorded policy hash differs")
        return problems

    def rule_count(self, gen: int | None = None) -> int:
        gens = (0, 1) if gen is None else (gen,)
        return sum(len(self.maps[f"rules{v}_{g}"].keys()) for g in gens for v in (4, 6))

    def name_count(self, gen: int | None = None) -> int:
        gens = (0, 1) if gen is None else (gen,)
        return sum(len(self.maps[f"names_{g}"].keys()) for g in gens)

    def learned(self) -> list[dict]:
        """Every learned destination: cgroup, address, protocol, port (0: the ranges), the name
        entry id, TTL and expiry (CLOCK_MONOTONIC seconds)."""
        import ipaddress
        out = []
        for k, v in self.maps["learned"].items():
            key, val = EgressLearnedKey.unpack(k), EgressLearned.unpack(v)
            raw = key["addr"]
            addr = ipaddress.IPv4Address(raw[:4]) if key["family"] == 4 else ipaddress.IPv6Address(raw)
            out.append({"cgroup_id": key["cgroup_id"], "addr": addr.compressed,
                        "proto": PROTO_NAMES.get(key["proto"], str(key["proto"])),
                        "port": key["port"], "name_id": val["name_id"], "ttl": val["ttl"],
                        "learned": val["learned_ns"] / 1e9, "expires": val["expires_ns"] / 1e9})
        return sorted(out, key=lambda d: (d["cgroup_id"], d["addr"], d["proto"], d["port"]))

    def dns_stats(self) -> dict[str, int]:
        """What the DNS answer program did, summed over CPUs (see EGRESS_DNS_* in egress.h)."""
        m = self.maps["dns_stats"]
        return {name: m.percpu_sum(U32.pack(i)) for i, name in enumerate(DNS_STATS)
                if i < EGRESS_DNS_STATS}

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



def _ports_bytes(name_rule_value: bytes) -> bytes:
    """The port sets of a packed struct egress_name_rule, rule ids left out."""
    half = (len(name_rule_value) - 8) // 2
    return name_rule_value[4:half] + name_rule_value[half + 4:2 * half]


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
