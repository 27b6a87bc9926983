"""``envelope exec --policy POLICY [--mode enforce|alert] -- CMD [ARGS...]``

Runs CMD inside its policy, standalone (no daemon):

0. cgroups that a killed ``envelope exec`` or ``record`` left behind are killed
   (``cgroup.kill``) and removed (:func:`sensor.cgroup.reap_orphans`); in enforce mode
   the command says how many behaviours of the policy sit in review and what happens to them
   when they recur (:mod:`envelope.review_notice`);
1. a fresh cgroup v2 (``<cgroup2>/envelope/exec-<pid>-<n>``, owned under a lock and guarded by a
   :class:`sensor.cgroup.OrphanGuard` that kills it if this command dies) is enforced by an
   unpinned enforcement session (:mod:`enforcer.session`): the egress programs
   (``bpf/egress.c``, they live as long as this command) with the policy's rules, active
   exceptions included, in the chosen mode, and the seccomp denial probe (``bpf/denials.c``)
   watching that cgroup;
2. the child joins the cgroup; in enforce mode it confines itself there
   (:mod:`enforcer.confinement`: a mount namespace with the cgroup filesystems read-only and the
   bpffs hidden, a cgroup namespace, and the capabilities dropped that the policy does not
   allow, or those that would undo the confinement when the policy has no capability substrate),
   enforces the policy's Landlock ruleset (exec and file entries, enforce mode only:
   :mod:`envelope.exec_landlock`), loads the libseccomp filter built from the policy
   (:func:`enforcer.seccomp.profile_for`, target ``exec``) and execs CMD through its launch
   path (:mod:`enforcer.launch_path`): nothing runs between the filter load and ``execve``, and
   when the policy has no exec entries that ``execve`` is the only one the filter admits;
3. while CMD runs, violations (Landlock's refusals among them) are folded as they come out of
   the session (bounded memory at any rate, counts kept) and appended to
   ``<state-dir>/violations.jsonl`` at every step, so ``envelope violations`` shows them during
   the run and a killed ``exec`` loses nothing it had read; the sensor pump (:mod:`sensor.pump`)
   observes the cgroup so that detection (watch list, probabilistic rules, execs and file
   accesses outside the policy, execs judged by resolved name: :mod:`enforcer.exec_paths`)
   judges every behaviour, allowed ones included; egress exceptions are re-synced when one
   starts or lapses;
4. SIGINT/SIGTERM/SIGHUP go to CMD; if it has not exited ``--stop-grace`` seconds later (or at
   a second signal) its whole cgroup is killed;
5. CMD's exit status is passed through (128+N for a signal); the cgroup and programs are removed.
"""

from __future__ import annotations

import argparse
import functools
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
    p.add_argument("--no-confine", action="store_true",
                   help="enforce mode: do not confine the command in its cgroup (no namespaces, read-only "
                        "cgroup filesystems, hidden bpffs or dropped capabilities); for a trusted program "
                        "that manages cgroups or BPF itself, such as Envelope's own daemon (audited)")
    p.add_argument("--poll-interval", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--stop-grace", type=float, default=3.0, metavar="SECONDS",
                   help="after SIGTERM/SIGINT, how long CMD may take to exit before its cgroup is "
                        "killed (default 3)")
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
    runner = ExecRunner(config, policy, mode, poll_interval=args.poll_interval, grace=args.stop_grace,
                        allow_landlock_gaps=args.allow_landlock_gaps, confine=not args.no_confine)
    if mode == "enforce":  # what keeps the child in: audited with the run (planned, nothing applied yet)
        plan = runner.confinement
        details["confinement"] = "off (--no-confine)" if plan is None else plan.describe()
    action = "exec.override" if mode != policy.mode else "exec.apply"
    audit.append(config.state_dir, action, workload=policy.workload.key,
                 reason=f"envelope exec in {mode} mode" + (
                     f" (policy says {policy.mode})" if mode != policy.mode else ""),
                 details=details)
    return runner.run(path, argv)


#: Kernel records read per step, so that a storm never keeps the loop from its other work.
RECORDS_PER_STEP = 8192
#: Violations already in the store are written again (their new counts) at most this often; a
#: violation not yet in the store is written at the step that reads it.
STORE_INTERVAL = 1.0
_WRITTEN_CAP = 65536


class ExecRunner:
    """One confined run of a command. Every kernel object it makes is removed in :meth:`run`."""

    def __init__(self, config, policy, mode: str, poll_interval: float = 0.2, grace: float = 3.0,
                 allow_landlock_gaps: bool = False, confine: bool = True):
        from enforcer.violations import ViolationFold, ViolationStore
        self.config = config
        self.confine = confine
        self.allow_landlock_gaps = allow_landlock_gaps
        self.policy = policy
        self.mode = mode
        self.workload = policy.workload.key
        self.poll_interval = poll_interval
        self.grace = grace
        self.fold = ViolationFold()
        self.store = ViolationStore(config.state_dir)
        self.recorded = 0
        self.decode_errors = 0
        self.lost = 0
        self.observation_lost: dict[str, int] = {}  # the sensor's loss of this run's cgroups
        self._stop: int | None = None  # the first stop signal received
        self._stop_deadline = 0.0
        self._written: set[tuple] = set()  # fold keys already in the store (bounded)
        self.path = ""  # the command's path, set by run()
        self._next_store = 0.0

    def _reports(self) -> bool:
        """Execs and file accesses outside the policy that happen are reported (alert mode: all
        of them, Landlock has no log-only mode; enforce mode: what a ruleset wider than the
        policy let through)."""
        return bool({"exec", "file"} & set(self.policy.substrates)) and self.mode != "observe"

    def _constrains_syscalls(self) -> bool:
        return "syscall" in self.policy.substrates and self.mode != "observe"

    def _launched(self) -> tuple[str, ...]:
        """The command's path as given and as resolved: the policy's exec entry for the launch."""
        return tuple(sorted({self.path, os.path.realpath(self.path)})) if self.path else ()

    def _seccomp(self, launch_pointer: int):
        """The filter the child loads, or None when syscalls are not constrained."""
        from enforcer import exceptions as exc
        from enforcer.seccomp import build_filter, profile_for
        if not self._constrains_syscalls():
            return None
        compiled = profile_for(self.policy, self.mode, target="exec", launch_pointer=launch_pointer,
                               launched=self._launched(),
                               exceptions=exc.syscall_allowances(self.config.state_dir,
                                                                 self.policy.workload))
        return build_filter(compiled, skipped=[])

    def _notice(self, exec_paths_enforced: bool) -> None:
        """Before enforcing: how many behaviours sit in review and what happens to them."""
        if self.mode != "enforce":
            return
        from enforcer.seccomp import needs_exec
        from ..review_notice import review_notice
        execve_denied = self._constrains_syscalls() and not needs_exec(self.policy, self._launched())
        for line in review_notice(self.policy, exec_paths_enforced=exec_paths_enforced,
                                  execve_denied=execve_denied):
            print(line, file=sys.stderr)
        sys.stderr.flush()

    @functools.cached_property
    def confinement(self):
        """What keeps the enforced child in its cgroup and away from the pins (None outside
        enforce mode, or when turned off); a policy that keeps a capability opening a way out is
        said on stderr. Planned once per runner."""
        from enforcer import confinement
        from enforcer import exceptions as exc
        if not self.confine:
            if self.mode == "enforce":
                print("envelope: warning: --no-confine: the command may leave its cgroup, open pinned maps "
                      "and keep every capability", file=sys.stderr)
            return None
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
                self.fold.add_all(judge.observe(session, key, count, ts))

        agg.listeners.append(judged)
        binding = TreeBinding(cg_path, self.policy.workload, session)
        pump = Pump(sensor, binding, agg, counts_interval=self.poll_interval)
        pump.bind(binding.root_id)
        return pump

    def run(self, path: str, argv: list[str]) -> int:
        from enforcer.exec_paths import ExecNames
        from enforcer.launch_path import LaunchPath, LaunchPathError
        from enforcer.session import ApplyError
        from enforcer.violations import Judge
        from sensor.cgroup import CgroupError, CgroupFS, OrphanGuard, reap_command_orphans
        from .. import exec_landlock, wiring

        global _counter
        _counter += 1
        self.path = path
        cgfs = CgroupFS()
        reap_command_orphans(cgfs)  # what a killed exec or record left behind
        rel = f"/envelope/exec-{os.getpid()}-{_counter}"
        session_id = f"exec-{os.getpid()}-{_counter}"
        enforcement = pump = guard = launch = landlock = None
        child = None
        try:
            landlock = exec_landlock.for_run(self.config, self.policy, self.mode, self.allow_landlock_gaps)
            confined = self.confinement
            dropped = confined is not None and "capability" in self.policy.substrates
            judge = Judge(self.policy, report_execs=self._reports(), report_files=self._reports(),
                          report_capabilities=self.mode != "observe",
                          enforced=landlock.enforced | ({"capability"} if dropped else set()),
                          exec_admits=ExecNames("/").admits(self.policy))
            try:
                cg_path, cg_id = cgfs.make(rel)
            except CgroupError as e:
                raise UserError(f"exec: {e}") from None
            guard = OrphanGuard(cgfs, rel)  # forked before any BPF object exists
            self._notice(exec_paths_enforced="exec" in landlock.enforced)
            if self._constrains_syscalls():
                try:
                    launch = LaunchPath(path, argv)
                except (LaunchPathError, ValueError) as e:
                    raise UserError(f"exec: {e}") from None
            try:
                flt = self._seccomp(launch.pointer if launch is not None else 0)
            except ValueError as e:  # SeccompCompileError, an unknown syscall name
                raise UserError(f"exec: seccomp filter: {e}") from None
            if self._judges_http() or self.policy.watch or self.policy.detection or self._reports():
                pump = self._pump(judge, str(cg_path), session_id)
            enforcement = wiring.enforcement_session(self.config, pinned=False,
                                                     denials=flt is not None,
                                                     sensor=pump.sensor if pump is not None else None,
                                                     file_denials=bool(landlock.enforced))
            enforcement.session_of = lambda cid: session_id if cid == cg_id else None
            try:
                enforcement.apply(self.policy, self.mode, [str(cg_path)], seccomp_target="exec")
            except ApplyError as e:
                raise UserError(f"exec: enforcement: {e}") from None
            if flt is not None and not enforcement.want_denials:
                raise UserError("exec: seccomp denial visibility: the denial probe did not load "
                                "(see the log above)")
            try:
                child = self._spawn(path, argv, cgfs, rel, flt, launch, landlock, confined)
            except UserError as e:  # CMD itself refused by Landlock: recorded, and said why
                self._take(enforcement.poll_violations(100), judge, None, session_id)
                if "exec" in landlock.enforced and "Permission denied" in str(e):
                    raise UserError(f"{e} (Landlock: {path} is not an allowed exec of the policy)") from None
                raise
            status = self._supervise(child, enforcement, pump, judge, session_id, cgfs, rel)
            child = None
            if pump is not None:
                pump.finish()
                self.observation_lost = dict(pump.loss_charged)
            self._take(enforcement.poll_violations(0, final=True), judge, pump, session_id)
            self.decode_errors = enforcement.decode_errors
            self.lost = sum(enforcement.lost().values())
            self.fold.add_all(judge.close_session(session_id, time.time()))
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
            self._store(final=True)
            if guard is not None:
                guard.release()
            if launch is not None:
                launch.close()

    def _take(self, found: list, judge, pump, session: str) -> None:
        """Violations from the kernel, folded. With the pump running it reports every behaviour
        to the judge (denied egress too: the sensor's root hook runs after ours); seccomp
        denials and Landlock's refusals never reach it."""
        for v in found:
            self.fold.add(v)
            refused = v.action == "denied" and v.substrate in ("exec", "file")
            if pump is None or v.substrate == "syscall" or refused:
                self.fold.add_all(judge.observe(session, v.behaviour, v.count, v.time,
                                                denied=v.action == "denied"))

    def _store(self, final: bool = False) -> None:
        """Append what was folded to the violations store: at once when something is new, its
        counts at most every :data:`STORE_INTERVAL` (fsync at the end)."""
        now = time.monotonic()
        if not final and now < self._next_store and not self.fold.has_new(self._written):
            return
        items = self.fold.take()
        self._next_store = now + STORE_INTERVAL
        if items:
            self.store.append(items, durable=final)
            self.recorded += sum(v.count for v in items)
            if len(self._written) < _WRITTEN_CAP:
                self._written.update(v.fold_key() for v in items)
        if not final:
            return
        if self.lost or self.decode_errors:
            print(f"envelope: warning: {self.lost} violation event(s) lost in the kernel (ring buffer "
                  f"full), {self.decode_errors} undecodable", file=sys.stderr)
        if self.observation_lost:
            print(f"envelope: warning: the sensor lost events of this run (detection may have missed "
                  f"behaviours): {self.observation_lost}", file=sys.stderr)
        if self.recorded:
            print(f"envelope: {self.recorded} violation(s) recorded for {self.workload} "
                  f"(envelope violations --workload {self.policy.workload.name})", file=sys.stderr)

    def _spawn(self, path: str, argv: list[str], cgfs, rel: str, flt, launch, landlock,
               confined=None) -> int:
        """fork; the child joins the cgroup, confines itself, enforces Landlock, loads the filter
        and execs through the launch path (that order: mounts and namespaces are made before
        Landlock forbids changing them and while the capabilities they need are held; the filter
        then never needs the landlock_* syscalls, and admits no syscall before ``execve`` but
        that one). Errors before exec come back through a close-on-exec pipe."""
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
                if launch is not None:
                    launch.execve()
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

    def _supervise(self, pid: int, enforcement, pump, judge, session: str, cgfs, rel: str) -> int:
        forwarded = {}

        def forward(signum, _frame):
            now = time.monotonic()
            if self._stop is None:
                self._stop, self._stop_deadline = signum, now + self.grace
            else:
                self._stop_deadline = now  # a second signal: stop now
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            forwarded[s] = signal.signal(s, forward)
        timeout_ms = max(1, int(self.poll_interval * 1000))
        killed = False
        try:
            while True:
                if self._stop is not None and not killed and time.monotonic() >= self._stop_deadline:
                    log.warning("command did not stop in time; killing its cgroup", cgroup=rel,
                                grace=self.grace)
                    cgfs.kill_all(rel)
                    killed = True
                self._take(enforcement.poll_violations(0 if pump else timeout_ms, RECORDS_PER_STEP),
                           judge, pump, session)
                if pump is not None:
                    pump.step(timeout_ms if self._stop is None else min(timeout_ms, 50))
                self._store()
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
