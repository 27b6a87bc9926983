"""The daemon's enforcement side.

Policies reach the node two ways: ``envelope enforce`` writes a desired state under
``<state-dir>/enforce/`` (and applies it to the cgroups it finds), and the cluster sync applies
``LeastPrivilegePolicy`` objects through :meth:`NodeEnforcement.apply_policy`. Either way the
daemon then keeps every cgroup of the workload covered, present and future:

- at start it adopts what is pinned in bpffs (enforcement never stopped while it was away) and
  reconciles the desired states with the cgroups it observes;
- each new cgroup of an enforced workload gets the pinned egress programs at first sight, and
  is watched for seccomp denials;
- egress violations, seccomp denials and Landlock's refusals (-EACCES of the file syscalls of
  cgroups whose exec and file entries are enforced) are drained from the kernel into
  ``<state-dir>/violations.jsonl`` and the metrics;
- detection keeps running: every behaviour the sensor attributes to an enforced workload is
  judged against the policy's watch list and probabilistic detection rules;
- exceptions that start or lapse and mode changes are followed (``EnforcementSession.sync``);
- a re-baseline (``envelope rebaseline``) restarts the workload's observation window.
"""

from __future__ import annotations

import os
import time

import structlog

from enforcer.desired import read_desired
from enforcer.session import ApplyError, EnforcementSession
from enforcer.policy import Policy
from enforcer.state import rebaseline_generation
from enforcer.violations import Judge, Violation, ViolationStore
from sensor.state_dir import StateDir
from sensor.workload import Workload

from .config import Config

log = structlog.get_logger("envelope.enforcement")


class NodeEnforcement:
    def __init__(self, config: Config, session: EnforcementSession, metrics=None,
                 sync_interval: float = 2.0, drain_interval: float = 0.5):
        self.config = config
        self.metrics = metrics
        self.session = session
        self.store = ViolationStore(config.state_dir)
        self.sync_interval = sync_interval
        self.drain_interval = drain_interval
        self.observer = None
        self.judges: dict[Workload, Judge] = {}
        self._desired_sig: tuple | None = None
        self._generations: dict[Workload, int] = {}
        self._next_sync = 0.0
        self._next_drain = 0.0

    # -- wiring --------------------------------------------------------------------------------

    def start(self, observer) -> None:
        self.observer = observer
        observer.agg.listeners.append(self._observed)
        bindings = observer.agg.bindings
        self.session.session_of = lambda cid: (b.session if (b := bindings.get(cid)) else None)
        adopted = self.session.adopt_pinned()
        if adopted:
            log.info("adopted pinned enforcement", workloads=adopted)
        self._reconcile(force=True)

    def close(self) -> None:
        """Drain what is left; pinned programs and their attachments keep enforcing."""
        try:
            self._drain()
        finally:
            self.session.close()

    # -- policies ------------------------------------------------------------------------------

    def workload_cgroups(self, workload: Workload) -> list[str]:
        """The live cgroups of ``workload`` that this node has seen."""
        obs = self.observer
        if obs is None:
            return []
        paths = {obs.paths[cg] for cg, b in obs.agg.bindings.items()
                 if b.workload == workload and cg in obs.paths}
        return sorted(p for p in paths if os.path.isdir(p))

    def apply_policy(self, policy: Policy, mode: str, source: str = "daemon") -> list:
        """Apply ``policy`` in ``mode`` to every live cgroup of its workload; raises ApplyError
        (and counts an apply failure) when nothing could be applied."""
        try:
            results = self.session.apply(policy, mode, self.workload_cgroups(policy.workload),
                                          reason=f"applied by the daemon ({source})")
        except Exception as e:
            if self.metrics:
                self.metrics.apply_failure(policy.workload, "egress")
            log.error("policy apply failed", workload=policy.workload.key, source=source, error=str(e))
            raise e if isinstance(e, ApplyError) else ApplyError(str(e)) from e
        self._judge_for(policy, mode)
        log.info("policy applied", workload=policy.workload.key, mode=mode, source=source,
                 cgroups=len(results))
        return results

    def remove_policy(self, workload: Workload, source: str = "daemon") -> bool:
        """Stop enforcing ``workload``: detach, unpin, forget its desired state (audited)."""
        self.judges.pop(workload, None)
        removed = self.session.remove(workload, reason=f"removed by the daemon ({source})")
        if removed:
            log.info("enforcement removed", workload=workload.key, source=source)
        return removed

    def _judge_for(self, policy: Policy, mode: str) -> None:
        """Detection keeps running under enforcement: watch list, detection rules, and execs and
        file accesses and capabilities outside the policy that happened (reported: containers get
        Landlock from the launcher, which the daemon cannot see, so it does not claim they were
        enforced; the node does not drop capabilities)."""
        self.judges[policy.workload] = Judge(policy, policy.workload.key, report_execs=mode != "observe",
                                             report_files=mode != "observe",
                                             report_capabilities=mode != "observe")

    def _reconcile(self, force: bool = False) -> None:
        """Follow the desired states written by ``envelope enforce`` (only when they changed)."""
        d = StateDir(self.config.state_dir).enforce
        try:
            sig = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in d.glob("*.yaml")))
        except OSError:
            sig = ()
        if not force and sig == self._desired_sig:
            return
        self._desired_sig = sig
        desired = read_desired(self.config.state_dir)
        wanted = {w.key for w, _, _ in desired}
        for w, policy, mode in desired:
            cur = self.session.enforced.get(w.key)
            if cur is not None and cur.policy == policy and cur.mode == mode:
                if w not in self.judges:
                    self._judge_for(policy, mode)
                # new cgroups seen while we were away
                for path in self.workload_cgroups(w):
                    if path not in cur.cgroups:
                        self.session.attach_new_cgroup(w, path)
                continue
            try:
                self.apply_policy(policy, mode, source="desired state")
            except ApplyError:
                continue
        for key in list(self.session.enforced):
            if key not in wanted:  # removed with `envelope enforce --remove`: forget our handles
                self.judges.pop(self.session.enforced[key].workload, None)
                self.session.forget(key)
                log.info("enforcement removed", workload=key)

    # -- observation hooks ---------------------------------------------------------------------

    def on_bind(self, cgroup_id: int, ident) -> None:
        """A new cgroup: attach its workload's programs if the workload is enforced."""
        if ident.workload.key not in self.session.enforced or self.observer is None:
            return
        path = self.observer.paths.get(cgroup_id)
        if not path:
            return
        res = self.session.attach_new_cgroup(ident.workload, path)
        if not res.ok and self.metrics:
            self.metrics.apply_failure(ident.workload, "egress")

    def _observed(self, workload: Workload, session: str, key: str | None, count: int, ts: float) -> None:
        judge = self.judges.get(workload)
        if judge is None:
            return
        found = judge.close_session(session, ts) if key is None else judge.observe(session, key, count, ts)
        if found:
            self._record(found)

    # -- periodic work -------------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_drain:
            self._next_drain = now + self.drain_interval
            self._drain()
        if now >= self._next_sync:
            self._next_sync = now + self.sync_interval
            try:
                self.session.sync()
            except Exception as e:  # noqa: BLE001 - keep enforcing what is pinned
                log.error("exception/mode sync failed", error=str(e))
            self._reconcile()
            self._check_rebaseline()

    def _drain(self) -> None:
        try:
            found = self.session.poll_violations(0)
        except Exception as e:  # noqa: BLE001
            log.error("violation drain failed", error=str(e))
            return
        if found:
            self._record(found)

    def _record(self, violations: list[Violation]) -> None:
        self.store.append(violations)
        for v in violations:
            log.warning("violation", workload=v.workload, substrate=v.substrate, behaviour=v.behaviour,
                        action=v.action, count=v.count)
            if self.metrics:
                self.metrics.violation(v.workload, v.action, v.substrate, v.count)

    def _check_rebaseline(self) -> None:
        agg = self.observer.agg if self.observer else None
        if agg is None:
            return
        for w in list(agg.profiles):
            gen = rebaseline_generation(self.config.state_dir, w)
            seen = self._generations.setdefault(w, gen)
            if gen > seen:
                agg.restart_window(w)
                self._generations[w] = gen
                log.info("re-baseline: new observation window", workload=w.key, generation=gen)
