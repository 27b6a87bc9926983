"""The daemon's policy-application job: LeastPrivilegePolicy objects, watched, acted on, reported.

The policies come from an :class:`~sensor.kubeapi.Informer` (list once, then watch with
bookmarks; a ``410 Gone`` relists). The job's thread wakes on every change and every
``interval`` seconds (retries of transient failures), reads the informer's store (no API call)
and, for each policy whose generation or content changed (:func:`enforcer.policy_actions.content_digest`):

1. compiles its OCI seccomp profile (:func:`enforcer.policy_actions.kubelet_seccomp`) in the
   policy's mode and writes it to ``<kubelet seccomp dir>/envelope/<namespace>/<kind>_<name>_<container>.json``,
   for **every** policy, not only for workloads with a pod on this node: the kubelet reads the
   file when it starts a container, and a pod scheduled here later must find it in place;
2. egress (:func:`enforcer.policy_actions.egress_step`): queues
   ``enforcement.apply_policy(policy, mode, source="cluster")`` for the daemon's loop thread
   (it touches the same cgroup bindings and BPF programs as the loop's ``on_bind``), which
   :meth:`PolicyJob.tick` runs; a deleted policy's programs are removed with
   ``enforcement.remove_policy(workload, source="cluster")``;
3. reports this node's entry in ``status.nodes`` (``applied`` or ``failed`` with the reason);
   failures count in ``envelope_policy_apply_failures_total``.

Every round also writes the shared conditions that need it: ``Ready`` from ``status.nodes``
(:func:`enforcer.policy_actions.ready_condition`) and a ``Stale`` judgement carried to a new
generation or cleared by a re-derivation (:func:`enforcer.policy_actions.stale_followup`).
Files of deleted policies are pruned once the informer has a complete list.

The API calls (status writes) run on this job's thread with the request timeouts of
:mod:`sensor.kubeapi`; nothing here blocks the daemon's loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import structlog

from enforcer import policy_actions as rules
from enforcer.kubelet import KubeletSeccompDir, SeccompWriteError, localhost_profile
from enforcer.leastprivilegepolicy import ClusterPolicies, ClusterPolicy, PolicyCRError, condition
from enforcer.seccomp import SeccompCompileError
from sensor.kubeapi import Informer, object_key
from sensor.workload import Workload

from .job import Job

log = structlog.get_logger("envelope.policy_job")

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Outcome:
    """What this node did with one policy object: the status entry it reports."""

    cp: ClusterPolicy
    digest: str
    state: str
    reason: str = ""
    localhost_profile: str | None = None
    seccomp_digest: str | None = None
    mode: str | None = None
    cgroups: int | None = None
    retry: bool = False  # a transient failure: act again at the next round
    egress: bool = False  # egress programs were applied for it


@dataclass
class _EgressJob:
    outcome: Outcome  # the draft (seccomp done); the loop completes it
    mode: str


def _spec_workload(obj: dict) -> Workload | None:
    try:
        return Workload.from_dict((obj.get("spec") or {})["workload"])
    except (KeyError, TypeError, ValueError):
        return None


class PolicyJob(Job):
    """See the module docstring. ``stale_here(key)`` says whether this node found the policy
    stale (reported as ``status.nodes[].stale``)."""

    name = "envelope-policies"

    def __init__(self, node: str, policies: ClusterPolicies, informer: Informer, seccomp_dir: KubeletSeccompDir,
                 *, enforcement=None, metrics=None, interval: float = 15.0,
                 stale_here: Callable[[Key], bool] | None = None, clock: Callable[[], float] = time.time,
                 exceptions: Callable[[Workload], Mapping[str, str]] | None = None):
        super().__init__(interval)
        self.node = node
        self.policies = policies
        self.informer = informer
        self.seccomp_dir = seccomp_dir
        self.enforcement = enforcement
        self.metrics = metrics
        self.stale_here = stale_here or (lambda key: False)
        self.clock = clock
        # this node's syscall exceptions of a workload (name -> rule), compiled into its profile
        self.exceptions = exceptions or (lambda w: {})
        self._lock = threading.Lock()
        # shared with the loop (under _lock)
        self._jobs: dict[Key, _EgressJob] = {}
        self._done: list[Outcome] = []
        self._release: list[Workload] = []
        # the job's own
        self._outcomes: dict[Key, Outcome] = {}
        self._pending: dict[Key, str] = {}  # queued for the loop: key -> digest
        self._egress_applied: set[Workload] = set()
        self.stats = {"rounds": 0, "applied": 0, "failed": 0, "conditions": 0}
        self.last_error: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "PolicyJob":
        self.start_thread()
        return self

    # ---- the loop's side ---------------------------------------------------------------------

    def tick(self) -> None:
        """One step of the daemon's loop: run queued egress applications; no network."""
        try:
            with self._lock:
                jobs, self._jobs = list(self._jobs.values()), {}
                release, self._release = self._release, []
            done = [self._run_job(j) for j in jobs]
            for w in release:
                self._release_egress(w)
            if done:
                with self._lock:
                    self._done += done
                self._wake.set()
        except Exception as e:  # noqa: BLE001 - the loop must go on
            log.error("policy tick failed", error=f"{type(e).__name__}: {e}")

    def _run_job(self, job: _EgressJob) -> Outcome:
        o = job.outcome
        policy = o.cp.policy
        try:
            results = list(self.enforcement.apply_policy(policy, job.mode, source="cluster") or [])
        except Exception as e:  # noqa: BLE001 - any failure is this policy's, reported in its status
            o.state, o.reason, o.retry = "failed", f"egress: {e}", True
        else:
            bad = [r for r in results if not getattr(r, "ok", False)]
            if bad:
                o.state, o.retry = "failed", True
                o.reason = "egress: " + "; ".join(f"{r.cgroup}: {r.error}" for r in bad)
            else:
                o.cgroups, o.egress = len(results), True
        if o.state == "failed":
            self._apply_failure(policy.workload, "egress")
            log.warning("egress policy not applied", policy=f"{o.cp.namespace}/{o.cp.name}",
                        workload=policy.workload.key, mode=job.mode, error=o.reason)
        else:
            log.info("egress policy applied", policy=f"{o.cp.namespace}/{o.cp.name}",
                     workload=policy.workload.key, mode=job.mode, cgroups=o.cgroups)
        return o

    def _release_egress(self, workload: Workload) -> None:
        try:
            self.enforcement.remove_policy(workload, source="cluster")
            log.info("egress policy removed", workload=workload.key)
        except Exception as e:  # noqa: BLE001
            log.error("egress policy not removed", workload=workload.key, error=f"{type(e).__name__}: {e}")

    # ---- the job's thread --------------------------------------------------------------------

    def _apply_failure(self, workload, substrate: str) -> None:
        if self.metrics is not None:
            self.metrics.apply_failure(workload, substrate)

    def round(self) -> bool:
        """One round over the informer's store. Never raises; False before the first list."""
        try:
            self._collect()
            if not self.informer.synced.is_set():
                return False
            self._round(self.informer.items())
            self.stats["rounds"] += 1
            return True
        except Exception as e:  # noqa: BLE001 - the thread must outlive any one failure
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("policy round failed", node=self.node, error=self.last_error)
            return False

    def _round(self, objs: list[dict]) -> None:
        current: dict[Key, ClusterPolicy] = {}
        keep: set[Workload] = set()
        for obj in sorted(objs, key=object_key):
            key = object_key(obj)
            meta = obj.get("metadata") or {}
            try:
                cp = self.policies.wrap(obj)
            except PolicyCRError as e:
                w = _spec_workload(obj)
                if w is not None:
                    keep.add(w)  # the last good profile stays until the object is fixed or deleted
                cp = ClusterPolicy(None, key[0], key[1], meta.get("generation"), obj)  # type: ignore[arg-type]
                self._malformed(cp, key, str(e))
                current[key] = cp
                continue
            current[key] = cp
            keep.add(cp.workload)
            self._act(cp, key)
        self._forget(current)
        self._prune(keep)
        self._collect()
        for key, cp in sorted(current.items()):
            o = self._outcomes.get(key)
            if o is not None:
                o.cp = cp if self._digest(cp) == o.digest else o.cp
                self._report(key, o)  # unchanged entries are not written again
            if cp.policy is not None:
                self._conditions(cp)

    def _conditions(self, cp: ClusterPolicy) -> None:
        now = self.clock()
        wanted = [rules.ready_condition(cp.obj, now)]
        followup = rules.stale_followup(cp.obj, now)
        if followup is not None:
            wanted.append(followup)
        for cond in wanted:
            if rules.condition_differs(condition(cp.obj, cond["type"]), cond):
                if self.policies.apply_condition(cp, cond):
                    self.stats["conditions"] += 1

    def _malformed(self, cp: ClusterPolicy, key: Key, reason: str) -> None:
        digest = rules.content_digest(cp.obj)
        prev = self._outcomes.get(key)
        if prev is not None and prev.digest == digest:
            return
        self._outcomes[key] = Outcome(cp, digest, "failed", reason)
        self._pending.pop(key, None)
        self.stats["failed"] += 1
        w = _spec_workload(cp.obj)
        self._apply_failure(w.key if w else f"{key[0]}/{key[1]}", "syscall")
        log.warning("policy not applied: malformed object", policy=f"{key[0]}/{key[1]}", error=reason)

    def _digest(self, cp: ClusterPolicy) -> str:
        """The policy object's content and the exceptions its profile carries: an exception that
        starts or lapses rewrites the kubelet profile at the next round."""
        if cp.policy is None:  # malformed: nothing is compiled for it
            return rules.content_digest(cp.obj)
        sig = ",".join(f"{k}={v}" for k, v in sorted(self.exceptions(cp.workload).items()))
        return f"{rules.content_digest(cp.obj)}:{sig}"

    def _act(self, cp: ClusterPolicy, key: Key) -> None:
        digest = self._digest(cp)
        prev = self._outcomes.get(key)
        if prev is not None and prev.digest == digest and not prev.retry:
            prev.cp = cp  # same content; keep the newest object for status writes
            return
        if self._pending.get(key) == digest:
            return  # queued for the loop already
        policy, w = cp.policy, cp.workload
        o = Outcome(cp, digest, "applied", mode=policy.mode)
        self._write_seccomp(o)
        if o.state == "failed":
            self._apply_failure(w, "syscall")
            self._record(key, o)
            return
        step = rules.egress_step(policy, policy.mode, enforcing=self.enforcement is not None,
                                 applied_before=w in self._egress_applied)
        if step == "fail":
            o.state = "failed"
            o.reason = (f"egress: the policy's {policy.mode} mode needs egress enforcement, which is not "
                        f"running on node {self.node}; the seccomp profile is in place")
            self._apply_failure(w, "egress")
        elif step == "apply":
            with self._lock:
                self._jobs[key] = _EgressJob(o, policy.mode)
            self._pending[key] = digest
            return
        self._record(key, o)

    def _write_seccomp(self, o: Outcome) -> None:
        """Compile the policy's kubelet profile and write it; fills ``o``."""
        policy, w = o.cp.policy, o.cp.workload
        try:
            localhost_profile(w)
        except SeccompWriteError as e:  # a name the kubelet dir cannot hold: fails for good
            o.state, o.reason = "failed", f"seccomp: {e}"
            return
        try:
            written = self.seccomp_dir.write(w, rules.kubelet_seccomp(policy, o.mode, self.exceptions(w)))
        except SeccompCompileError as e:
            o.state, o.reason = "failed", f"seccomp: {e}"
        except SeccompWriteError as e:
            o.state, o.reason, o.retry = "failed", f"seccomp: {e}", True
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: this policy's failure, not the thread's
            o.state, o.reason, o.retry = "failed", f"seccomp: {type(e).__name__}: {e}", True
        else:
            o.localhost_profile, o.seccomp_digest = written.localhost_profile, written.digest

    def _record(self, key: Key, o: Outcome) -> None:
        self._outcomes[key] = o
        self._pending.pop(key, None)
        if o.egress:
            self._egress_applied.add(o.cp.workload)
        self.stats["applied" if o.state == "applied" else "failed"] += 1
        log.info("policy acted on", policy=f"{o.cp.namespace}/{o.cp.name}", workload=o.cp.workload.key,
                 state=o.state, mode=o.mode, localhost_profile=o.localhost_profile, reason=o.reason or None,
                 generation=o.cp.generation)

    def _collect(self) -> None:
        """Take the egress outcomes the loop finished and report them."""
        with self._lock:
            done, self._done = self._done, []
        for o in done:
            key = (o.cp.namespace, o.cp.name)
            if self._pending.get(key) != o.digest:
                continue  # superseded by a newer version while the loop worked
            self._record(key, o)
            self._report(key, o)

    def _forget(self, current: dict[Key, ClusterPolicy]) -> None:
        live = {cp.workload for cp in current.values() if cp.policy is not None}
        for key in [k for k in self._outcomes if k not in current]:
            o = self._outcomes.pop(key)
            self._pending.pop(key, None)
            w = o.cp.workload if o.cp.policy is not None else None
            log.info("policy deleted", policy=f"{key[0]}/{key[1]}", workload=w.key if w else None)
            if w is not None and w not in live and w in self._egress_applied:
                self._egress_applied.discard(w)
                with self._lock:
                    self._release.append(w)
        for key in [k for k in self._pending if k not in current]:
            self._pending.pop(key, None)

    def _prune(self, keep: set[Workload]) -> None:
        wanted = set()
        for w in keep:
            try:
                localhost_profile(w)
                wanted.add(w)
            except SeccompWriteError:
                continue
        try:
            gone = self.seccomp_dir.prune(wanted)
        except Exception as e:  # noqa: BLE001
            log.warning("seccomp profiles of deleted policies not pruned", error=f"{type(e).__name__}: {e}")
            return
        for value in gone:
            log.info("seccomp profile of a deleted policy removed", localhost_profile=value)

    def _report(self, key: Key, o: Outcome) -> bool:
        fields: dict[str, Any] = {}
        if o.localhost_profile is not None:
            fields["localhost_profile"] = o.localhost_profile
        if o.mode is not None:
            fields["mode"] = o.mode
        if o.seccomp_digest is not None:
            fields["seccomp_digest"] = o.seccomp_digest
        if o.cgroups is not None:
            fields["cgroups"] = o.cgroups
        if o.cp.policy is not None:
            fields["stale"] = bool(self.stale_here(key))
        return self.policies.report(o.cp, o.state, o.reason, **fields)

