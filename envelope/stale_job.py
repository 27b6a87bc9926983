"""The daemon's stale-detection job: is a policy still valid for what runs on this node?

Every ``interval`` seconds, for every LeastPrivilegePolicy (from the policy informer's store)
with a recorded validity fingerprint, the fingerprints of the workload's running containers on
this node are checked with :func:`enforcer.validity.check`: fresh from the pod cache
(:class:`sensor.pods.PodWatcher`, since pod annotations can change in place), else those the
container was bound with. The containers come from a snapshot of the observer's bindings that
:meth:`StaleJob.tick` takes in the daemon's loop (at most once a second, no network).

Fingerprint inputs observed at run time (the ``model`` of a workload's model API requests, from
the request capture) are checked the same way, each value observed: a model the policy was not
derived under fires ``model-version-change`` as an annotation change would.

A fired trigger calls :func:`enforcer.leastprivilegepolicy.on_fingerprint_change` once per
change (:func:`enforcer.policy_actions.stale_signature`; the memory is kept in
``<state-dir>/cluster/stale.json`` across restarts): an audit entry (``policy.stale``), the
``envelope_policy_stale`` metric, the policy's ``Stale`` condition and, with
``rebaseline_on_stale``, alert mode and a new observation window. A generation the cluster
already holds as Stale is not marked again (:func:`enforcer.policy_actions.takes_cluster_steps`);
a cluster step that failed on the API is tried again at the next round.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from enforcer import policy_actions as rules
from enforcer import validity
from enforcer.leastprivilegepolicy import ClusterPolicies, ClusterPolicy, PolicyCRError, on_fingerprint_change
from sensor.kubeapi import Informer
from sensor.state_dir import StateDir, atomic_write
from sensor.workload import Workload

from .job import Job

log = structlog.get_logger("envelope.stale_job")

#: seconds between snapshots of the observer's bindings taken in :meth:`StaleJob.tick`.
SNAPSHOT_INTERVAL = 1.0
Key = tuple[str, str]


@dataclass(frozen=True)
class Seen:
    """A container bound by the observer, as the loop saw it."""

    workloads: frozenset  # the binding's workload and the resolver's current one
    pod_uid: str | None
    pod_name: str | None
    container_id: str | None
    container_name: str | None
    fingerprints: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # key -> values observed at run time (the model)


class StaleJob(Job):
    """See the module docstring. ``pods`` is the :class:`~sensor.pods.PodWatcher` (or None)."""

    name = "envelope-stale"

    def __init__(self, node: str, policies: ClusterPolicies, informer: Informer, pods, *, state_dir,
                 rebaseline: bool = False, metrics=None, interval: float = 15.0,
                 on_change: Callable[[], None] | None = None):
        super().__init__(interval)
        self.node = node
        self.policies = policies
        self.informer = informer
        self.pods = pods
        self.state_dir = Path(state_dir)
        self.rebaseline = bool(rebaseline)
        self.metrics = metrics
        self.on_change = on_change
        self.observer = None
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._next_snapshot = 0.0
        self._stale: dict[Key, list] = self._load()  # key -> signature of the change handled
        self._cluster_retry: dict[Key, tuple[str, bool]] = {}
        self._metric: dict[Workload, bool] = {}
        self.stats = {"rounds": 0, "stale": 0}

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, observer=None) -> "StaleJob":
        self.observer = observer
        self.start_thread()
        return self

    def is_stale_here(self, key: Key) -> bool:
        return key in self._stale

    # ---- the loop's side ---------------------------------------------------------------------

    def tick(self) -> None:
        """Snapshot the observer's bindings (no network, at most once a second)."""
        now = time.monotonic()
        if self.observer is None or now < self._next_snapshot:
            return
        self._next_snapshot = now + SNAPSHOT_INTERVAL
        try:
            seen = self._snapshot()
        except Exception as e:  # noqa: BLE001 - the loop must go on
            log.error("binding snapshot failed", error=f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self._seen = seen

    def _snapshot(self) -> list[Seen]:
        agg, resolver = self.observer.agg, self.observer.binding.resolver
        out = []
        for cg, b in list(agg.bindings.items()):
            ident = resolver.peek(cg)
            if ident is None or ident.container is None:
                continue
            runtime = {k: sorted(v) for k, v in agg.runtime_fingerprints.get(cg, {}).items()}
            out.append(Seen(frozenset({b.workload, ident.workload}), ident.pod_uid, ident.pod_name,
                            ident.container.container_id, ident.container_name, dict(ident.fingerprints),
                            runtime))
        return out

    # ---- the job's thread --------------------------------------------------------------------

    def current_fingerprints(self, seen: Seen) -> dict[str, str]:
        """A container's fingerprint now: from the pod cache when the API knows the pod, else
        what it was bound with."""
        if seen.pod_uid and self.pods is not None:
            ident = self.pods.identity(seen.pod_uid, container_id=seen.container_id,
                                       container_name=seen.container_name)
            if ident is not None and ident.container_name and ident.fingerprints:
                return dict(ident.fingerprints)
        return dict(seen.fingerprints)

    def _set_metric(self, workload: Workload, stale: bool) -> None:
        if self._metric.get(workload) == stale:
            return
        self._metric[workload] = stale
        if self.metrics is not None:
            self.metrics.set_stale(workload, stale)

    def round(self) -> None:
        try:
            if not self.informer.synced.is_set():
                return
            policies = []
            for obj in self.informer.items():
                try:
                    policies.append(self.policies.wrap(obj))
                except PolicyCRError:
                    continue
            self._detect(policies)
            self.stats["rounds"] += 1
        except Exception as e:  # noqa: BLE001 - the thread must outlive any one failure
            log.error("stale detection round failed", node=self.node, error=f"{type(e).__name__}: {e}")

    def _detect(self, policies: list[ClusterPolicy]) -> None:
        with self._lock:
            seen = list(self._seen)
        live = {(cp.namespace, cp.name) for cp in policies}
        for key in [k for k in self._stale if k not in live]:  # deleted policies
            self._stale.pop(key)
            self._cluster_retry.pop(key, None)
            self._save()
        for cp in policies:
            key, w = (cp.namespace, cp.name), cp.workload
            recorded = cp.policy.validity.get("fingerprint") or {}
            if not recorded:
                self._set_metric(w, cp.stale)
                continue
            fired: dict[str, set] = {}
            details: list[str] = []
            checked = set()
            for s in seen:
                if w not in s.workloads:
                    continue
                base = self.current_fingerprints(s)
                # every value observed at run time (a model the requests asked for) is checked
                # like an annotation: one check per value
                variants = [base] + [{**base, k: v} for k, vals in sorted(s.runtime.items()) for v in vals]
                for fps in variants:
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
                    self._save()
                    self._changed()
                self._set_metric(w, cp.stale)
                continue
            signature = rules.stale_signature(recorded, fired)
            self._set_metric(w, True)
            if self._stale.get(key) == signature:
                self._retry_cluster(key, cp)
                continue  # this change was handled (also before a restart: the memory is on disk)
            self._stale[key] = signature
            self._save()
            cluster = rules.takes_cluster_steps(cp.stale, self.rebaseline, cp.policy.mode)
            self._handle(key, cp, sorted(fired), "; ".join(sorted(set(details)))[:2000], cluster)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _handle(self, key: Key, cp: ClusterPolicy, changed: list[str], detail: str, cluster: bool) -> None:
        try:
            out = on_fingerprint_change(self.state_dir, cp.workload, changed, cp=cp,
                                        policies=self.policies if cluster else None, rebaseline=self.rebaseline,
                                        metrics=self.metrics, detail=detail, actor=f"envelope-daemon/{self.node}")
        except Exception as e:  # noqa: BLE001 - e.g. the audit log cannot be written: try again
            self._stale.pop(key, None)
            self._save()
            log.error("stale policy not handled; trying again at the next round", policy=f"{key[0]}/{key[1]}",
                      error=f"{type(e).__name__}: {e}")
            return
        self.stats["stale"] += 1
        self._metric[cp.workload] = True
        # A re-baseline bumps the workload's rebaseline generation; the daemon's enforcement side
        # follows every re-baseline and restarts the observation window.
        if not cluster:
            return
        wants_alert = self.rebaseline and cp.policy.mode == "enforce" and out.get("cluster_mode") != "alert"
        if not out.get("stale_condition") or wants_alert:
            message = f"fingerprint inputs changed: {', '.join(changed)}" + (f" ({detail})" if detail else "")
            self._cluster_retry[key] = (message, wants_alert)

    def _retry_cluster(self, key: Key, cp: ClusterPolicy) -> None:
        """The cluster half of a stale reaction that failed on the API."""
        pending = self._cluster_retry.get(key)
        if pending is None:
            return
        message, wants_alert = pending
        if wants_alert and cp.policy.mode == "enforce":
            changed = self.policies.set_mode(cp, "alert")
            if changed is None:
                return
            cp, wants_alert = changed, False
        if not cp.stale and not self.policies.mark_stale(cp, "FingerprintChanged", message):
            self._cluster_retry[key] = (message, wants_alert)
            return
        self._cluster_retry.pop(key, None)

    # ---- memory across restarts --------------------------------------------------------------

    def _path(self) -> Path:
        return StateDir(self.state_dir).cluster / "stale.json"

    def _load(self) -> dict[Key, list]:
        try:
            doc = json.loads(StateDir(self.state_dir).read(self._path()))
            return {(str(e["namespace"]), str(e["name"])): e["signature"] for e in doc.get("handled") or []}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("stale-change memory unreadable; starting empty", path=str(self._path()), error=str(e))
            return {}

    def _save(self) -> None:
        doc = {"handled": [{"namespace": k[0], "name": k[1], "signature": v} for k, v in sorted(self._stale.items())]}
        path = self._path()
        try:
            atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        except OSError as e:
            log.warning("stale-change memory not saved", path=str(path), error=str(e))
