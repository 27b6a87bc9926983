"""The enforcement session: apply policies to workloads' cgroups, all or nothing, and report
what the kernel denied or alerted on.

One :class:`EnforcementSession` is what ``envelope exec`` (not pinned: everything lives as long
as the command), ``envelope enforce``, the daemon and the cluster sync (pinned) drive. Per
workload it holds one egress program set (:class:`enforcer.egress.EgressProgram`) attached to
each of the workload's cgroups, and it watches those cgroups for seccomp denials (one shared
:class:`enforcer.denials.DenialProbe`) and, where the policy is enforced with Landlock (exec and
file entries), for Landlock's refusals (one shared :class:`enforcer.file_denials.FileDenialProbe`).
Violations come out of one place, :meth:`EnforcementSession.poll_violations`.

Pinned sessions keep each workload's programs under ``<bpffs>/envelope/<workload>/`` and its
desired state (policy + mode, :mod:`enforcer.desired`), so a daemon attaches the same programs
to cgroups that appear later (:meth:`attach_new_cgroup`) and a restarted one adopts what is
pinned (:meth:`adopt_pinned`) with no allow-all window.

All or nothing. :meth:`apply` validates and compiles the rules first (a malformed policy raises
before anything is touched), loads or adopts the program set, attaches to every cgroup not yet
attached, and only then swaps the rules in (inactive generation written, one state-word flip).
If an attach or the swap fails, the cgroups attached in this call are detached, a set created in
this call is unpinned, and the previous rules, mode and attachments stay exactly as they were.

The kernel is reached only through a :class:`KernelBackend`; tests hand the session an
in-memory one (``tests/fakes/kernel.py``) to check the all-or-nothing and rollback logic
without root, and the privileged tests use :class:`RealKernel`.

Exceptions (:mod:`enforcer.exceptions`) for egress keys are merged into the rules;
:meth:`sync` re-swaps the rules when an exception starts or lapses and follows mode changes
made with ``envelope mode``. Seccomp filters are loaded by the process they confine (``envelope
exec``'s child) or by the container runtime from the compiled profile; the session only makes
their denials visible.

The http substrate is judged by the request capture's probe (:mod:`enforcer.http_enforce`, handed
in as ``http``): an apply writes the policy's request rule graph (exceptions included) and points
the workload's cgroups at it, in the same all-or-nothing step; its violations come out of the same
:meth:`EnforcementSession.poll_violations`. Without a capture, a policy that encodes http can be
applied in observe mode only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import structlog

from sensor.state_dir import atomic_write

from . import audit
from .desired import desired_path, read_desired, write_desired
from .egress import EgressError, EgressProgram, existing_pin_dir, pin_dir_for, pinned_sets
from .egress_rules import (
    EgressRuleError, Limits, compile_rules, effective_names, effective_rules, egress_mode,
)
from .policy import Policy, PolicyError, policy_hash
from .state import locked

log = structlog.get_logger(__name__)

#: How often the kernel's seccomp denial totals are read, and how long an idle key is kept.
COUNTS_INTERVAL = 0.1
DENIAL_IDLE = 30.0
#: First sightings kept for naming the denials the kernel counts (the counts map holds as many).
DENIAL_CONTEXTS = 16384


class ApplyError(Exception):
    """An apply that was rolled back; the message says which step and which cgroup failed."""

    results: list = []


# ---- the kernel seam ------------------------------------------------------------------------


class KernelBackend(Protocol):
    """What the session needs from the kernel."""

    def load_egress(self, workload: str, pin_dir: Path | None, limits: Limits) -> EgressProgram: ...

    def adopt_egress(self, pin_dir: Path, limits: Limits) -> EgressProgram: ...

    def pinned_egress(self, bpffs: Path) -> list[Path]: ...

    def denial_probe(self): ...

    def file_denial_probe(self): ...

    def ring_reader(self): ...

    def move_task(self, pid: int, cgroup_path: str) -> None: ...

    def kill_task(self, pid: int) -> None: ...


class RealKernel:
    """The kernel itself: :mod:`enforcer.egress`, :mod:`enforcer.denials`, :mod:`sensor.kernel`."""

    def load_egress(self, workload: str, pin_dir: Path | None, limits: Limits) -> EgressProgram:
        return EgressProgram.load(workload, pin_dir, limits)

    def adopt_egress(self, pin_dir: Path, limits: Limits) -> EgressProgram:
        return EgressProgram.adopt(pin_dir, limits)

    def pinned_egress(self, bpffs: Path) -> list[Path]:
        return pinned_sets(bpffs)

    def denial_probe(self):
        from .denials import DenialProbe
        return DenialProbe()

    def file_denial_probe(self):
        from .file_denials import FileDenialProbe
        return FileDenialProbe()

    def ring_reader(self):
        from sensor.kernel import RingReader
        return RingReader()

    def move_task(self, pid: int, cgroup_path: str) -> None:
        """Move task ``pid`` into the cgroup at ``cgroup_path`` (raises OSError)."""
        with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def kill_task(self, pid: int) -> None:
        """SIGKILL task ``pid`` through a pidfd (raises OSError)."""
        import signal
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


# ---- results ----------------------------------------------------------------------------------


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
    workload: "Workload"  # noqa: F821 - sensor.workload.Workload
    policy: Policy
    mode: str
    program: EgressProgram | None  # None when the policy leaves egress unconstrained (unpinned)
    exceptions_sig: tuple = ()
    cgroups: set[str] = field(default_factory=set)
    seccomp_target: str = "workload"


class _Desired:
    """A workload's desired-state file with what it held before this change, so an apply or a
    removal that fails puts it back as it was."""

    def __init__(self, state_dir, workload):
        self.state_dir = state_dir
        self.path = desired_path(state_dir, workload)
        try:
            self.old: bytes | None = self.path.read_bytes()
        except FileNotFoundError:
            self.old = None
        self.changed = False

    def write(self, policy: Policy, mode: str) -> None:
        self.changed = True
        write_desired(self.state_dir, policy, mode)

    def remove(self) -> None:
        self.changed = True
        self.path.unlink(missing_ok=True)

    def restore(self) -> None:
        if not self.changed:
            return
        try:
            if self.old is None:
                self.path.unlink(missing_ok=True)
            else:
                atomic_write(self.path, self.old)
        except OSError as e:
            log.error("desired state not restored", path=str(self.path), error=str(e))


def _cgroup_id(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class EnforcementSession:
    """Per-workload egress enforcement and denial visibility, pinned or not (see the module
    docstring)."""

    def __init__(self, state_dir, *, pinned: bool = True, bpffs="/sys/fs/bpf",
                 limits: Limits = Limits(), clock: Callable[[], float] = time.time,
                 denials: bool = False, file_denials: bool = False,
                 backend: KernelBackend | None = None, verify_interval: float = 2.0, http=None,
                 paths=None):
        self.state_dir = Path(state_dir)
        self.pinned = pinned
        self.bpffs = Path(bpffs)
        self.limits = limits
        self.clock = clock
        self.backend: KernelBackend = backend or RealKernel()
        self.enforced: dict[str, Enforced] = {}
        self.want_denials = denials
        self.want_file_denials = file_denials
        self._probe = None
        self._denial_cgroups: dict[int, str] = {}
        self._denial_allowed: dict[int, frozenset[str]] = {}  # cgroup -> its profile's syscalls
        self._denial_paths: dict[int, str] = {}  # cgroup -> its path
        self._file_probe = None
        self._file_cgroups: dict[int, str] = {}
        self._paths = paths  # sensor.proc_paths.ProcPaths, made when first needed
        self._reader = None
        self._reader_fds: set[int] = set()
        self._pending: list = []
        self.decode_errors = 0
        self.verify_interval = verify_interval  # seconds between integrity checks of pinned state
        self._next_verify = 0.0
        #: cgroup id -> session id, for naming the session of each violation (set by the caller)
        self.session_of: Callable[[int], str | None] | None = None
        # seccomp denials counted in the kernel: key -> the first sighting's violation, the
        # total read so far, and when it last moved
        self._denial_context: dict[bytes, object] = {}
        self._denial_seen: dict[bytes, tuple[int, float]] = {}
        self._next_counts = 0.0
        self.http = http  # enforcer.http_enforce.HttpEnforcement, or None

    # -- helpers --

    def _exceptions(self, workload) -> list:
        from .exceptions import active_exceptions
        return active_exceptions(self.state_dir, workload, self.clock())

    @staticmethod
    def _sig(excs) -> tuple:
        return tuple(sorted((e.id, e.allow) for e in excs))

    def _program(self, workload) -> tuple[EgressProgram, bool]:
        """The workload's program set: in memory, adopted from its pin, or freshly loaded."""
        cur = self.enforced.get(workload.key)
        if cur is not None and cur.program is not None:
            return cur.program, False
        if not self.pinned:
            return self.backend.load_egress(workload.key, None, self.limits), True
        pin = existing_pin_dir(self.bpffs, workload.key)
        if pin.is_dir() and any(pin.iterdir()):
            return self.backend.adopt_egress(pin, self.limits), False
        return self.backend.load_egress(workload.key, pin_dir_for(self.bpffs, workload.key), self.limits), True

    # -- the seam --

    def apply(self, policy: Policy, mode: str, cgroup_paths: Iterable[str | os.PathLike],
              reason: str = "apply", *, seccomp_target: str = "workload") -> list[CgroupResult]:
        """Apply ``policy`` in ``mode`` to ``cgroup_paths``. All or nothing: on any failure the
        previous state is left in place and :class:`ApplyError` is raised (its ``results``
        attribute holds the per-cgroup outcome).

        ``seccomp_target`` names where the workload's seccomp filter is loaded (see
        :func:`enforcer.seccomp.profile_for`); the denial probe compares against that profile."""
        if not isinstance(policy, Policy):
            raise PolicyError("apply needs a Policy")
        emode = egress_mode(policy, mode)
        workload = policy.workload
        excs = self._exceptions(workload)
        rules = effective_rules(policy, excs)
        names = effective_names(policy, excs)
        try:
            compile_rules(rules, 0, self.limits, names)  # capacity and ports, before touching anything
        except EgressRuleError as e:
            raise ApplyError(f"apply {workload}: {e}; nothing applied") from e
        paths = [str(p) for p in cgroup_paths]
        for p in paths:
            if not Path(p).is_dir():
                raise ApplyError(f"apply {workload}: cgroup {p} does not exist; nothing applied")
        hmode, hpatterns = self._http_plan(policy, mode, excs)
        # An unpinned session needs no programs for a policy that leaves egress out.
        needs_program = self.pinned or emode != "observe"

        prog, created = self._program(workload) if needs_program else (None, False)
        results: list[CgroupResult] = []
        newly: list[str] = []
        desired = _Desired(self.state_dir, workload) if self.pinned else None
        swapped = False
        try:
            for p in paths:
                if prog is None:
                    results.append(CgroupResult(p, True))
                    continue
                try:
                    was_new = prog.attach(p)
                except EgressError as e:
                    results.append(CgroupResult(p, False, error=str(e)))
                    raise ApplyError(f"apply {workload}: {e}; rolled back, previous state kept") from e
                if was_new:
                    newly.append(p)
                results.append(CgroupResult(p, True, attached=was_new))
            # The state lock keeps a CLI apply and the daemon from changing the same workload at
            # once. Under it: the desired state, then the rules swap (the previous generation
            # kept until the audit entry is written), then the audit entry. A failure at any
            # step undoes the ones before it.
            with locked(self.state_dir):
                if desired is not None:
                    desired.write(policy, mode)
                if prog is not None:
                    prog.write_policy(rules, emode, policy_hash(policy),
                                      grace=0.05 if self.pinned else 0, names=names,
                                      finish=False)
                    swapped = True
                if hpatterns is not None:
                    cgs = {cid: p for p in paths if (cid := _cgroup_id(p)) is not None}
                    self.http.apply(workload.key, hpatterns, hmode, cgs)
                elif self.http is not None:
                    self.http.remove(workload.key)
                if self.pinned:
                    audit.append(self.state_dir, "policy.apply", workload=workload.key, reason=reason,
                                 details={"mode": mode, "egress_mode": emode,
                                          "policy_sha256": policy_hash(policy).hex(),
                                          "cgroups": paths, "attached": newly,
                                          "egress_entries": len(rules), "name_entries": len(names),
                                          "exceptions": [e.id for e in excs]})
                if prog is not None:
                    prog.finish_swap()
        except BaseException as e:
            if swapped:
                try:
                    prog.revert_swap()
                except EgressError as re_:
                    log.error("rollback of the rules swap failed", workload=workload.key, error=str(re_))
            if desired is not None:
                desired.restore()
            for p in newly:
                try:
                    prog.detach(p)
                except EgressError as de:
                    log.error("rollback detach failed", cgroup=p, error=str(de))
            if prog is not None and created:
                prog.unpin()
                prog.close()
            elif prog is not None and workload.key not in self.enforced:
                prog.close()  # adopted for this call only; the pinned set keeps enforcing
            err = e if isinstance(e, ApplyError) else ApplyError(
                f"apply {workload}: {e}; rolled back, previous state kept")
            err.results = results
            if err is e:
                raise
            raise err from e

        prev = self.enforced.get(workload.key)
        cg = set(prev.cgroups) if prev else (set(prog.cgroups().values()) if prog else set())
        cg.update(paths)
        cur = Enforced(workload, policy, mode, prog, self._sig(excs), cg, seccomp_target)
        if prev is not None and prev.program is not None and prev.program is not prog:
            prev.program.close()
        self.enforced[workload.key] = cur
        self._reader_dirty()
        self._watch_denials(cur, paths)
        return results

    def _http_plan(self, policy: Policy, mode: str, excs) -> tuple[str, list | None]:
        """The http mode and request patterns to apply (None: nothing to judge), checked before
        anything is touched."""
        from .http_enforce import HttpEnforceError, effective_patterns, http_mode
        hmode = http_mode(policy, mode)
        if hmode == "observe":
            return hmode, None
        if self.http is None:
            if self.pinned:
                # `envelope enforce` outside the daemon: the desired state it writes is what the
                # daemon's session applies, the http rules included, in the capture it runs
                log.info("http rules left to the daemon's request capture", workload=policy.workload.key)
                return hmode, None
            raise ApplyError(f"apply {policy.workload}: the policy encodes http in {hmode} mode and the "
                             "request capture is not running (config http_capture); nothing applied")
        try:
            self.http.check(hmode)
        except HttpEnforceError as e:
            raise ApplyError(f"apply {policy.workload}: {e}; nothing applied") from e
        return hmode, effective_patterns(policy, excs)

    def attach_new_cgroup(self, workload, cgroup_path) -> CgroupResult:
        """Attach an enforced workload's programs to a cgroup that just appeared."""
        key = workload if isinstance(workload, str) else workload.key
        cur = self.enforced.get(key)
        if cur is None:
            return CgroupResult(str(cgroup_path), False, error=f"workload {key} is not enforced")
        new = False
        if cur.program is not None:
            try:
                new = cur.program.attach(cgroup_path)
            except EgressError as e:
                log.error("attach to new cgroup failed", workload=key, cgroup=str(cgroup_path),
                          error=str(e))
                return CgroupResult(str(cgroup_path), False, error=str(e))
        cur.cgroups.add(str(cgroup_path))
        self._watch_denials(cur, [str(cgroup_path)])
        cid = _cgroup_id(str(cgroup_path))
        if self.http is not None and cid is not None:
            self.http.attach(key, cid, str(cgroup_path))
        return CgroupResult(str(cgroup_path), True, attached=new)

    def sync(self) -> list[str]:
        """Re-swap rules whose exceptions started or lapsed, follow mode changes, and forget
        vanished cgroups. Returns the workloads that changed."""
        from .state import read_state
        changed = []
        now = time.monotonic()
        verify = now >= self._next_verify
        if verify:
            self._next_verify = now + self.verify_interval
        for key, cur in list(self.enforced.items()):
            excs = self._exceptions(cur.workload)
            sig = self._sig(excs)
            mode = cur.mode
            if self.pinned:
                st = read_state(self.state_dir, cur.workload)
                mode = st["mode"] if st else cur.mode
            if sig != cur.exceptions_sig or mode != cur.mode:
                if cur.program is not None:
                    with locked(self.state_dir):
                        cur.program.write_policy(effective_rules(cur.policy, excs),
                                                 egress_mode(cur.policy, mode),
                                                 policy_hash(cur.policy),
                                                 grace=0.05 if self.pinned else 0.01,
                                                 names=effective_names(cur.policy, excs))
                hmode, hpatterns = self._http_plan(cur.policy, mode, excs)
                if hpatterns is not None:
                    self.http.apply(key, hpatterns, hmode, {})
                if sig != cur.exceptions_sig:
                    log.info("egress exceptions re-synced", workload=key,
                             exceptions=[e.id for e in excs])
                    if self.pinned:
                        audit.append(self.state_dir, "exceptions.sync", workload=key,
                                     reason="exception started or lapsed",
                                     details={"exceptions": [e.id for e in excs]})
                cur.exceptions_sig = sig
                cur.mode = mode
                changed.append(key)
            if cur.program is not None:
                for gone in cur.program.prune_cgroups():
                    cur.cgroups.discard(gone)
                if verify and self._repair(cur, excs):
                    changed.append(key)
        return changed

    def _repair(self, cur: Enforced, excs) -> bool:
        """Tampering with the pinned state (mode word, rules, attachments) is repaired at once,
        audited and reported as an ``integrity`` violation."""
        from .violations import Violation
        rules = effective_rules(cur.policy, excs)
        names = effective_names(cur.policy, excs)
        emode = egress_mode(cur.policy, cur.mode)
        problems = cur.program.verify(rules, emode, policy_hash(cur.policy), names=names)
        detached = [p for p in sorted(cur.cgroups) if Path(p).is_dir() and not cur.program.attached(p)]
        if detached:
            problems.append(f"programs detached from {len(detached)} cgroups")
        if not problems:
            return False
        with locked(self.state_dir):
            cur.program.write_policy(rules, emode, policy_hash(cur.policy), grace=0.01, names=names)
        for p in detached:
            try:
                cur.program.attach(p)
            except EgressError as e:
                problems.append(f"re-attach {p} failed: {e}")
        key = cur.workload.key
        log.error("enforcement state was changed; repaired", workload=key, problems=problems)
        if self.pinned:
            audit.append(self.state_dir, "policy.tamper", workload=key, reason="repaired",
                         details={"problems": problems})
        self._pending.append(Violation(self.clock(), key, "integrity", "egress:pinned-state", "alerted",
                                       {"problems": problems, "repaired": True}))
        return True

    def adopt_pinned(self) -> list[str]:
        """Adopt every pinned set (after a restart), pairing it with its desired state.

        Nothing is re-attached or reloaded: the pinned programs are already attached and keep
        enforcing; this only re-opens their maps so rules, mode and events are managed again. A
        set is paired with the desired state whose workload's pin directory it is (the name is
        bounded, so the pinned ``meta`` map may hold a truncated key); a set that anyone but
        root could have changed is refused and reported.
        """
        if not self.pinned:
            return []
        desired = {existing_pin_dir(self.bpffs, w.key): (w, p, m) for w, p, m in read_desired(self.state_dir)}
        adopted = []
        for pin in self.backend.pinned_egress(self.bpffs):
            if any(e.program is not None and e.program.pin_dir == pin
                   for e in self.enforced.values()):
                continue
            try:
                prog = self.backend.adopt_egress(pin, self.limits)
            except EgressError as e:
                log.error("adopt failed", pin=str(pin), error=str(e))
                continue
            d = desired.get(pin)
            if d is None:
                log.warning("pinned egress set without desired state; left as is",
                            workload=prog.workload, pin=str(pin))
                prog.close()
                continue
            w, policy, mode = d
            prog.workload = w.key
            _gen, kmode = prog.state()
            cur = Enforced(w, policy, mode, prog, (), set(prog.cgroups().values()))
            self.enforced[w.key] = cur
            self._watch_denials(cur, sorted(cur.cgroups))
            adopted.append(w.key)
            log.info("adopted pinned enforcement", workload=w.key, mode=kmode,
                     cgroups=len(cur.cgroups))
        self._reader_dirty()
        self.sync()
        return adopted

    def forget(self, key: str) -> None:
        """Stop managing a workload (its pinned programs, if any, keep enforcing)."""
        cur = self.enforced.pop(key, None)
        if cur is None:
            return
        if self.http is not None:
            self.http.remove(key)
        self._unwatch_denials(key)
        self._reader_dirty()
        if cur.program is not None:
            cur.program.close()

    def remove(self, workload, reason: str = "remove") -> bool:
        """Detach from every cgroup, unpin, forget the desired state, all or nothing and audited
        when pinned: if a step fails (the audit entry included), what was detached is attached
        again, the pins and the desired state are put back, and :class:`ApplyError` is raised."""
        from sensor.workload import Workload
        key = workload if isinstance(workload, str) else workload.key
        w = Workload.parse(key)
        cur = self.enforced.get(key)
        prog = cur.program if cur else None
        adopted = False
        if prog is None and self.pinned:
            pin = existing_pin_dir(self.bpffs, key)
            if pin.is_dir() and any(pin.iterdir()):
                try:
                    prog = self.backend.adopt_egress(pin, self.limits)
                except EgressError as e:
                    raise ApplyError(f"remove {key}: {e}; nothing removed") from e
                adopted = True
        desired = _Desired(self.state_dir, w) if self.pinned else None
        if prog is None and cur is None and (desired is None or desired.old is None):
            return False
        cgroups = sorted(set(cur.cgroups if cur else ()) | set(prog.cgroups().values() if prog else ()))
        detached: list[str] = []
        unpinned = False
        try:
            with locked(self.state_dir):
                if desired is not None:
                    desired.remove()
                if prog is not None:
                    for p in cgroups:
                        was = os.path.isdir(p) and prog.attached(p)
                        prog.detach(p)  # a vanished cgroup's record goes too
                        if was:
                            detached.append(p)
                    prog.unpin()
                    unpinned = True
                if self.pinned:
                    audit.append(self.state_dir, "policy.remove", workload=key, reason=reason,
                                 details={"cgroups": detached})
        except BaseException as e:
            for p in detached:
                try:
                    prog.attach(p)
                except EgressError as ae:
                    log.error("rollback attach failed", cgroup=p, error=str(ae))
            if unpinned:
                prog.repin()
            if desired is not None:
                desired.restore()
            if adopted:
                prog.close()
            raise ApplyError(f"remove {key}: {e}; rolled back, still enforced") from e
        self.enforced.pop(key, None)
        self._reader_dirty()  # its ring buffer goes away with it
        self._unwatch_denials(key)
        if self.http is not None:
            self.http.remove(key)
        if prog is not None:
            prog.close()
        return True

    # -- visibility: egress violations from the program sets' ring buffers, seccomp denials --

    def _watch_denials(self, cur: Enforced, paths: Iterable[str]) -> None:
        """Report seccomp denials of the workload's cgroups, compared with the same profile the
        filter was compiled from (:func:`enforcer.seccomp.profile_for`), tasks moved out of
        them (every enforced cgroup, whatever its substrates), and Landlock's refusals where the
        policy's exec or file entries are enforced."""
        paths = list(paths)
        self._watch_file_denials(cur, paths)
        if not self.want_denials or cur.mode == "observe":
            return
        from .exceptions import syscall_allowances
        from .seccomp import DENY_ERRNO, profile_for
        if self._probe is None:
            from .denials import DenialProbeError
            try:
                self._probe = self.backend.denial_probe()
            except DenialProbeError as e:
                log.error("seccomp denial probe unavailable; denials will not be reported",
                          error=str(e))
                self.want_denials = False
                return
            self._reader_dirty()
        w = cur.workload
        if "syscall" in cur.policy.substrates:
            compiled = profile_for(cur.policy, cur.mode, target=cur.seccomp_target,
                                   exceptions=syscall_allowances(self.state_dir, w, self.clock()))
            mode, allowed, sockets = cur.mode, frozenset(compiled.allowed()), compiled.restricts_sockets()
        else:
            mode, allowed, sockets = "watch", frozenset(), False
        for p in paths:
            cid = _cgroup_id(p)
            if cid is None:
                continue
            self._probe.watch(cid, mode, DENY_ERRNO, allowed, sockets)
            self._denial_cgroups[cid] = w.key
            self._denial_allowed[cid] = allowed
            self._denial_paths[cid] = str(p)

    def _watch_file_denials(self, cur: Enforced, paths: list[str]) -> None:
        """Landlock enforces exec and file entries only in enforce mode (it has no log-only
        mode); its refusals are ``-EACCES`` at the syscall's exit (:mod:`enforcer.file_denials`)."""
        if not self.want_file_denials or cur.mode != "enforce" or not (
                {"exec", "file"} & set(cur.policy.substrates)):
            return
        if self._file_probe is None:
            from .file_denials import FileDenialProbeError
            try:
                self._file_probe = self.backend.file_denial_probe()
            except FileDenialProbeError as e:
                log.error("file denial probe unavailable; Landlock denials will not be reported",
                          error=str(e))
                self.want_file_denials = False
                return
            self._reader_dirty()
        for p in paths:
            cid = _cgroup_id(p)
            if cid is None:
                continue
            self._file_probe.watch(cid)
            self._file_cgroups[cid] = cur.workload.key

    def _unwatch_denials(self, key: str) -> None:
        for cid in [c for c, k in self._denial_cgroups.items() if k == key]:
            if self._probe is not None:
                self._probe.unwatch(cid)
            del self._denial_cgroups[cid]
            self._denial_allowed.pop(cid, None)
            self._denial_paths.pop(cid, None)
        # drain what these cgroups still have counted before their keys are dropped
        self._pending += self._denial_deltas(force=True)
        for cid in [c for c, k in self._file_cgroups.items() if k == key]:
            if self._file_probe is not None:
                self._file_probe.unwatch(cid)
            del self._file_cgroups[cid]

    def _reader_dirty(self) -> None:
        if self._reader is not None:
            self._reader.drain()
            self._reader.close()
        self._reader = None
        self._reader_fds = set()

    def _ensure_reader(self):
        if self._reader is None:
            self._reader = self.backend.ring_reader()
        for key, cur in self.enforced.items():
            if cur.program is None:
                continue
            fd = cur.program.events_fd
            if fd in self._reader_fds:
                continue
            self._reader.add(fd, lambda raw, k=key: self._on_record(raw, lambda _cid: k))
            self._reader_fds.add(fd)
        if self._probe is not None and self._probe.events_fd not in self._reader_fds:
            self._reader.add(self._probe.events_fd,
                             lambda raw: self._on_record(raw, self._denial_cgroups.get))
            self._reader_fds.add(self._probe.events_fd)
        if self._file_probe is not None and self._file_probe.events_fd not in self._reader_fds:
            self._reader.add(self._file_probe.events_fd, self._on_file_record)
            self._reader_fds.add(self._file_probe.events_fd)
        if self.http is not None and self.http.applied:
            fd = self.http.capture.violations_fd
            if fd not in self._reader_fds:
                self._reader.add(fd, self._on_http_record)
                self._reader_fds.add(fd)
        return self._reader

    def _on_file_record(self, raw: bytes) -> None:
        """A Landlock refusal: judged against the policy of the cgroup's workload."""
        from sensor.events import DecodeError, FileDenialEvent, decode
        from .violations import from_file_denial
        ev = decode(raw)
        if isinstance(ev, DecodeError):
            self.decode_errors += 1
            log.warning("undecodable record", kind=ev.kind, reason=ev.reason)
            return
        if not isinstance(ev, FileDenialEvent):
            return
        key = self._file_cgroups.get(ev.cgroup_id)
        cur = self.enforced.get(key) if key else None
        if cur is None:
            return
        if self._paths is None:
            from sensor.proc_paths import ProcPaths
            self._paths = ProcPaths()
        path = self._paths.resolve(ev.pid, ev.dirfd, ev.path)
        is_dir = self._paths.is_dir(ev.pid, path) if path is not None else None
        self._pending.extend(from_file_denial(ev, key, self.clock(), path, cur.policy.allows, is_dir))

    def _on_http_record(self, raw: bytes) -> None:
        """An http violation; a refused plaintext request's socket is aborted at once, so the
        bytes its killed write queued are never sent (see :mod:`enforcer.sockets`)."""
        from sensor.events import HttpViolationEvent, decode
        ev = decode(raw)
        if isinstance(ev, HttpViolationEvent) and ev.action == "killed" and not ev.tls:
            self.http.abort(ev.conn)
        self._on_record(raw, self._http_workload)

    def _http_workload(self, cgroup_id: int) -> str | None:
        for key, applied in self.http.applied.items():
            if cgroup_id in applied.cgroups:
                return key
        return None

    def _on_record(self, raw: bytes, workload_of) -> None:
        from sensor.events import CgroupEscapeEvent, DecodeError, SeccompDenialEvent, decode
        from .denials import denial_key
        from .violations import from_event
        ev = decode(raw)
        if isinstance(ev, DecodeError):
            self.decode_errors += 1
            log.warning("undecodable record", kind=ev.kind, reason=ev.reason)
            return
        if isinstance(ev, CgroupEscapeEvent):
            self._on_escape(ev)
            return
        v = from_event(ev, workload_of, self.clock(),
                       lambda cid: self._denial_allowed.get(cid, frozenset()), self.session_of)
        if v is not None and isinstance(ev, SeccompDenialEvent) and ev.counted:
            # its count comes from the kernel's totals (_denial_deltas); this names them
            key = denial_key(ev.cgroup_id, ev.pid, ev.nr, ev.context, ev.ret < 0)
            if len(self._denial_context) < DENIAL_CONTEXTS:
                self._denial_context[key] = v
            return
        if v is not None:
            self._pending.append(v)

    def _denial_deltas(self, force: bool = False) -> list:
        """Seccomp denials counted in the kernel since the last read, as violations (at most
        every :data:`COUNTS_INTERVAL` seconds unless forced). Keys idle for
        :data:`DENIAL_IDLE` seconds are dropped from the map (a later call re-announces them)."""
        if self._probe is None:
            return []
        now = time.monotonic()
        if not force and now < self._next_counts:
            return []
        self._next_counts = now + COUNTS_INTERVAL
        from .denials import DenialProbeError, parse_denial_key
        from .violations import Violation
        try:
            totals = self._probe.counts()
        except DenialProbeError as e:
            log.error("seccomp denial counts unreadable", error=str(e))
            return []
        out = []
        wall = self.clock()
        for key, total in totals:
            seen, moved = self._denial_seen.get(key, (0, now))
            if total > seen:
                first = self._denial_context.get(key)
                if first is None and not force and now - moved < COUNTS_INTERVAL * 2:
                    self._denial_seen.setdefault(key, (0, now))  # its first sighting is on the way
                    continue
                if first is None:
                    k = parse_denial_key(key)
                    workload = self._denial_cgroups.get(k["cgroup_id"], "unknown")
                    session = self.session_of(k["cgroup_id"]) if self.session_of else None
                    detail = {"pid": k["pid"], **({"session": session} if session else {}),
                              "cgroup_id": k["cgroup_id"], "nr": k["nr"]}
                    from sensor import syscalls
                    first = Violation(wall, workload, "syscall", f"syscall:{syscalls.name(k['nr'])}",
                                      "denied" if k["denied"] else "alerted", detail)
                out.append(Violation(wall, first.workload, first.substrate, first.behaviour,
                                     first.action, first.detail, total - seen))
                self._denial_seen[key] = (total, now)
            elif now - moved > DENIAL_IDLE or parse_denial_key(key)["cgroup_id"] not in self._denial_cgroups:
                try:
                    self._probe.forget(key)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                self._denial_seen.pop(key, None)
                self._denial_context.pop(key, None)
        return out

    def _on_escape(self, ev) -> None:
        """A thread of an enforced cgroup moved a task to another cgroup. Into one of the same
        workload's cgroups: nothing to do. Into a child cgroup: the egress programs still apply
        (cgroup programs are inherited), so the child is watched as well. Anywhere else the
        task has walked out of its enforcement: it is moved back at once, the move is audited
        as ``policy.escape`` and reported as an ``integrity`` violation. Where it cannot be moved
        back (the daemon in a pod has its own cgroup namespace, and the kernel refuses moves
        whose common ancestor lies outside it) and the workload is in enforce mode, it is killed."""
        from .violations import Violation
        key = self._denial_cgroups.get(ev.src_cgroup_id)
        cur = self.enforced.get(key) if key else None
        src = self._denial_paths.get(ev.src_cgroup_id)
        if cur is None or src is None:
            return
        if self._denial_cgroups.get(ev.dst_cgroup_id) == key:
            return
        from sensor.cgroup import cgroup2_mount_point
        dst = str(cgroup2_mount_point() / ev.dst_path.lstrip("/"))
        if Path(dst).is_relative_to(src):
            log.info("enforced task moved to a child cgroup; watching it too", workload=key,
                     pid=ev.pid, cgroup=dst)
            self._watch_denials(cur, [dst])
            return
        killed = False
        try:
            self.backend.move_task(ev.pid, src)
            moved, error = True, ""
        except OSError as e:  # the task is gone, the cgroup was removed, or out of our namespace
            moved, error = False, str(e)
            if cur.mode == "enforce" and not isinstance(e, ProcessLookupError):
                try:
                    self.backend.kill_task(ev.pid)
                    killed = True
                except OSError as k:
                    error += f"; kill: {k}"
        detail = {"pid": ev.pid, "by_pid": ev.by_pid, "from": src, "to": dst, "moved_back": moved,
                  "killed": killed}
        if error:
            detail["error"] = error
        log.warning("task moved out of its enforced cgroup", workload=key, **detail)
        reason = "moved back" if moved else "killed" if killed else "could not move back"
        if self.pinned:
            audit.append(self.state_dir, "policy.escape", workload=key, reason=reason, details=detail)
        self._pending.append(Violation(self.clock(), key, "integrity", "cgroup:migration",
                                       "denied" if moved or killed else "alerted", detail))

    def poll_violations(self, timeout_ms: int = 0, limit: int | None = None, final: bool = False) -> list:
        """Violations that reached userspace since the last call, waiting up to ``timeout_ms``
        for the first; at most ``limit`` kernel records are read per call. Seccomp denials are
        counted in the kernel and come out as deltas of their totals; ``final`` reads them all
        now (the workload is done)."""
        reader = self._ensure_reader()
        from .violations import fold
        reader.poll(timeout_ms, limit)
        if final:
            reader.drain()
        out, self._pending = self._pending, []
        return fold(out + self._denial_deltas(force=final))

    def lost(self) -> dict[str, int]:
        """Violation events dropped in the kernel (ring buffer full), per workload."""
        out = {k: cur.program.lost() for k, cur in self.enforced.items() if cur.program is not None}
        if self._probe is not None:
            out["seccomp-denials"] = self._probe.lost()
        if self._file_probe is not None:
            out["landlock-denials"] = self._file_probe.lost()
        return out

    def workload_of_cgroup(self, cgroup_id: int) -> str | None:
        for key, cur in self.enforced.items():
            if cur.program is not None and cgroup_id in cur.program.cgroups():
                return key
        return self._denial_cgroups.get(cgroup_id) or self._file_cgroups.get(cgroup_id)

    def close(self) -> None:
        """Close fds. Pinned programs and their attachments keep enforcing; unpinned ones are
        detached with the last fd."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for cur in self.enforced.values():
            if cur.program is None:
                continue
            if self.pinned:
                cur.program.close()
                continue
            try:
                cur.program.remove()  # BPF_PROG_ATTACH holds its own reference: detach
            except EgressError as e:
                log.warning("detach on close failed", workload=cur.workload.key, error=str(e))
                cur.program.close()
        self.enforced = {}
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self._file_probe is not None:
            self._file_probe.close()
            self._file_probe = None
