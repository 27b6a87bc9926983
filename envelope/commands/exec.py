"""``envelope exec --policy POLICY [--mode enforce|alert] -- CMD [ARGS...]``

Runs CMD inside its policy, standalone (no daemon):

1. a fresh cgroup v2 (``<cgroup2>/envelope/exec-<pid>-<n>``) is enforced by an unpinned
   enforcement session (:mod:`enforcer.session`): the egress programs (``bpf/egress.c``, they
   live as long as this command) with the policy's rules, active exceptions included, in the
   chosen mode, and the seccomp denial probe (``bpf/denials.c``) watching that cgroup;
2. the child joins the cgroup; in enforce mode it confines itself there
   (:mod:`enforcer.confinement`: a mount namespace with the cgroup filesystems read-only and the
   bpffs hidden, a cgroup namespace, and the capabilities dropped that the policy does not
   allow, or those that would undo the confinement when the policy has no capability substrate),
   enforces the policy's Landlock ruleset (exec and file entries, enforce mode only:
   :mod:`envelope.exec_landlock`), loads the libseccomp filter built from the
   policy (:func:`enforcer.seccomp.profile_for`, target ``exec``) and execs CMD (``os.fork`` +
   ``os.execv``: nothing runs between the filter load and ``execve``, and ``execve`` is added
   to the filter's allowed set when the policy lacks it, reported as
   ``runtime-completeness:envelope-exec``);
3. while CMD runs, violations come out of the session (Landlock's refusals among them); the
   sensor pump (:mod:`sensor.pump`) observes the cgroup so that detection (watch list,
   probabilistic rules, execs and file accesses outside the policy) judges every behaviour,
   allowed ones included; egress exceptions are re-synced when one starts or lapses;
4. CMD's exit status is passed through (128+N for a signal); violations go to
   ``<state-dir>/violations.jsonl``; the cgroup and programs are removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time

import structlog

from ..errors import EnvironmentFailure, UserError

log = structlog.get_logger(__name__)

_counter = 0


def register(sub) -> None:
    p = sub.add_parser("exec", help="run a command inside a policy (seccomp, egress, Landlock), no daemon needed",
                       description="Run CMD in a fresh cgroup under the policy's seccomp filter, egress "
                                   "programs and Landlock ruleset (and the request capture's judgement of "
                                   "its http requests); its violations go to the state dir and CMD's exit "
                                   "status is passed through.",
                       usage="envelope exec --policy POLICY [--mode enforce|alert|observe] -- CMD [ARGS...]")
    p.add_argument("--policy", required=True, help="policy file (YAML or JSON)")
    p.add_argument("--mode", choices=["enforce", "alert", "observe"], default=None,
                   help="override the policy's mode")
    p.add_argument("--allow-landlock-gaps", action="store_true",
                   help="enforce mode: where this kernel's Landlock cannot restrict a right the policy needs, "
                        "run without it (each gap printed and audited) instead of refusing")
    p.add_argument("--poll-interval", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_exec)


def cmd_exec(args, config) -> int:
    from enforcer.policy import PolicyError, load_policy
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError("exec: give a command after --, e.g. envelope exec --policy p.yaml -- /bin/true")
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        raise UserError(str(e)) from None
    mode = args.mode or policy.mode
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if not path or not os.access(path, os.X_OK):
        raise UserError(f"exec: {argv[0]}: command not found or not executable")
    if os.geteuid() != 0:
        raise EnvironmentFailure("exec: needs root (cgroup and BPF attach)")
    from enforcer import audit
    from enforcer.policy import policy_hash
    details = {"mode": mode, "policy_mode": policy.mode, "policy_sha256": policy_hash(policy).hex(),
               "command": argv, "low_confidence": policy.low_confidence}
    action = "exec.override" if mode != policy.mode else "exec.apply"
    audit.append(config.state_dir, action, workload=policy.workload.key,
                 reason=f"envelope exec in {mode} mode" + (
                     f" (policy says {policy.mode})" if mode != policy.mode else ""),
                 details=details)
    runner = ExecRunner(config, policy, mode, poll_interval=args.poll_interval,
                        allow_landlock_gaps=args.allow_landlock_gaps)
    return runner.run(path, argv)


class ExecRunner:
    """One confined run of a command. Every kernel object it makes is removed in :meth:`run`."""

    def __init__(self, config, policy, mode: str, poll_interval: float = 0.2,
                 allow_landlock_gaps: bool = False):
        self.config = config
        self.allow_landlock_gaps = allow_landlock_gaps
        self.policy = policy
        self.mode = mode
        self.workload = policy.workload.key
        self.poll_interval = poll_interval
        self.violations: list = []
        self.decode_errors = 0
        self.lost = 0
        self.observation_lost: dict[str, int] = {}  # the sensor's loss of this run's cgroups

    def _reports(self) -> bool:
        """Execs and file accesses outside the policy that happen are reported (alert mode: all
        of them, Landlock has no log-only mode; enforce mode: what a ruleset wider than the
        policy let through)."""
        return bool({"exec", "file"} & set(self.policy.substrates)) and self.mode != "observe"

    def _seccomp(self):
        """The filter the child loads, or None when syscalls are not constrained."""
        from enforcer import exceptions as exc
        from enforcer.seccomp import build_filter, profile_for
        if "syscall" not in self.policy.substrates or self.mode == "observe":
            return None
        compiled = profile_for(self.policy, self.mode, target="exec",
                               exceptions=exc.syscall_allowances(self.config.state_dir,
                                                                 self.policy.workload))
        return build_filter(compiled, skipped=[])

    def _confinement(self):
        """What keeps the enforced child in its cgroup and away from the pins (None outside
        enforce mode); a policy that keeps a capability opening a way out is said on stderr."""
        from enforcer import confinement
        from enforcer import exceptions as exc
        from enforcer.capabilities import CapabilityCompileError, exec_capability_sets
        try:
            keep = exec_capability_sets(self.policy, self.mode,
                                        exc.capability_allowances(self.config.state_dir, self.policy.workload))
        except CapabilityCompileError as e:
            raise UserError(f"exec: capabilities: {e}") from None
        plan = confinement.for_exec(self.mode, keep)
        if plan is not None:
            for way in confinement.admitted_breakers(plan.keep):
                print(f"envelope: warning: the policy keeps capability {way}", file=sys.stderr)
        return plan

    def _judges_http(self) -> bool:
        """http is judged by the request capture's probe, which runs with the sensor."""
        return "http" in self.policy.substrates and self.mode != "observe"

    def _pump(self, judge, cg_path: str, session: str):
        """The sensor pump over the command's cgroup, feeding the judge every behaviour; None
        (said in a warning) when the sensor cannot attach, unless the http substrate needs it."""
        from sensor.pump import Pump, TreeBinding
        from .. import wiring
        try:
            sensor = wiring.open_sensor(self.config, tracked_only=True)
        except UserError as e:
            if self._judges_http():
                raise UserError(f"exec: the http substrate is judged by the request capture, which "
                                f"did not start: {e}") from None
            log.warning("sensor unavailable: watch list judged on violations only, detection "
                        "rules not judged", error=str(e))
            return None
        agg = wiring.aggregator(self.config)

        def judged(_workload, sess, key, count, ts):
            if key is not None and sess == session:
                self.violations.extend(judge.observe(session, key, count, ts))

        agg.listeners.append(judged)
        binding = TreeBinding(cg_path, self.policy.workload, session)
        pump = Pump(sensor, binding, agg, counts_interval=self.poll_interval)
        pump.bind(binding.root_id)
        return pump

    def run(self, path: str, argv: list[str]) -> int:
        from enforcer.session import ApplyError
        from enforcer.violations import Judge
        from sensor.cgroup import CgroupError, CgroupFS
        from .. import exec_landlock, wiring

        global _counter
        _counter += 1
        cgfs = CgroupFS()
        rel = f"/envelope/exec-{os.getpid()}-{_counter}"
        session_id = f"exec-{os.getpid()}-{_counter}"
        enforcement = pump = landlock = None
        child = None
        try:
            landlock = exec_landlock.for_run(self.config, self.policy, self.mode, self.allow_landlock_gaps)
            confined = self._confinement()
            dropped = confined is not None and "capability" in self.policy.substrates
            judge = Judge(self.policy, report_execs=self._reports(), report_files=self._reports(),
                          report_capabilities=self.mode != "observe",
                          enforced=landlock.enforced | ({"capability"} if dropped else set()))
            try:
                cg_path, _cg_id = cgfs.make(rel)
            except CgroupError as e:
                raise UserError(f"exec: {e}") from None
            try:
                flt = self._seccomp()
            except ValueError as e:  # SeccompCompileError, an unknown syscall name
                raise UserError(f"exec: seccomp filter: {e}") from None
            if self._judges_http() or self.policy.watch or self.policy.detection or self._reports():
                pump = self._pump(judge, str(cg_path), session_id)
            enforcement = wiring.enforcement_session(self.config, pinned=False,
                                                     denials=flt is not None,
                                                     sensor=pump.sensor if pump is not None else None,
                                                     file_denials=bool(landlock.enforced))
            try:
                enforcement.apply(self.policy, self.mode, [str(cg_path)], seccomp_target="exec")
            except ApplyError as e:
                raise UserError(f"exec: enforcement: {e}") from None
            if flt is not None and not enforcement.want_denials:
                raise UserError("exec: seccomp denial visibility: the denial probe did not load "
                                "(see the log above)")
            try:
                child = self._spawn(path, argv, cgfs, rel, flt, landlock, confined)
            except UserError as e:  # CMD itself refused by Landlock: recorded, and said why
                self._take(enforcement.poll_violations(100), judge, None, session_id)
                if "exec" in landlock.enforced and "Permission denied" in str(e):
                    raise UserError(f"{e} (Landlock: {path} is not an allowed exec of the policy)") from None
                raise
            status = self._supervise(child, enforcement, pump, judge, session_id)
            child = None
            if pump is not None:
                pump.finish()
                self.observation_lost = dict(pump.loss_charged)
            self._take(enforcement.poll_violations(0), judge, pump, session_id)
            self.decode_errors = enforcement.decode_errors
            self.lost = sum(enforcement.lost().values())
            self.violations.extend(judge.close_session(session_id, time.time()))
            return status
        finally:
            if child is not None:
                try:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            try:
                cgfs.remove(rel)  # the shared parent <cgroup2>/envelope stays: concurrent runs use it
            except Exception as e:
                log.warning("cgroup cleanup failed", cgroup=rel, error=str(e))
            if enforcement is not None:
                enforcement.close()
            if landlock is not None:
                landlock.close()
            if pump is not None:
                pump.release()
                pump.sensor.close()
            self._store()

    def _take(self, found: list, judge, pump, session: str) -> None:
        """Violations from the kernel. With the pump running it reports every behaviour to the
        judge (denied egress too: the sensor's root hook runs after ours); seccomp denials and
        Landlock's refusals never reach it."""
        for v in found:
            self.violations.append(v)
            refused = v.action == "denied" and v.substrate in ("exec", "file")
            if pump is None or v.substrate == "syscall" or refused:
                self.violations.extend(judge.observe(session, v.behaviour, v.count, v.time,
                                                     denied=v.action == "denied"))

    def _store(self) -> None:
        from enforcer.violations import ViolationStore, fold
        if self.lost or self.decode_errors:
            print(f"envelope: warning: {self.lost} violation event(s) lost in the kernel (ring buffer "
                  f"full), {self.decode_errors} undecodable", file=sys.stderr)
        if self.observation_lost:
            print(f"envelope: warning: the sensor lost events of this run (detection may have missed "
                  f"behaviours): {self.observation_lost}", file=sys.stderr)
        if not self.violations:
            return
        folded = fold(self.violations)
        ViolationStore(self.config.state_dir).append(folded)
        total = sum(v.count for v in folded)
        print(f"envelope: {total} violation(s) recorded for {self.workload} "
              f"(envelope violations --workload {self.policy.workload.name})", file=sys.stderr)

    def _spawn(self, path: str, argv: list[str], cgfs, rel: str, flt, landlock, confined=None) -> int:
        """fork; the child joins the cgroup, confines itself, enforces Landlock, loads the filter
        and execs (that order: mounts and namespaces are made before Landlock forbids changing
        them and while the capabilities they need are held; the filter then never needs the
        landlock_* syscalls). Errors before exec come back through a close-on-exec pipe."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        procs = str(cgfs.abspath(rel) / "cgroup.procs")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: no Python-level cleanup may run here
            step = "join cgroup"
            try:
                os.close(rfd)
                fd = os.open(procs, os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
                    signal.signal(s, signal.SIG_DFL)
                if confined is not None:
                    step = "confine"
                    confined.apply()
                step = "enforce Landlock ruleset"
                landlock.restrict_in_child()
                if flt is not None:
                    step = "load seccomp filter"
                    flt.load()
                step = f"execve {path}"
                os.execv(path, argv)
            except BaseException as e:  # noqa: BLE001 - report anything, then exit
                try:
                    msg = f"{step}: {getattr(e, 'strerror', None) or e}".encode()
                    os.write(wfd, msg[:4000])
                finally:
                    os._exit(127)
        os.close(wfd)
        err = b""
        while True:
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            err += chunk
        os.close(rfd)
        if err:
            os.waitpid(pid, 0)
            raise UserError(f"exec: {err.decode(errors='replace')}")
        return pid

    def _supervise(self, pid: int, enforcement, pump, judge, session: str) -> int:
        forwarded = {}

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            forwarded[s] = signal.signal(s, forward)
        timeout_ms = max(1, int(self.poll_interval * 1000))
        try:
            while True:
                self._take(enforcement.poll_violations(0 if pump else timeout_ms), judge, pump,
                           session)
                if pump is not None:
                    pump.step(timeout_ms)
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    return 0
                if done:
                    if os.WIFSIGNALED(status):
                        return 128 + os.WTERMSIG(status)
                    return os.WEXITSTATUS(status)
                enforcement.sync()  # exceptions that start or lapse reach the running command
        finally:
            for s, h in forwarded.items():
                signal.signal(s, h)
