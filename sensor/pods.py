"""The pods of one node, from the Kubernetes API, for identity resolution (the pod-watching job).

:class:`PodWatcher` keeps the node's pods current with an :class:`~sensor.kubeapi.Informer`
(field selector ``spec.nodeName``) and looks up what a pod's identity needs beyond the pod
(its owner: ReplicaSet or Job; its ServiceAccount, for cloud identities) on a thread of its own.
Lookups start as soon as a pod appears in the watch, usually before its containers run.

Nothing a reader calls waits on the network: :meth:`PodWatcher.identity` answers from the caches.
While an owner lookup is still on its first attempt the identity is not known yet (None: the
resolver falls back to OCI annotations and the cgroup path); :attr:`generation` is bumped when a
lookup finishes, so the resolver can ask again. A lookup that failed answers with the naming
rules (:func:`sensor.kube.resolve_owner`) and is tried again after ``retry_after`` seconds; an
answer older than ``owner_ttl`` is served while it is refreshed. A black-holed API server thus
costs the lookup thread its request timeout, never the daemon's loop.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Callable, Mapping

import structlog

from .kube import DEFAULT_FINGERPRINT_KEYS, PodIdentity, controller_ref, pod_identity
from .kubeapi import REQUEST_TIMEOUT, Backoff, Informer, describe, status_of, uid_key

log = structlog.get_logger("envelope.pods")

#: The objects a pod's identity may need, and how to read them.
OWNER_KINDS = ("ReplicaSet", "Job", "ServiceAccount")

Key = tuple[str, str, str]  # (kind, namespace, name)


def lookups_of(pod: Mapping) -> list[Key]:
    """The objects :func:`sensor.kube.pod_identity` asks for about ``pod`` (pure)."""
    meta = pod.get("metadata") or {}
    ns = meta.get("namespace", "default")
    out: list[Key] = []
    ref = controller_ref(pod)
    if ref is not None and ref.get("kind") in ("ReplicaSet", "Job"):
        out.append((ref["kind"], ns, ref.get("name", "")))
    sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    out.append(("ServiceAccount", ns, sa))
    return out


class PodWatcher:
    """Pods of one node (list+watch) plus their owners and service accounts (looked up off
    the caller's thread). See the module docstring."""

    def __init__(self, node_name: str, api_client, *, fingerprint_keys: Mapping[str, str] | None = None,
                 backoff: Backoff | None = None, watch_timeout: int = 300,
                 request_timeout=REQUEST_TIMEOUT, owner_ttl: float = 300.0, tombstone_ttl: float = 900.0,
                 retry_after: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[str, BaseException], None] | None = None):
        from kubernetes import client as k8s  # the pure layer (sensor.kube) needs none

        self.node_name = node_name
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)
        self.keys = dict(DEFAULT_FINGERPRINT_KEYS if fingerprint_keys is None else fingerprint_keys)
        self.request_timeout = request_timeout
        self.owner_ttl = owner_ttl
        self.tombstone_ttl = tombstone_ttl
        self.retry_after = retry_after
        self.clock = clock
        self.on_error = on_error
        self.informer = Informer("pods", self.core.list_pod_for_all_namespaces, key=uid_key,
                                 selectors={"field_selector": f"spec.nodeName={node_name}"},
                                 backoff=backoff, watch_timeout=watch_timeout, request_timeout=request_timeout,
                                 on_event=self._pod_event, on_error=self._error)
        self._lock = threading.Lock()
        self._deleted: dict[str, tuple[float, dict]] = {}  # uid -> (when, pod): late lookups
        self._objects: dict[Key, tuple[float, dict | None]] = {}  # answered lookups
        self._failed: dict[Key, float] = {}  # failed lookups -> when to try again
        self._queue: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self.failures = 0
        self.last_error: str | None = None

    # -- lifecycle --

    def start(self) -> "PodWatcher":
        self.informer.start()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._lookup_loop, name="kube-owner-lookups", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self.informer.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def synced(self) -> threading.Event:
        return self.informer.synced

    @property
    def generation(self) -> int:
        """Bumped on every pod change and every finished lookup (the resolver re-asks then)."""
        return self.informer.generation + self._generation

    @property
    def running(self) -> bool:
        return self.informer.running and self._thread is not None and self._thread.is_alive()

    # -- events --

    def _error(self, what: str, e: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{what}: {describe(e)}"
        if self.on_error is not None:
            try:
                self.on_error(what, e)
            except Exception:  # noqa: BLE001
                pass

    def _pod_event(self, etype: str, pod: dict, old: dict | None) -> None:
        uid = uid_key(pod)
        now = self.clock()
        with self._lock:
            if etype == "DELETED":
                self._deleted[uid] = (now, pod)
            else:
                self._deleted.pop(uid, None)
            for t_uid, (t, _) in list(self._deleted.items()):
                if now - t > self.tombstone_ttl:
                    self._deleted.pop(t_uid, None)
        if etype != "DELETED":
            for key in lookups_of(pod):
                self._want(key)

    # -- reads (never touch the network) --

    def pod(self, uid: str) -> dict | None:
        found = self.informer.get(uid)
        if found is not None:
            return found
        with self._lock:
            gone = self._deleted.get(uid)
        return gone[1] if gone else None

    def pod_by_name(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            tombstones = [p for _, p in self._deleted.values()]
        for p in self.informer.items() + tombstones:
            m = p.get("metadata") or {}
            if m.get("namespace") == namespace and m.get("name") == name:
                return p
        return None

    def cached(self, kind: str, namespace: str, name: str) -> tuple[bool, dict | None]:
        """``(known, object)`` for a lookup, from the cache only; queues a (re)fetch when the
        answer is missing, old, or failed long enough ago. ``known`` is False only while the
        first attempt is still on its way."""
        key = (kind, namespace, name)
        now = self.clock()
        with self._lock:
            hit = self._objects.get(key)
            failed_until = self._failed.get(key)
        if hit is not None:
            if now - hit[0] >= self.owner_ttl and (failed_until is None or now >= failed_until):
                self._want(key)  # served while it is refreshed
            return True, hit[1]
        if failed_until is not None:
            if now >= failed_until:
                self._want(key)
            return True, None  # the naming rules stand in
        self._want(key)
        return False, None

    def identity(self, pod_uid: str, container_id: str | None = None,
                 container_name: str | None = None) -> PodIdentity | None:
        """Owner, names and fingerprints of a container, or None while the pod (or its first
        owner lookup) is not known yet. Never raises, never waits on the API."""
        try:
            pod = self.pod(pod_uid)
            if pod is None:
                return None
            answers = {key: self.cached(*key) for key in lookups_of(pod)}
            if not all(known for known, _ in answers.values()):
                return None
            return pod_identity(pod, lambda kind, ns, name: answers.get((kind, ns, name), (True, None))[1],
                                container_id, container_name, self.keys)
        except Exception as e:  # noqa: BLE001 - never break the caller
            self._error(f"identity of pod {pod_uid}", e)
            return None

    # -- the lookup thread --

    def _want(self, key: Key) -> None:
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
            self._queue.append(key)
        self._wake.set()

    def _lookup_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                key = self._queue.popleft() if self._queue else None
            if key is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._fetch(key)
            finally:
                with self._lock:
                    self._queued.discard(key)
                self._generation += 1

    def _reader(self, kind: str):
        return {"ReplicaSet": self.apps.read_namespaced_replica_set,
                "Job": self.batch.read_namespaced_job,
                "ServiceAccount": self.core.read_namespaced_service_account}[kind]

    def fetch(self, kind: str, namespace: str, name: str) -> dict | None:
        """Look an object up now (on the caller's thread) and cache the answer; for tools and
        tests. The daemon's readers use :meth:`cached` and :meth:`identity`."""
        self._fetch((kind, namespace, name))
        return self._objects.get((kind, namespace, name), (0.0, None))[1]

    def _fetch(self, key: Key) -> None:
        kind, namespace, name = key
        now = self.clock()
        try:
            resp = self._reader(kind)(name, namespace, _preload_content=False,
                                      _request_timeout=self.request_timeout)
            obj = json.loads(resp.data)
        except Exception as e:  # noqa: BLE001 - network errors of any kind
            if status_of(e) == 404:
                obj = None
            else:
                self._error(f"get {kind} {namespace}/{name}", e)
                with self._lock:
                    self._failed[key] = now + self.retry_after
                return
        with self._lock:
            self._objects[key] = (now, obj)
            self._failed.pop(key, None)
