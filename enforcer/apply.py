"""Apply a policy's egress rules to a workload's cgroups: all or nothing, pinned, audited.

:class:`Enforcer` is the seam the CLI and the daemon wire. It keeps one pinned
:class:`enforcer.egress.EgressProgram` per workload under ``<bpffs>/envelope/<workload>/`` and
the desired state under ``<state-dir>/enforce/<quoted workload key>.yaml`` (policy + mode), so a
daemon can attach the same programs to cgroups that appear later (:meth:`attach_new_cgroup`)
and a restarted daemon adopts what is pinned (:meth:`adopt_pinned`).

All or nothing. :meth:`Enforcer.apply` first validates and compiles the rules (a malformed
policy raises before anything is touched), then loads or adopts the program set, writes the new
rules as the inactive generation, attaches to every cgroup not yet attached, and only then
flips the active generation. If an attach fails, the cgroups attached in this call are
detached, the inactive generation is deleted, a set created in this call is unpinned, and the
previous rules, mode and attachments stay exactly as they were.

Exceptions (:mod:`enforcer.exceptions`) for egress keys are merged into the rules;
:meth:`sync` re-swaps the rules when an exception starts or lapses and follows mode changes
made with ``envelope mode``. Seccomp is not applied here: a filter is loaded by the process it
confines (``envelope exec``) or by the container runtime from the compiled OCI profile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, unquote

import structlog
import yaml

from sensor.store import atomic_write
from sensor.workload import BehaviourKeyError, Workload, parse_net_key

from . import audit
from .egress import (EgressError, EgressProgram, Limits, compile_rules, pin_dir_for, pinned_sets,
                     policy_hash)
from .policy import EgressRule, Policy, PolicyError, parse_entry, parse_policy
from .state import locked

log = structlog.get_logger(__name__)

MODES = ("observe", "alert", "enforce")


class ApplyError(Exception):
    """An apply that was rolled back; the message says which step and which cgroup failed."""


# ---- pure helpers ---------------------------------------------------------------------------


def exception_rules(exceptions: Iterable) -> list[EgressRule]:
    """Egress rules for active exceptions whose key is a network behaviour or an egress entry."""
    out: list[EgressRule] = []
    for e in exceptions:
        allow = e.allow
        if allow.startswith("egress:"):
            out.append(parse_entry(allow)[1])
            continue
        if not allow.startswith(("connect:", "send:")):
            continue
        try:
            net = parse_net_key(allow)
        except BehaviourKeyError:
            continue
        width = 32 if net.addr.version == 4 else 128
        out.append(EgressRule(net.proto, f"{net.addr.compressed}/{width}", (net.port,)))
    return out


def egress_mode(policy: Policy, mode: str) -> str:
    """A substrate the policy leaves out is not constrained: its programs only observe."""
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    return mode if "egress" in policy.substrates else "observe"


def effective_rules(policy: Policy, exceptions: Iterable = ()) -> list[EgressRule]:
    return list(policy.egress) + exception_rules(exceptions)


def desired_path(state_dir, workload: Workload) -> Path:
    return Path(state_dir) / "enforce" / (quote(workload.key, safe="") + ".yaml")


def read_desired(state_dir) -> list[tuple[Workload, Policy, str]]:
    """Every desired state under ``<state-dir>/enforce/*.yaml`` as (workload, policy, mode)."""
    d = Path(state_dir) / "enforce"
    out = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text())
            policy = parse_policy(yaml.safe_dump(doc["policy"]), str(p))
            out.append((Workload.parse(unquote(p.name[:-5])), policy, str(doc["mode"])))
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            log.warning("unreadable desired state", path=str(p), error=str(e))
    return out


@dataclass
class CgroupResult:
    cgroup: str
    ok: bool
    attached: bool = False  # newly attached by this call (False: was already attached)
    error: str = ""

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "ok": self.ok, "attached": self.attached, "error": self.error}


@dataclass
class Enforced:
    workload: Workload
    policy: Policy
    mode: str
    program: EgressProgram
    exceptions_sig: tuple = ()
    cgroups: set[str] = field(default_factory=set)


class Enforcer:
    """Per-workload pinned egress enforcement, wired from one config (state dir + bpffs)."""

    def __init__(self, state_dir, bpffs="/sys/fs/bpf", limits: Limits = Limits(),
                 clock=time.time, denials: bool = False):
        self.state_dir = Path(state_dir)
        self.bpffs = Path(bpffs)
        self.limits = limits
        self.clock = clock
        self.enforced: dict[str, Enforced] = {}
        self.want_denials = denials
        self._probe = None
        self._denial_cgroups: dict[int, str] = {}
        self._reader = None
        self._reader_fds: set[int] = set()
        self._pending: list = []
        self.decode_errors = 0

    # -- helpers --

    def _exceptions(self, workload: Workload) -> list:
        from .exceptions import active_exceptions
        return active_exceptions(self.state_dir, workload, self.clock())

    @staticmethod
    def _sig(excs) -> tuple:
        return tuple(sorted((e.id, e.allow) for e in excs))

    def _program(self, workload: Workload) -> tuple[EgressProgram, bool]:
        """The workload's program set: in memory, adopted from its pin, or freshly loaded."""
        cur = self.enforced.get(workload.key)
        if cur is not None:
            return cur.program, False
        pin = pin_dir_for(self.bpffs, workload.key)
        if pin.is_dir() and any(pin.iterdir()):
            return EgressProgram.adopt(pin, self.limits), False
        return EgressProgram.load(workload.key, pin, self.limits), True

    # -- the seam --

    def apply(self, policy: Policy, mode: str, cgroup_paths: Iterable[str | os.PathLike],
              reason: str = "apply") -> list[CgroupResult]:
        """Apply ``policy`` in ``mode`` to ``cgroup_paths``. All or nothing: on any failure the
        previous state is left in place and :class:`ApplyError` is raised (its ``results``
        attribute holds the per-cgroup outcome)."""
        if not isinstance(policy, Policy):
            raise PolicyError("apply needs a Policy")
        emode = egress_mode(policy, mode)
        workload = policy.workload
        excs = self._exceptions(workload)
        rules = effective_rules(policy, excs)
        compile_rules(rules, 0, self.limits)  # validate capacity and ports before touching anything
        paths = [str(p) for p in cgroup_paths]
        for p in paths:
            if not Path(p).is_dir():
                raise ApplyError(f"apply {workload}: cgroup {p} does not exist; nothing applied")

        prog, created = self._program(workload)
        results: list[CgroupResult] = []
        newly: list[str] = []
        try:
            for p in paths:
                try:
                    was_new = prog.attach(p)
                except EgressError as e:
                    results.append(CgroupResult(p, False, error=str(e)))
                    raise ApplyError(f"apply {workload}: {e}; rolled back, previous state kept") from e
                if was_new:
                    newly.append(p)
                results.append(CgroupResult(p, True, attached=was_new))
            # Rules swap last: a failure above leaves the active generation untouched, and
            # write_policy cleans its own inactive generation when it fails. The state lock
            # keeps a CLI apply and the daemon from swapping the same pinned set at once.
            with locked(self.state_dir):
                prog.write_policy(rules, emode, policy_hash(policy))
        except BaseException as e:
            for p in newly:
                try:
                    prog.detach(p)
                except EgressError as de:
                    log.error("rollback detach failed", cgroup=p, error=str(de))
            if created:
                prog.unpin()
                prog.close()
            elif workload.key not in self.enforced:
                prog.close()  # adopted for this call only; the pinned set keeps enforcing
            err = e if isinstance(e, ApplyError) else ApplyError(
                f"apply {workload}: {e}; rolled back, previous state kept")
            err.results = results  # type: ignore[attr-defined]
            if err is e:
                raise
            raise err from e

        prev = self.enforced.get(workload.key)
        cg = set(prev.cgroups) if prev else set(prog.cgroups().values())
        cg.update(paths)
        self.enforced[workload.key] = Enforced(workload, policy, mode, prog, self._sig(excs), cg)
        self._watch_denials(self.enforced[workload.key], paths)
        self._write_desired(policy, mode)
        audit.append(self.state_dir, "policy.apply", workload=workload.key, reason=reason,
                     details={"mode": mode, "egress_mode": emode,
                              "policy_sha256": policy_hash(policy).hex(),
                              "cgroups": paths, "attached": newly,
                              "egress_entries": len(rules),
                              "exceptions": [e.id for e in excs]})
        return results

    def _write_desired(self, policy: Policy, mode: str) -> None:
        doc = {"mode": mode, "policy": policy.to_dict()}
        atomic_write(desired_path(self.state_dir, policy.workload),
                     yaml.safe_dump(doc, sort_keys=True).encode())

    def attach_new_cgroup(self, workload: Workload | str, cgroup_path) -> CgroupResult:
        """Attach an enforced workload's programs to a cgroup that just appeared."""
        key = workload.key if isinstance(workload, Workload) else str(workload)
        cur = self.enforced.get(key)
        if cur is None:
            return CgroupResult(str(cgroup_path), False, error=f"workload {key} is not enforced")
        try:
            new = cur.program.attach(cgroup_path)
        except EgressError as e:
            log.error("attach to new cgroup failed", workload=key, cgroup=str(cgroup_path), error=str(e))
            return CgroupResult(str(cgroup_path), False, error=str(e))
        cur.cgroups.add(str(cgroup_path))
        self._watch_denials(cur, [str(cgroup_path)])
        return CgroupResult(str(cgroup_path), True, attached=new)

    def sync(self) -> list[str]:
        """Re-swap rules whose exceptions started or lapsed, follow mode changes, and forget
        vanished cgroups. Returns the workloads that changed."""
        from .state import read_state
        changed = []
        for key, cur in list(self.enforced.items()):
            excs = self._exceptions(cur.workload)
            sig = self._sig(excs)
            st = read_state(self.state_dir, cur.workload)
            mode = st["mode"] if st else cur.mode
            if sig != cur.exceptions_sig or mode != cur.mode:
                with locked(self.state_dir):
                    cur.program.write_policy(effective_rules(cur.policy, excs),
                                             egress_mode(cur.policy, mode), policy_hash(cur.policy))
                if sig != cur.exceptions_sig:
                    audit.append(self.state_dir, "exceptions.sync", workload=key,
                                 reason="exception started or lapsed",
                                 details={"exceptions": [e.id for e in excs]})
                cur.exceptions_sig = sig
                cur.mode = mode
                changed.append(key)
            for gone in cur.program.prune_cgroups():
                cur.cgroups.discard(gone)
        return changed

    sync_exceptions = sync

    def adopt_pinned(self) -> list[str]:
        """Adopt every pinned set (after a restart), pairing it with its desired state.

        Nothing is re-attached or reloaded: the pinned programs are already attached and keep
        enforcing; this only re-opens their maps so rules, mode and events are managed again.
        """
        desired = {w.key: (w, p, m) for w, p, m in read_desired(self.state_dir)}
        adopted = []
        for pin in pinned_sets(self.bpffs):
            if any(e.program.pin_dir == pin for e in self.enforced.values()):
                continue
            try:
                prog = EgressProgram.adopt(pin, self.limits)
            except EgressError as e:
                log.error("adopt failed", pin=str(pin), error=str(e))
                continue
            d = desired.get(prog.workload)
            if d is None:
                log.warning("pinned egress set without desired state; left as is",
                            workload=prog.workload, pin=str(pin))
                prog.close()
                continue
            w, policy, mode = d
            _gen, kmode = prog.state()
            excs = self._exceptions(w)
            self.enforced[w.key] = Enforced(w, policy, mode, prog, (), set(prog.cgroups().values()))
            self._watch_denials(self.enforced[w.key], sorted(self.enforced[w.key].cgroups))
            adopted.append(w.key)
            log.info("adopted pinned enforcement", workload=w.key, mode=kmode,
                     cgroups=len(self.enforced[w.key].cgroups), exceptions=len(excs))
        self.sync()
        return adopted

    def remove(self, workload: Workload | str, reason: str = "remove") -> bool:
        """Detach from every cgroup, unpin, forget the desired state (audited)."""
        key = workload.key if isinstance(workload, Workload) else str(workload)
        cur = self.enforced.pop(key, None)
        prog = cur.program if cur else None
        if prog is None:
            pin = pin_dir_for(self.bpffs, key)
            if pin.is_dir() and any(pin.iterdir()):
                prog = EgressProgram.adopt(pin, self.limits)
        if prog is None:
            return False
        self._reader_dirty()  # its ring buffer goes away with it
        for cid in [c for c, k in self._denial_cgroups.items() if k == key]:
            if self._probe is not None:
                self._probe.unwatch(cid)
            del self._denial_cgroups[cid]
        for p in (cur.cgroups if cur else ()):
            prog.detach(p)
        prog.remove()
        desired_path(self.state_dir, Workload.parse(key)).unlink(missing_ok=True)
        audit.append(self.state_dir, "policy.remove", workload=key, reason=reason, details={})
        return True

    # -- visibility: egress violations from the pinned ring buffers, seccomp denials --

    def _watch_denials(self, cur: Enforced, paths: Iterable[str]) -> None:
        """Report seccomp denials of the workload's cgroups (the runtime loaded the filter
        compiled from the same policy; its allowed set, runtime completeness included, is
        what alert mode compares against)."""
        if not self.want_denials or "syscall" not in cur.policy.substrates or cur.mode == "observe":
            return
        from .denials import DenialProbe, DenialProbeError
        from .exceptions import syscall_allowances
        from .runtime import default_runtime
        from .seccomp import DENY_ERRNO, compile_oci
        if self._probe is None:
            try:
                self._probe = DenialProbe()
            except DenialProbeError as e:
                log.error("seccomp denial probe unavailable; denials will not be reported", error=str(e))
                self.want_denials = False
                return
            self._reader_dirty()
        w = cur.workload
        compiled = compile_oci(cur.policy, cur.mode, runtime=default_runtime(w.kind, w.namespace),
                               extra_allow=syscall_allowances(self.state_dir, w, self.clock()))
        for p in paths:
            try:
                cid = os.stat(p).st_ino
            except OSError:
                continue
            self._probe.watch(cid, cur.mode, DENY_ERRNO, compiled.allowed())
            self._denial_cgroups[cid] = w.key

    def _reader_dirty(self) -> None:
        if self._reader is not None:
            self._reader.drain()
            self._reader.close()
        self._reader = None
        self._reader_fds = set()

    def _ensure_reader(self):
        from .egress import RingBufferReader
        if self._reader is None:
            self._reader = RingBufferReader()
        for key, cur in self.enforced.items():
            fd = cur.program.maps["events"].fd
            if fd in self._reader_fds:
                continue
            self._reader.add(fd, lambda raw, k=key: self._on_record(raw, lambda _cid: k))
            self._reader_fds.add(fd)
        if self._probe is not None and self._probe.events_fd not in self._reader_fds:
            self._reader.add(self._probe.events_fd,
                             lambda raw: self._on_record(raw, self._denial_cgroups.get))
            self._reader_fds.add(self._probe.events_fd)
        return self._reader

    def _on_record(self, raw: bytes, workload_of) -> None:
        from sensor.events import DecodeError
        from .violations import from_record
        v = from_record(raw, workload_of, self.clock())
        if isinstance(v, DecodeError):
            self.decode_errors += 1
        elif v is not None:
            self._pending.append(v)

    def poll_violations(self, timeout_ms: int = 0) -> list:
        """Violations that reached userspace since the last call (folded), waiting up to
        ``timeout_ms`` for the first."""
        from .violations import fold
        reader = self._ensure_reader()
        reader.poll(timeout_ms)
        reader.drain()
        out, self._pending = self._pending, []
        return fold(out)

    def record_violations(self, timeout_ms: int = 0) -> int:
        """:meth:`poll_violations` appended to ``<state-dir>/violations.jsonl``."""
        from .violations import ViolationStore
        vs = self.poll_violations(timeout_ms)
        return ViolationStore(self.state_dir).append(vs) if vs else 0

    def lost(self) -> dict[str, int]:
        """Violation events dropped in the kernel (ring buffer full), per workload."""
        out = {k: cur.program.lost() for k, cur in self.enforced.items()}
        if self._probe is not None:
            out["seccomp-denials"] = self._probe.lost()
        return out

    def workload_of_cgroup(self, cgroup_id: int) -> str | None:
        for key, cur in self.enforced.items():
            if cgroup_id in cur.program.cgroups():
                return key
        return None

    def close(self) -> None:
        """Close fds; pinned programs and their attachments keep enforcing."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for cur in self.enforced.values():
            cur.program.close()
        self.enforced = {}
        if self._probe is not None:
            self._probe.close()
            self._probe = None
