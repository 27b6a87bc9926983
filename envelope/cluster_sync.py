"""The node daemon's Kubernetes side: pod identity, WorkloadProfile publishing, policy application
and stale detection, all off the daemon's poll loop.

:meth:`ClusterSync.maybe` decides from ``config.cluster`` whether the API is used at all:

``off``   never;
``auto``  only inside a pod (``KUBERNETES_SERVICE_HOST`` is set); an API that cannot be
          configured is a warning and the daemon runs node-local;
``on``    always (in-cluster config, else ``config.kubeconfig`` or the default kubeconfig); an
          API that cannot be configured is a :class:`~envelope.errors.UserError`.

What runs where
    * ``kube``: a :class:`sensor.kube.KubeWatcher` (its own thread) lists and watches the pods
      of this node; the identity resolver asks it for owners and fingerprints and falls back to
      OCI annotations and cgroup paths while the API is unreachable.
    * publishing: :meth:`publish` (called on every flush) only snapshots this node's changed
      contributions; a :class:`sensor.crd.PublisherThread` writes them as WorkloadProfile
      objects in ``config.profile_namespace``. :meth:`close` makes the last attempt.
    * policies: a thread reads every LeastPrivilegePolicy each ``config.policy_sync_interval``
      seconds and acts on the ones whose generation or content changed (below).
    * :meth:`tick`, in the daemon's loop: cheap and never blocking on the network. It takes a
      snapshot of the observer's bindings (for stale detection), runs queued egress applications
      (:meth:`NodeEnforcement.apply_policy` touches the same cgroup bindings and BPF programs as
      the loop's ``on_bind``, so it runs in the loop's thread), and starts the new observation
      window of a workload that was re-baselined.

Acting on a policy (once per generation and content; a transient failure is tried again at the
next sync)
    1. compile its OCI seccomp profile in the policy's mode, with the container runtime's
       completeness set (:func:`enforcer.runtime.default_runtime`), and write it to
       ``<kubelet seccomp dir>/envelope/<namespace>/<kind>_<name>_<container>.json``. This is
       done for **every** policy, not only for workloads with a pod on this node: the kubelet
       reads the file when it starts a container, and a pod scheduled here later must find it
       already in place or fail to start;
    2. egress, when the daemon enforces (``enforcement`` is not None) and ``spec.mode`` is
       ``alert`` or ``enforce``: ``enforcement.apply_policy(policy, mode, source="cluster")``,
       which covers the workload's current cgroups and those that appear later. A policy that
       was enforced and is now ``observe`` is applied in ``observe`` so its programs stop
       denying. A policy that constrains egress on a node without enforcement is ``failed``;
    3. report this node's entry in ``status.nodes``: ``applied`` with ``localhostProfile``,
       ``mode``, ``seccompDigest`` and ``cgroups``, or ``failed`` with the reason (a malformed
       policy object is ``failed`` too). Failures count in
       ``envelope_policy_apply_failures_total``.

    Files of policies that are gone are removed after a complete list (see the README: drop the
    ``seccompProfile`` reference from the pod spec first, or set ``spec.mode: observe``, which
    turns the file into an allow-all profile).

Stale detection (every sync, every policy with a recorded validity fingerprint)
    The fingerprints of the workload's running containers on this node (fresh from the pod
    cache, else those the container was bound with) are checked with
    :func:`enforcer.validity.check`. A fired trigger calls
    :func:`enforcer.crd.on_fingerprint_change` once per change: an audit entry
    (``policy.stale``), the ``envelope_policy_stale`` metric, the policy's ``Stale`` condition
    and, with ``config.rebaseline_on_stale``, alert mode and a new observation window. A policy
    whose current generation the cluster already holds as Stale is not marked again.

Failures
    Every API call retries with capped exponential backoff (:func:`sensor.crd.call_with_retry`)
    and has a request timeout; each failed attempt counts in ``envelope_api_errors_total``. No
    failure leaves a thread or reaches the daemon's loop: it is logged and tried again later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import structlog

from enforcer import validity
from enforcer.crd import (
    GROUP, PLURAL, VERSION, ClusterPolicies, ClusterPolicy, PolicyCRError, on_fingerprint_change,
    policy_from_cr,
)
from enforcer.kubelet import KubeletSeccompDir, SeccompWriteError, localhost_profile
from enforcer.runtime import default_runtime
from enforcer.seccomp import SeccompCompileError, compile_oci
from sensor.crd import (
    Backoff, ClusterApiError, ClusterProfiles, ProfilePublisher, PublisherThread, api_client,
    call_with_retry,
)
from sensor.kube import Backoff as WatchBackoff
from sensor.kube import KubeWatcher
from sensor.workload import Workload

from .errors import UserError

log = structlog.get_logger("envelope.cluster")

CLUSTER_MODES = ("auto", "on", "off")
#: (connect, read) seconds for every custom-object call; a black-holed API server must not hold
#: a thread (or the shutdown flush) forever.
REQUEST_TIMEOUT = (5.0, 30.0)
#: seconds between snapshots of the observer's bindings taken in :meth:`ClusterSync.tick`.
SNAPSHOT_INTERVAL = 1.0
#: API attempts per call in the final flush on shutdown.
CLOSE_ATTEMPTS = 2
EGRESS_MODES = ("alert", "enforce")


class _TimedApi:
    """A ``CustomObjectsApi`` whose calls all carry ``_request_timeout`` unless one is given."""

    def __init__(self, api, timeout=REQUEST_TIMEOUT):
        self._api = api
        self._timeout = timeout

    def __getattr__(self, name: str):
        fn = getattr(self._api, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            kwargs.setdefault("_request_timeout", self._timeout)
            return fn(*args, **kwargs)

        return call


@dataclass(frozen=True)
class Seen:
    """A container bound by the observer, as the loop saw it (for stale detection)."""

    workloads: frozenset  # the binding's workload and the resolver's current one
    pod_uid: str | None
    pod_name: str | None
    container_id: str | None
    container_name: str | None
    fingerprints: dict = field(default_factory=dict)


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
    retry: bool = False  # a transient failure: act again at the next sync
    egress: bool = False  # egress programs were applied for it


@dataclass
class _EgressJob:
    outcome: Outcome  # the draft (seccomp done); the loop completes it
    mode: str


def content_digest(obj: dict) -> str:
    """What a policy object is, for "did it change": its generation and spec."""
    meta = obj.get("metadata") or {}
    doc = {"generation": meta.get("generation"), "spec": obj.get("spec")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _where(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _spec_workload(obj: dict) -> Workload | None:
    try:
        return Workload.from_dict((obj.get("spec") or {})["workload"])
    except (KeyError, TypeError, ValueError):
        return None


class ClusterSync:
    """Everything the daemon does with the Kubernetes API (see the module docstring)."""

    def __init__(self, config, metrics, client, *, backoff: Backoff | None = None,
                 watch_backoff: WatchBackoff | None = None, watch_timeout: int = 300,
                 publish_retry: float = 30.0, request_timeout=REQUEST_TIMEOUT):
        from kubernetes.client import CustomObjectsApi

        self.config = config
        self.metrics = metrics
        self.node = config.node_name
        self._stop = threading.Event()
        self._wake = threading.Event()
        base = backoff or Backoff()
        # retry sleeps end as soon as close() is called
        self.backoff = dataclasses.replace(base, sleep=self._stop.wait) if base.sleep is time.sleep else base
        objects = _TimedApi(CustomObjectsApi(client), request_timeout)
        self.kube = KubeWatcher(self.node, client, fingerprint_keys=config.fingerprint_annotations,
                                backoff=watch_backoff, watch_timeout=watch_timeout)
        self.profiles = ClusterProfiles(objects, namespace=config.profile_namespace, backoff=self.backoff,
                                        on_api_error=self._api_error)
        self.publisher = PublisherThread(ProfilePublisher(self.profiles, self.node, on_result=self._published),
                                         retry_interval=publish_retry)
        self.policies = ClusterPolicies(objects, self.node, backoff=self.backoff, on_api_error=self._api_error)
        self.seccomp_dir = KubeletSeccompDir.from_config(config)
        self.observer = None
        self.enforcement = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # shared with the loop (under _lock)
        self._seen: list[Seen] = []
        self._jobs: dict[tuple[str, str], _EgressJob] = {}
        self._done: list[Outcome] = []
        self._release: list[Workload] = []
        self._next_snapshot = 0.0
        self._kube_failures_seen = 0
        # the policy thread's own
        self._outcomes: dict[tuple[str, str], Outcome] = {}
        self._pending: dict[tuple[str, str], str] = {}  # queued for the loop: key -> digest
        self._egress_applied: set[Workload] = set()
        self._stale: dict[tuple[str, str], list] = self._load_stale()  # key -> signature of the change handled
        self._stale_cluster: dict[tuple[str, str], tuple[str, bool]] = {}  # cluster steps to retry
        self._stale_metric: dict[Workload, bool] = {}
        self.stats = {"syncs": 0, "sync_failures": 0, "applied": 0, "failed": 0, "stale": 0}
        self.last_error: str | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def maybe(cls, config, metrics, **kw) -> "ClusterSync | None":
        """A ClusterSync with its pod watcher started, or None when the API is not to be used."""
        mode = getattr(config, "cluster", "auto")
        if isinstance(mode, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
            mode = "on" if mode else "off"
        if mode not in CLUSTER_MODES:
            raise UserError(f"config cluster: {mode!r} is not one of {', '.join(CLUSTER_MODES)}")
        if mode == "off":
            return None
        if mode == "auto" and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            log.info("not in a pod: the Kubernetes API is not used (cluster: auto)", node=config.node_name)
            return None
        try:
            client = api_client(config.kubeconfig)
        except ClusterApiError as e:
            if mode == "on":
                raise UserError(f"cluster: on, but {e}") from None
            log.warning("kubernetes api not configured; profiles stay on the node and policies are not "
                        "read (identities come from OCI annotations and cgroups)", error=str(e))
            return None
        sync = cls(config, metrics, client, **kw)
        sync.kube.start()
        log.info("kubernetes api configured", node=sync.node, host=client.configuration.host,
                 profile_namespace=config.profile_namespace)
        return sync

    # ---- the daemon's hooks ------------------------------------------------------------------

    def start(self, observer=None, enforcement=None) -> None:
        self.observer = observer
        self.enforcement = enforcement
        self.kube.start()
        if self.publisher._thread is None:
            self.publisher.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="envelope-policies", daemon=True)
            self._thread.start()

    def tick(self) -> None:
        """One step of the daemon's loop: no network, bounded work."""
        try:
            self._tick()
        except Exception as e:  # noqa: BLE001 - the loop must go on
            log.error("cluster tick failed", error=f"{type(e).__name__}: {e}")

    def publish(self, profiles, written: Iterable[Workload] | None = None) -> None:
        """Hand this node's flushed contributions to the publishing thread (a snapshot)."""
        try:
            self.publisher.publish(profiles, written)
        except Exception as e:  # noqa: BLE001 - a flush must not fail on the cluster side
            log.error("profile snapshot for publishing failed", error=f"{type(e).__name__}: {e}")

    def close(self, timeout: float = 20.0) -> bool:
        """Stop the threads, then write what is still unpublished (one short last attempt).
        True when every profile was published."""
        # Calls in flight read ``attempts`` before each retry: lowering it first makes them give
        # up after this one; the retry sleeps end when _stop is set.
        for b in {id(b): b for b in (self.backoff, self.profiles.backoff, self.policies.backoff)}.values():
            b.attempts = min(b.attempts, CLOSE_ATTEMPTS)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            ok = self.publisher.close(timeout)
        except Exception as e:  # noqa: BLE001 - shutdown goes on
            log.error("final profile publishing failed", error=f"{type(e).__name__}: {e}")
            ok = False
        self.kube.stop()
        log.info("cluster sync stopped", node=self.node, published=ok)
        return ok

    # ---- counting ----------------------------------------------------------------------------

    def _api_error(self, what: str, exc: BaseException | None = None) -> None:
        if self.metrics is not None:
            self.metrics.api_error(what, exc)

    def _published(self, result) -> None:
        if self.metrics is not None:
            self.metrics.published(result)

    def _apply_failure(self, workload: Workload, substrate: str) -> None:
        if self.metrics is not None:
            self.metrics.apply_failure(workload, substrate)

    def _set_stale_metric(self, workload: Workload, stale: bool) -> None:
        if self._stale_metric.get(workload) == stale:
            return
        self._stale_metric[workload] = stale
        if self.metrics is not None:
            self.metrics.set_stale(workload, stale)

    # ---- the loop's side ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if self.observer is not None and now >= self._next_snapshot:
            self._next_snapshot = now + SNAPSHOT_INTERVAL
            seen = self._snapshot()
            with self._lock:
                self._seen = seen
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
        failures = self.kube.failures
        if failures > self._kube_failures_seen:
            for _ in range(failures - self._kube_failures_seen):
                self._api_error("watch pods")
            self._kube_failures_seen = failures

    def _snapshot(self) -> list[Seen]:
        agg, resolver = self.observer.agg, self.observer.resolver
        out = []
        for cg, b in list(agg.bindings.items()):
            ident = resolver.peek(cg)
            if ident is None or ident.container is None:
                continue
            out.append(Seen(frozenset({b.workload, ident.workload}), ident.pod_uid, ident.pod_name,
                            ident.container.container_id, ident.container_name, dict(ident.fingerprints)))
        return out

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
                o.cgroups = len(results)
                o.egress = True
        if o.state == "failed":
            self._apply_failure(policy.workload, "egress")
            log.warning("egress policy not applied", policy=f"{o.cp.namespace}/{o.cp.name}",
                        workload=policy.workload.key, mode=job.mode, error=o.reason)
        else:
            log.info("egress policy applied", policy=f"{o.cp.namespace}/{o.cp.name}",
                     workload=policy.workload.key, mode=job.mode, cgroups=o.cgroups)
        return o

    def _release_egress(self, workload: Workload) -> None:
        remove = getattr(self.enforcement, "remove_policy", None)
        if remove is None:
            log.warning("policy deleted but its egress programs stay: the enforcement has no remove_policy",
                        workload=workload.key)
            return
        try:
            remove(workload, source="cluster")
            log.info("egress policy removed", workload=workload.key)
        except Exception as e:  # noqa: BLE001
            log.error("egress policy not removed", workload=workload.key, error=f"{type(e).__name__}: {e}")

    # ---- the policy thread -------------------------------------------------------------------

    def _run(self) -> None:
        interval = max(0.01, float(self.config.policy_sync_interval))
        next_sync = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_sync:
                self.sync_policies()
                next_sync = time.monotonic() + interval
            else:
                self._collect()
            self._wake.wait(max(0.0, next_sync - time.monotonic()))
            self._wake.clear()

    def _list_policy_objects(self) -> list[dict]:
        items: list[dict] = []
        token = None
        api = self.policies.api
        while True:
            kw: dict[str, Any] = {"limit": 200}
            if token:
                kw["_continue"] = token
            page = call_with_retry(lambda: api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw),
                                   f"list {PLURAL}", self.backoff, self._api_error)
            items += list(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def sync_policies(self) -> bool:
        """One round: list, act on changes, detect staleness, prune, report. Never raises;
        False when the policies could not be read."""
        try:
            return self._sync()
        except Exception as e:  # noqa: BLE001 - the thread must outlive any one failure
            self.stats["sync_failures"] += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("policy sync failed", node=self.node, error=self.last_error)
            return False

    def _sync(self) -> bool:
        self._collect()
        try:
            objs = self._list_policy_objects()
        except ClusterApiError as e:
            self.stats["sync_failures"] += 1
            self.last_error = str(e)
            log.warning("policies not read; trying again at the next sync", node=self.node, error=str(e))
            return False
        self.stats["syncs"] += 1
        current: dict[tuple[str, str], ClusterPolicy] = {}
        keep: set[Workload] = set()
        for obj in sorted(objs, key=_where):
            key = _where(obj)
            meta = obj.get("metadata") or {}
            try:
                cp = ClusterPolicy(policy_from_cr(obj), key[0], key[1], meta.get("generation"), obj)
            except PolicyCRError as e:
                w = _spec_workload(obj)
                if w is not None:
                    keep.add(w)  # the last good profile stays until the object is fixed or deleted
                # status writes need only where the object is and its generation
                cp = ClusterPolicy(None, key[0], key[1], meta.get("generation"), obj)  # type: ignore[arg-type]
                self._malformed(cp, key, str(e))
                current[key] = cp
                continue
            current[key] = cp
            keep.add(cp.workload)
            self._act(cp, key)
        self._forget(current)
        self._detect_stale([cp for cp in current.values() if cp.policy is not None])
        self._prune(keep)
        self._collect()
        self._report_all(current)
        return True

    def _malformed(self, cp: ClusterPolicy, key: tuple[str, str], reason: str) -> None:
        digest = content_digest(cp.obj)
        prev = self._outcomes.get(key)
        if prev is not None and prev.digest == digest:
            return
        self._outcomes[key] = Outcome(cp, digest, "failed", reason)
        self._pending.pop(key, None)
        self.stats["failed"] += 1
        w = _spec_workload(cp.obj)
        self._apply_failure(w.key if w else f"{key[0]}/{key[1]}", "syscall")
        log.warning("policy not applied: malformed object", policy=f"{key[0]}/{key[1]}", error=reason)

    def _act(self, cp: ClusterPolicy, key: tuple[str, str]) -> None:
        digest = content_digest(cp.obj)
        prev = self._outcomes.get(key)
        if prev is not None and prev.digest == digest and not prev.retry:
            prev.cp = cp  # same content; keep the newest object for status writes
            return
        if self._pending.get(key) == digest:
            return  # queued for the loop already
        policy, w = cp.policy, cp.workload
        mode = policy.mode
        o = Outcome(cp, digest, "applied", mode=mode)
        self._write_seccomp(o)
        if o.state == "failed":
            self._apply_failure(w, "syscall")
            self._record(key, o)
            return
        constrains_egress = "egress" in policy.substrates and mode in EGRESS_MODES
        if self.enforcement is None:
            if constrains_egress:
                o.state = "failed"
                o.reason = (f"egress: the policy's {mode} mode needs egress enforcement, which is not "
                            f"running on node {self.node}; the seccomp profile is in place")
                self._apply_failure(w, "egress")
            self._record(key, o)
            return
        if mode in EGRESS_MODES or w in self._egress_applied:
            with self._lock:
                self._jobs[key] = _EgressJob(o, mode)
            self._pending[key] = digest
            return
        self._record(key, o)

    def _write_seccomp(self, o: Outcome) -> None:
        """Compile the policy's OCI profile and write it for the kubelet; fills ``o``."""
        policy, w = o.cp.policy, o.cp.workload
        try:
            localhost_profile(w)
        except SeccompWriteError as e:  # a name the kubelet dir cannot hold: fails for good
            o.state, o.reason = "failed", f"seccomp: {e}"
            return
        try:
            compiled = compile_oci(policy, o.mode, runtime=default_runtime(w.kind, w.namespace))
            written = self.seccomp_dir.write(w, compiled)
        except SeccompCompileError as e:
            o.state, o.reason = "failed", f"seccomp: {e}"
        except SeccompWriteError as e:
            o.state, o.reason, o.retry = "failed", f"seccomp: {e}", True
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: this policy's failure, not the thread's
            o.state, o.reason, o.retry = "failed", f"seccomp: {type(e).__name__}: {e}", True
        else:
            o.localhost_profile, o.seccomp_digest = written.localhost_profile, written.digest

    def _record(self, key: tuple[str, str], o: Outcome) -> None:
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

    def _forget(self, current: dict[tuple[str, str], ClusterPolicy]) -> None:
        live = {cp.workload for cp in current.values() if cp.policy is not None}
        for key in [k for k in self._outcomes if k not in current]:
            o = self._outcomes.pop(key)
            self._pending.pop(key, None)
            if self._stale.pop(key, None) is not None:
                self._save_stale()
            self._stale_cluster.pop(key, None)
            w = o.cp.workload if o.cp.policy is not None else None
            log.info("policy deleted", policy=f"{key[0]}/{key[1]}", workload=w.key if w else None)
            if w is not None and w not in live:
                self._set_stale_metric(w, False)
                if w in self._egress_applied:
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

    def _report(self, key: tuple[str, str], o: Outcome) -> bool:
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
            fields["stale"] = key in self._stale
        return self.policies.report(o.cp, o.state, o.reason, **fields)

    def _report_all(self, current: dict[tuple[str, str], ClusterPolicy]) -> None:
        for key, cp in sorted(current.items()):
            o = self._outcomes.get(key)
            if o is None:
                continue  # waiting for the loop
            o.cp = cp if content_digest(cp.obj) == o.digest else o.cp
            self._report(key, o)  # unchanged entries are not written again; failed writes are

    # ---- stale detection ---------------------------------------------------------------------

    def current_fingerprints(self, seen: Seen) -> dict[str, str]:
        """A container's fingerprint now: from the pod cache when the API knows the pod (pod
        annotations can change in place), else what it was bound with."""
        if seen.pod_uid:
            ident = self.kube.identity(seen.pod_uid, container_id=seen.container_id,
                                       container_name=seen.container_name)
            if ident is not None and ident.container_name and ident.fingerprints:
                return dict(ident.fingerprints)
        return dict(seen.fingerprints)

    def _detect_stale(self, policies: list[ClusterPolicy]) -> None:
        with self._lock:
            seen = list(self._seen)
        for cp in policies:
            key, w = (cp.namespace, cp.name), cp.workload
            recorded = cp.policy.validity.get("fingerprint") or {}
            if not recorded:
                self._set_stale_metric(w, cp.stale)
                continue  # nothing recorded to compare against
            fired: dict[str, set] = {}
            details: list[str] = []
            checked = set()
            for s in seen:
                if w not in s.workloads:
                    continue
                fps = self.current_fingerprints(s)
                sig = json.dumps(fps, sort_keys=True)
                if sig in checked:
                    continue
                checked.add(sig)
                for t in validity.check(cp.policy, fps)["triggers"]:
                    if t["fired"]:
                        fired.setdefault(t["key"], set()).add(str(t["current"]))
                        details.append(f"{s.pod_name or s.pod_uid}: {t['reason']}")
            if not fired:
                if self._stale.pop(key, None) is not None:
                    self._save_stale()
                self._set_stale_metric(w, cp.stale)
                continue
            signature = [json.dumps(recorded, sort_keys=True, default=str),
                         [[k, sorted(v)] for k, v in sorted(fired.items())]]
            self._set_stale_metric(w, True)
            if self._stale.get(key) == signature:
                self._retry_stale_cluster(key, cp)
                continue  # this change was handled (also before a restart: the memory is on disk)
            self._stale[key] = signature
            self._save_stale()
            # Every node audits and re-baselines its own evidence; the cluster steps are skipped
            # when another node already marked this generation (and moved it to alert).
            cluster = not cp.stale or (bool(self.config.rebaseline_on_stale) and cp.policy.mode == "enforce")
            self._on_stale(key, cp, sorted(fired), "; ".join(sorted(set(details)))[:2000], cluster)

    # the changes already handled, kept across restarts so a restart neither audits nor
    # re-baselines the same change twice
    def _stale_path(self):
        from pathlib import Path

        return Path(self.config.state_dir) / "cluster" / "stale.json"

    def _load_stale(self) -> dict[tuple[str, str], list]:
        try:
            doc = json.loads(self._stale_path().read_text())
            return {(str(e["namespace"]), str(e["name"])): e["signature"] for e in doc.get("handled") or []}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("stale-change memory unreadable; starting empty", path=str(self._stale_path()),
                        error=str(e))
            return {}

    def _save_stale(self) -> None:
        from sensor.state_dir import atomic_write

        doc = {"handled": [{"namespace": k[0], "name": k[1], "signature": v} for k, v in sorted(self._stale.items())]}
        path = self._stale_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        except OSError as e:
            log.warning("stale-change memory not saved", path=str(path), error=str(e))

    def _on_stale(self, key: tuple[str, str], cp: ClusterPolicy, changed: list[str], detail: str,
                  cluster: bool = True) -> None:
        rebaseline = bool(self.config.rebaseline_on_stale)
        try:
            out = on_fingerprint_change(self.config.state_dir, cp.workload, changed, cp=cp,
                                        policies=self.policies if cluster else None, rebaseline=rebaseline,
                                        metrics=self.metrics,
                                        detail=detail, actor=f"envelope-daemon/{self.node}")
        except Exception as e:  # noqa: BLE001 - e.g. the audit log cannot be written: try again
            self._stale.pop(key, None)
            self._save_stale()
            log.error("stale policy not handled; trying again at the next sync", policy=f"{key[0]}/{key[1]}",
                      error=f"{type(e).__name__}: {e}")
            return
        self.stats["stale"] += 1
        self._stale_metric[cp.workload] = True
        # A re-baseline bumps the workload's rebaseline generation; the daemon's enforcement side
        # follows every re-baseline (this one or `envelope rebaseline`) and restarts the window.
        if not cluster:
            return
        wants_alert = rebaseline and cp.policy.mode == "enforce" and out.get("cluster_mode") != "alert"
        if not out.get("stale_condition") or wants_alert:
            message = f"fingerprint inputs changed: {', '.join(changed)}" + (f" ({detail})" if detail else "")
            self._stale_cluster[key] = (message, wants_alert)

    def _retry_stale_cluster(self, key: tuple[str, str], cp: ClusterPolicy) -> None:
        """The cluster half of a stale reaction that failed on the API: the condition, and the
        move to alert mode when re-baselining."""
        pending = self._stale_cluster.get(key)
        if pending is None:
            return
        message, wants_alert = pending
        if wants_alert and cp.policy.mode == "enforce":
            changed = self.policies.set_mode(cp, "alert")
            if changed is None:
                return
            cp, wants_alert = changed, False
        if not cp.stale and not self.policies.mark_stale(cp, "FingerprintChanged", message):
            self._stale_cluster[key] = (message, wants_alert)
            return
        self._stale_cluster.pop(key, None)
