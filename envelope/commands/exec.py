"""``envelope exec --policy POLICY [--mode enforce|alert] -- CMD [ARGS...]``

Runs CMD inside its policy, standalone (no daemon):

1. a fresh cgroup v2 (``<cgroup2>/envelope/exec-<pid>-<n>``) gets the egress programs
   (``bpf/egress.c``, not pinned: they live as long as this command) with the policy's rules,
   active exceptions included, in the chosen mode;
2. the seccomp denial probe (``bpf/denials.c``) watches that cgroup;
3. the child joins the cgroup, loads the libseccomp filter built from the policy and execs CMD
   (``os.fork`` + ``os.execv``: nothing runs between the filter load and ``execve``, and
   ``execve`` is added to the filter's allowed set when the policy lacks it, reported as
   ``runtime-completeness:envelope-exec``);
4. while CMD runs, egress violations and seccomp denials are drained from the ring buffers,
   judged against the watch list, and egress exceptions are re-synced when one starts or lapses;
5. CMD's exit status is passed through (128+N for a signal); violations go to
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

from ..errors import UserError

log = structlog.get_logger(__name__)

EXEC_RULE = "runtime-completeness:envelope-exec"
_counter = 0


def register(sub) -> None:
    p = sub.add_parser("exec", help="run a command inside a policy (seccomp + egress), no daemon needed",
                       description="Run CMD in a fresh cgroup under the policy's seccomp filter and "
                                   "egress programs; its violations go to the state dir and CMD's "
                                   "exit status is passed through.",
                       usage="envelope exec --policy POLICY [--mode enforce|alert|observe] -- CMD [ARGS...]")
    p.add_argument("--policy", required=True, help="policy file (YAML or JSON)")
    p.add_argument("--mode", choices=["enforce", "alert", "observe"], default=None,
                   help="override the policy's mode")
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
        raise UserError("exec: needs root (cgroup and BPF attach)")
    from enforcer import audit
    from enforcer.egress import policy_hash
    details = {"mode": mode, "policy_mode": policy.mode, "policy_sha256": policy_hash(policy).hex(),
               "command": argv, "low_confidence": policy.low_confidence}
    action = "exec.override" if mode != policy.mode else "exec.apply"
    audit.append(config.state_dir, action, workload=policy.workload.key,
                 reason=f"envelope exec in {mode} mode" + (
                     f" (policy says {policy.mode})" if mode != policy.mode else ""),
                 details=details)
    runner = ExecRunner(config, policy, mode, poll_interval=args.poll_interval)
    return runner.run(path, argv)


class ExecRunner:
    """One confined run of a command. Every kernel object it makes is removed in :meth:`run`."""

    def __init__(self, config, policy, mode: str, poll_interval: float = 0.2):
        self.config = config
        self.policy = policy
        self.mode = mode
        self.workload = policy.workload.key
        self.poll_interval = poll_interval
        self.violations: list = []
        self.decode_errors = 0
        self.sensor = None
        self.lost = 0
        self.observe = lambda: None
        self._syscall_seen: dict[int, int] = {}

    # -- watch list and detection: live observation through the sensor --

    def _start_sensor(self) -> None:
        """The watch list and detection rules need every behaviour, allowed ones included."""
        try:
            from sensor.probes import Sensor
            sensor = Sensor()
            sensor.attach()
        except Exception as e:  # judged from violations only, and said so
            log.warning("sensor unavailable: watch list judged on violations only, detection rules "
                        "not judged", error=str(e))
            return
        self.sensor = sensor

    def _reports_execs(self) -> bool:
        """exec is observed and reported, not enforced: this kernel refuses BPF-LSM programs."""
        return "exec" in self.policy.substrates and self.mode != "observe"

    def _observe(self, judge, session: str, cg_id: int) -> None:
        if self.sensor is None:
            return
        from sensor import syscalls
        from sensor.events import SyscallFirstEvent
        from sensor.workload import syscall_key
        for ev in self.sensor.poll(0):
            if getattr(ev, "cgroup_id", None) != cg_id or isinstance(ev, SyscallFirstEvent):
                continue  # syscalls are counted below, from the counters
            key = ev.behaviour_key()
            if not key:
                continue
            t = self.sensor.wall_time(ev.ktime)
            self.violations.extend(judge.observe(session, key, 1, t))
        counts = self.sensor.syscall_counts().get(cg_id, {})
        now = time.time()
        for nr, total in counts.items():
            delta = total - self._syscall_seen.get(nr, 0)
            if delta > 0:
                self._syscall_seen[nr] = total
                self.violations.extend(judge.observe(session, syscall_key(syscalls.name(nr)), delta, now))

    # -- setup --

    def _seccomp_filter(self):
        from enforcer import exceptions as exc
        from enforcer.seccomp import build_filter, compile_oci
        if "syscall" not in self.policy.substrates or self.mode == "observe":
            return None, ()
        extra = exc.syscall_allowances(self.config.state_dir, self.policy.workload)
        if "execve" not in self.policy.syscalls and "execve" not in extra:
            extra["execve"] = EXEC_RULE
            log.info("execve added to the filter: the child loads it just before execve",
                     rule=EXEC_RULE)
        compiled = compile_oci(self.policy, self.mode, extra_allow=extra)
        skipped: list = []
        flt = build_filter(self.policy, self.mode, extra_allow=extra, skipped=skipped)
        return flt, compiled.allowed()

    def run(self, path: str, argv: list[str]) -> int:
        from enforcer import apply as ap
        from enforcer.denials import DenialProbe, DenialProbeError
        from enforcer.egress import EgressError, EgressProgram, RingBufferReader
        from enforcer.exceptions import active_exceptions, next_expiry
        from enforcer.seccomp import DENY_ERRNO
        from enforcer.violations import Judge, from_record
        from sensor.events import DecodeError
        from sensor.cgroup import CgroupFS, CgroupError

        global _counter
        _counter += 1
        cgfs = CgroupFS()
        rel = f"/envelope/exec-{os.getpid()}-{_counter}"
        prog = probe = reader = None
        child = None
        judge = Judge(self.policy, report_execs=self._reports_execs())
        session = f"exec-{os.getpid()}-{_counter}"
        state_dir = self.config.state_dir
        try:
            try:
                cg_path, cg_id = cgfs.make(rel)
            except CgroupError as e:
                raise UserError(f"exec: {e}") from None
            try:
                flt, allowed = self._seccomp_filter()
            except ValueError as e:  # SeccompCompileError, an unknown syscall name
                raise UserError(f"exec: seccomp filter: {e}") from None

            emode = ap.egress_mode(self.policy, self.mode)
            excs = active_exceptions(state_dir, self.policy.workload)
            sig = tuple(sorted(e.id for e in excs))
            try:
                if emode != "observe":
                    prog = EgressProgram.load(self.workload, pin_dir=None)
                    prog.write_policy(ap.effective_rules(self.policy, excs), emode, grace=0)
                    prog.attach(str(cg_path))
            except EgressError as e:
                raise UserError(f"exec: egress enforcement: {e}") from None

            reader = RingBufferReader()
            now = time.time

            def on_record(raw: bytes) -> None:
                v = from_record(raw, lambda _cid: self.workload, now())
                if v is None:
                    return
                if isinstance(v, DecodeError):
                    self.decode_errors += 1
                    log.warning("undecodable record", kind=v.kind, reason=v.reason)
                    return
                self.violations.append(v)
                # With the sensor running it reports every behaviour (denied egress too, its
                # root hook runs after ours); seccomp denials never reach it.
                if self.sensor is None or v.substrate == "syscall":
                    self.violations.extend(judge.observe(session, v.behaviour, 1, v.time))

            if prog is not None:
                reader.add(prog.maps["events"].fd, on_record)
            if flt is not None:
                try:
                    probe = DenialProbe()
                except DenialProbeError as e:
                    raise UserError(f"exec: seccomp denial visibility: {e}") from None
                probe.watch(cg_id, self.mode, DENY_ERRNO, allowed)
                reader.add(probe.events_fd, on_record)

            if self.policy.watch or self.policy.detection or self._reports_execs():
                self._start_sensor()
            self.observe = lambda: self._observe(judge, session, cg_id)
            child = self._spawn(path, argv, cgfs, rel, flt)
            status = self._supervise(child, reader, prog, excs, sig, next_expiry)
            child = None
            reader.poll(0)
            reader.drain()
            self.observe()
            self.lost = (prog.lost() if prog is not None else 0) + (probe.lost() if probe is not None else 0)
            self.violations.extend(judge.close_session(session, now()))
            return status
        finally:
            if child is not None:
                try:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            if reader is not None:
                try:
                    reader.drain()
                except Exception:
                    pass
            try:
                cgfs.remove(rel)  # the shared parent <cgroup2>/envelope stays: concurrent runs use it
            except Exception as e:
                log.warning("cgroup cleanup failed", cgroup=rel, error=str(e))
            if prog is not None:
                prog.close()
            if probe is not None:
                probe.close()
            if reader is not None:
                reader.close()
            if self.sensor is not None:
                self.sensor.close()
            self._store()

    def _store(self) -> None:
        from enforcer.violations import ViolationStore, fold
        if self.lost or self.decode_errors:
            print(f"envelope: warning: {self.lost} violation event(s) lost in the kernel (ring buffer "
                  f"full), {self.decode_errors} undecodable", file=sys.stderr)
        if not self.violations:
            return
        folded = fold(self.violations)
        ViolationStore(self.config.state_dir).append(folded)
        total = sum(v.count for v in folded)
        print(f"envelope: {total} violation(s) recorded for {self.workload} "
              f"(envelope violations --workload {self.policy.workload.name})", file=sys.stderr)

    def _spawn(self, path: str, argv: list[str], cgfs, rel: str, flt) -> int:
        """fork; the child joins the cgroup, loads the filter and execs. Errors before exec come
        back through a close-on-exec pipe."""
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

    def _supervise(self, pid: int, reader, prog, excs, sig, next_expiry) -> int:
        from enforcer import apply as ap
        from enforcer.exceptions import active_exceptions

        forwarded = {}

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            forwarded[s] = signal.signal(s, forward)
        timeout_ms = max(1, int(self.poll_interval * 1000))
        state_dir = self.config.state_dir
        try:
            while True:
                reader.poll(timeout_ms)
                self.observe()
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    return 0
                if done:
                    if os.WIFSIGNALED(status):
                        return 128 + os.WTERMSIG(status)
                    return os.WEXITSTATUS(status)
                if prog is not None:
                    cur = active_exceptions(state_dir, self.policy.workload)
                    cur_sig = tuple(sorted(e.id for e in cur))
                    if cur_sig != sig:
                        mode = ap.egress_mode(self.policy, self.mode)
                        prog.write_policy(ap.effective_rules(self.policy, cur), mode, grace=0.01)
                        log.info("egress exceptions re-synced", workload=self.workload,
                                 exceptions=list(cur_sig))
                        sig = cur_sig
        finally:
            for s, h in forwarded.items():
                signal.signal(s, h)
