"""Identity through the Kubernetes API: owners, workload naming and fingerprints (the AI-BOM).

Two layers:

* Pure functions over API objects as JSON dicts (the shape ``kubectl get -o json`` prints):
  :func:`resolve_owner`, :func:`workload_from_pod_name`, :func:`container_fingerprints`,
  :func:`fingerprint_changes`. They import nothing from the ``kubernetes`` package and are
  tested against recorded objects.
* :class:`KubeWatcher`, a thin wrapper around the official ``kubernetes`` client: it lists and
  watches the pods of one node (field selector ``spec.nodeName``), fetches owners and service
  accounts on demand with a cache, and retries every failed call with exponential backoff.
  It never raises into its caller: while the API is unreachable it answers None and the
  resolver falls back to OCI annotations and cgroup paths.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

# ---- naming rules (pure) ---------------------------------------------------------------------

# k8s.io/apimachinery/pkg/util/rand: generated names and template hashes use this alphabet
# (no vowels, no 0/1/3) -- SafeEncodeString for pod-template-hash, String(5) for generateName.
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_DEPLOY_POD = re.compile(rf"^(?P<name>.+)-(?P<hash>[{_SAFE}]{{4,10}})-(?P<suffix>[{_SAFE}]{{5}})$")
_CRONJOB_POD = re.compile(rf"^(?P<name>.+)-(?P<sched>\d{{8,10}})-(?P<suffix>[{_SAFE}]{{5}})$")
_CRONJOB_JOB = re.compile(r"^(?P<name>.+)-(?P<sched>\d{8,10})$")
_ORDINAL_POD = re.compile(r"^(?P<name>.+)-(?P<ordinal>0|[1-9]\d*)$")
_GENERATED_POD = re.compile(rf"^(?P<name>.+)-(?P<suffix>[{_SAFE}]{{5}})$")


def _is_statefulset_ordinal(s: str) -> bool:
    # A generateName suffix can be all digits too ("24578"), but only 5 long and never with
    # 0, 1 or 3, which the generator's alphabet lacks.
    return len(s) < 5 or any(c in "013" for c in s)


def workload_from_pod_name(pod_name: str, labels: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(kind, name) of the controller that most likely made ``pod_name``.

    Labels, when known, decide first: ``pod-template-hash`` (Deployment),
    ``statefulset.kubernetes.io/pod-name`` (StatefulSet), ``controller-revision-hash`` with
    ``pod-template-generation`` (DaemonSet), ``job-name`` (Job, or CronJob when the job name
    ends in a schedule time). Without labels the name rules are:

    * ``<deploy>-<hash>-<xxxxx>`` -> Deployment (hash and suffix from the generator alphabet);
    * ``<cronjob>-<minutes since epoch>-<xxxxx>`` -> CronJob;
    * ``<name>-<ordinal>`` -> StatefulSet;
    * ``<name>-<xxxxx>`` -> DaemonSet (a generated suffix with no template hash);
    * anything else -> the Pod itself.
    """
    labels = labels or {}
    h = labels.get("pod-template-hash")
    if h:
        m = re.match(rf"^(?P<name>.+)-{re.escape(h)}-[^-]+$", pod_name)
        if m:
            return "Deployment", m["name"]
    if labels.get("statefulset.kubernetes.io/pod-name"):
        m = _ORDINAL_POD.match(pod_name)
        if m:
            return "StatefulSet", m["name"]
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    if job:
        m = _CRONJOB_JOB.match(job)
        return ("CronJob", m["name"]) if m else ("Job", job)
    if labels.get("controller-revision-hash") and labels.get("pod-template-generation"):
        if "-" in pod_name:
            return "DaemonSet", pod_name.rsplit("-", 1)[0]
    m = _CRONJOB_POD.match(pod_name)
    if m and any(c in "013" for c in m["sched"]):
        return "CronJob", m["name"]
    m = _DEPLOY_POD.match(pod_name)
    if m:
        return "Deployment", m["name"]
    m = _ORDINAL_POD.match(pod_name)
    if m and _is_statefulset_ordinal(m["ordinal"]):
        return "StatefulSet", m["name"]
    m = _GENERATED_POD.match(pod_name)
    if m:
        return "DaemonSet", m["name"]
    return "Pod", pod_name


# ---- owner resolution (pure over a lookup) ---------------------------------------------------

Lookup = Callable[[str, str, str], "dict | None"]  # (kind, namespace, name) -> object or None


def _meta(obj: Mapping) -> Mapping:
    return obj.get("metadata") or {}


def controller_ref(obj: Mapping) -> dict | None:
    """The owner reference with ``controller: true`` (or the only owner), or None."""
    refs = _meta(obj).get("ownerReferences") or []
    for r in refs:
        if r.get("controller"):
            return r
    return refs[0] if len(refs) == 1 else None


def resolve_owner(pod: Mapping, get: Lookup | None = None) -> tuple[str, str]:
    """(kind, name) of the top-level controller of ``pod``.

    pod -> ReplicaSet -> Deployment, pod -> Job -> CronJob; StatefulSet, DaemonSet and any other
    controller are taken from the pod's own reference. ``get`` fetches an owner object; when
    it cannot (None), the pod-template-hash and CronJob naming rules stand in. A pod without a
    controller is its own workload (kind ``Pod``)."""
    get = get or (lambda kind, ns, name: None)
    meta = _meta(pod)
    ns = meta.get("namespace", "default")
    labels = meta.get("labels") or {}
    ref = controller_ref(pod)
    if ref is None:
        return "Pod", meta.get("name", "")
    kind, name = ref.get("kind", ""), ref.get("name", "")
    if kind == "ReplicaSet":
        rs = get("ReplicaSet", ns, name)
        if rs is not None:
            top = controller_ref(rs)
            return (top["kind"], top["name"]) if top else ("ReplicaSet", name)
        h = labels.get("pod-template-hash") or ""
        if h and name.endswith("-" + h):
            return "Deployment", name[: -len(h) - 1]
        return "ReplicaSet", name
    if kind == "Job":
        job = get("Job", ns, name)
        if job is not None:
            top = controller_ref(job)
            return (top["kind"], top["name"]) if top else ("Job", name)
        m = _CRONJOB_JOB.match(name)
        return ("CronJob", m["name"]) if m else ("Job", name)
    return kind, name


# ---- fingerprints (pure) ---------------------------------------------------------------------

DEFAULT_FINGERPRINT_KEYS: dict[str, str] = {
    "model": "envelope.dev/model-version",
    "prompt_template": "envelope.dev/prompt-template",
    "tool_catalog": "envelope.dev/tool-catalog",
}

# Cloud workload identity: annotation on the ServiceAccount (also accepted on the pod).
CLOUD_IDENTITY_KEYS: dict[str, str] = {
    "cloud_identity:aws": "eks.amazonaws.com/role-arn",
    "cloud_identity:gcp": "iam.gke.io/gcp-service-account",
    "cloud_identity:azure": "azure.workload.identity/client-id",
}


def image_digest(image_id: str) -> str:
    """``sha256:...`` from a containerStatus ``imageID`` (``docker-pullable://repo@sha256:..``,
    ``docker.io/library/x@sha256:..`` or a bare ``sha256:..``); other forms are kept as given."""
    s = image_id
    for scheme in ("docker-pullable://", "docker://", "containerd://"):
        if s.startswith(scheme):
            s = s[len(scheme):]
    if "@" in s:
        s = s.rsplit("@", 1)[1]
    return s


def _container_status(pod: Mapping, container: str) -> Mapping | None:
    status = pod.get("status") or {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            if cs.get("name") == container:
                return cs
    return None


def container_fingerprints(pod: Mapping, container: str, service_account: Mapping | None = None,
                           keys: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fingerprint inputs of one container of a pod, as ``{key: value}``.

    * ``image``: the digest the node actually runs (``status.containerStatuses[].imageID``);
      absent until the kubelet reports it;
    * ``service_account``: the pod's service account name;
    * ``cloud_identity:aws|gcp|azure``: the workload-identity annotations of the service
      account (or of the pod);
    * one entry per ``keys`` item (default ``model``, ``prompt_template``, ``tool_catalog``),
      from the pod's annotations, else its labels;
    * ``pod_template_hash``: ``pod-template-hash`` (Deployments) or ``controller-revision-hash``
      (StatefulSets, DaemonSets), so a rollout is visible without resetting learning.
    """
    keys = DEFAULT_FINGERPRINT_KEYS if keys is None else keys
    meta = _meta(pod)
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    spec = pod.get("spec") or {}
    out: dict[str, str] = {}
    cs = _container_status(pod, container)
    if cs and cs.get("imageID"):
        out["image"] = image_digest(cs["imageID"])
    out["service_account"] = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    sa_ann = _meta(service_account).get("annotations") or {} if service_account else {}
    for fkey, akey in CLOUD_IDENTITY_KEYS.items():
        v = sa_ann.get(akey) or ann.get(akey)
        if v:
            out[fkey] = str(v)
    for fkey, akey in keys.items():
        v = ann.get(akey)
        if v is None:
            v = labels.get(akey)
        if v is not None and v != "":
            out[fkey] = str(v)
    h = labels.get("pod-template-hash") or labels.get("controller-revision-hash")
    if h:
        out["pod_template_hash"] = h
    return dict(sorted(out.items()))


def fingerprint_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Keys whose value differs between two fingerprints (added, removed or changed), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def pod_container_name(pod: Mapping, container_id: str) -> str | None:
    """The container name whose status carries ``container_id`` (``containerd://<id>``...)."""
    status = pod.get("status") or {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            cid = cs.get("containerID") or ""
            if cid.rsplit("//", 1)[-1] == container_id:
                return cs.get("name")
    return None


@dataclass(frozen=True)
class PodIdentity:
    """What the API says about one container of a pod."""

    namespace: str
    pod_name: str
    pod_uid: str
    kind: str
    name: str
    container_name: str | None
    labels: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)


def pod_identity(pod: Mapping, get: Lookup | None = None, container_id: str | None = None,
                 container_name: str | None = None, keys: Mapping[str, str] | None = None) -> PodIdentity:
    """Owner, names and fingerprints of a container of ``pod`` (pure over ``get``)."""
    meta = _meta(pod)
    ns = meta.get("namespace", "default")
    kind, name = resolve_owner(pod, get)
    cname = container_name or (pod_container_name(pod, container_id) if container_id else None)
    sa_name = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    sa = get("ServiceAccount", ns, sa_name) if get else None
    fps = container_fingerprints(pod, cname, sa, keys) if cname else {}
    return PodIdentity(ns, meta.get("name", ""), meta.get("uid", ""), kind, name, cname,
                       dict(meta.get("labels") or {}), fps)


# ---- the watcher (thin, impure) --------------------------------------------------------------


class Backoff:
    """Exponential backoff with jitter: initial, initial*factor, ... capped at ``maximum``."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.2, rng: random.Random | None = None):
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        base = min(self.maximum, self.initial * (self.factor ** self.attempt))
        self.attempt += 1
        return base * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


class _Gone(Exception):
    """The watch's resourceVersion expired (HTTP 410); relist."""


_OWNER_KINDS = ("ReplicaSet", "Job", "ServiceAccount")


class KubeWatcher:
    """Pods of one node from the API, kept current by a list+watch loop on a daemon thread.

    Every API call is wrapped: failures are logged, counted in :attr:`failures`, and retried
    with :class:`Backoff`. Reads (:meth:`pod`, :meth:`identity`) never raise and never block on
    the network for pods; owner and service-account lookups make at most one bounded call per
    object per ``owner_ttl`` and return None while the API is down."""

    def __init__(self, node_name: str, api_client=None, *, kubeconfig: str | None = None,
                 fingerprint_keys: Mapping[str, str] | None = None, backoff: Backoff | None = None,
                 watch_timeout: int = 300, request_timeout: float = 10.0, owner_ttl: float = 300.0,
                 tombstone_ttl: float = 900.0, retry_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        from kubernetes import client as k8s  # imported here: the pure layer above needs none

        if api_client is None:
            api_client = make_api_client(kubeconfig)
        self.node_name = node_name
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)
        self._ApiException = k8s.exceptions.ApiException
        self.keys = dict(DEFAULT_FINGERPRINT_KEYS if fingerprint_keys is None else fingerprint_keys)
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.owner_ttl = owner_ttl
        self.tombstone_ttl = tombstone_ttl
        self.retry_after = retry_after  # seconds before a failed owner lookup is tried again
        self.clock = clock
        self._lock = threading.Lock()
        self._pods: dict[str, dict] = {}  # uid -> pod
        self._deleted: dict[str, float] = {}  # uid -> when deleted (kept for late lookups)
        self._objects: dict[tuple[str, str, str], tuple[float, dict | None]] = {}
        self._retry_at: dict[tuple[str, str, str], float] = {}  # failed lookups wait until then
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp = None  # the open watch response, closed by stop()
        self.synced = threading.Event()  # set after the first successful list
        self.generation = 0  # bumped on every pod change
        self.failures = 0
        self.last_error: str | None = None
        self.resource_version: str | None = None

    # -- lifecycle --

    def start(self) -> "KubeWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kube-pod-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:  # unblock a watch that is waiting for the next event
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
                self.backoff.reset()
            except _Gone:
                self.resource_version = None
                continue
            except Exception as e:  # noqa: BLE001 - the loop must survive anything the API does
                if self._stop.is_set():
                    break
                self._failed("pod list/watch", e)
                self._stop.wait(self.backoff.next())

    def _failed(self, what: str, e: BaseException) -> None:
        self.failures += 1
        status = getattr(e, "status", None)
        detail = f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else str(e)[:200]
        self.last_error = f"{what}: {type(e).__name__}: {detail}"
        self._log("warning", "kubernetes api call failed", call=what, node=self.node_name,
                  error=self.last_error, failures=self.failures)

    @staticmethod
    def _log(level: str, event: str, **kw) -> None:
        # A broken log sink (a closed stream) must not stop the watch thread.
        try:
            getattr(log, level)(event, **kw)
        except Exception:  # noqa: BLE001
            pass

    # -- list + watch --

    def _selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    def sync_once(self) -> None:
        """One list (when there is no resourceVersion) followed by one watch until it ends."""
        if self.resource_version is None:
            resp = self.core.list_pod_for_all_namespaces(
                field_selector=self._selector(), _preload_content=False,
                _request_timeout=self.request_timeout)
            body = json.loads(resp.data)
            pods = {(_meta(p).get("uid") or ""): p for p in body.get("items") or []}
            with self._lock:
                now = self.clock()
                for uid in set(self._pods) - set(pods):
                    self._deleted.setdefault(uid, now)  # gone while we were not watching
                for uid in pods:
                    self._deleted.pop(uid, None)
                self._pods.update(pods)
                self.generation += 1
                self._expire_locked()
            self.resource_version = _meta(body).get("resourceVersion")
            self.synced.set()
            self._log("info", "kubernetes pods listed", node=self.node_name, pods=len(pods))
        self._watch()

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        resp = self.core.list_pod_for_all_namespaces(
            field_selector=self._selector(), watch=True, resource_version=self.resource_version,
            allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
            _preload_content=False, _request_timeout=(self.request_timeout, self.watch_timeout + 5))
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if line.strip():
                    self.apply_event(json.loads(line))
        finally:
            self._resp = None
            resp.release_conn()

    def apply_event(self, event: Mapping) -> None:
        """Apply one watch event (``{"type": ..., "object": {...}}``) to the pod cache."""
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message", "resource version too old"))
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        rv = _meta(obj).get("resourceVersion")
        if rv:
            self.resource_version = rv
        if etype == "BOOKMARK":
            return
        uid = _meta(obj).get("uid")
        if not uid:
            return
        with self._lock:
            self._pods[uid] = dict(obj)
            if etype == "DELETED":
                self._deleted[uid] = self.clock()
            else:
                self._deleted.pop(uid, None)
            self.generation += 1
            self._expire_locked()

    def _expire_locked(self) -> None:
        now = self.clock()
        for uid, t in list(self._deleted.items()):
            if now - t > self.tombstone_ttl:
                self._deleted.pop(uid, None)
                self._pods.pop(uid, None)

    # -- reads (never raise) --

    def pod(self, uid: str) -> dict | None:
        with self._lock:
            return self._pods.get(uid)

    def pod_by_name(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            for p in self._pods.values():
                m = _meta(p)
                if m.get("namespace") == namespace and m.get("name") == name:
                    return p
        return None

    def get_object(self, kind: str, namespace: str, name: str) -> dict | None:
        """An owner (ReplicaSet, Job) or ServiceAccount, from cache or one API call."""
        key = (kind, namespace, name)
        now = self.clock()
        hit = self._objects.get(key)
        if hit is not None and now - hit[0] < self.owner_ttl:
            return hit[1]
        if now < self._retry_at.get(key, 0.0):  # failed recently: do not wait on the API again
            return hit[1] if hit else None
        reader = {
            "ReplicaSet": self.apps.read_namespaced_replica_set,
            "Job": self.batch.read_namespaced_job,
            "ServiceAccount": self.core.read_namespaced_service_account,
        }.get(kind)
        if reader is None:
            return None
        try:
            resp = reader(name, namespace, _preload_content=False, _request_timeout=self.request_timeout)
            obj = json.loads(resp.data)
        except self._ApiException as e:
            if e.status == 404:
                self._objects[key] = (now, None)
                self._retry_at.pop(key, None)
            else:
                self._failed(f"get {kind} {namespace}/{name}", e)
                self._retry_at[key] = now + self.retry_after
                return hit[1] if hit else None
            return None
        except Exception as e:  # noqa: BLE001 - network errors of any kind
            self._failed(f"get {kind} {namespace}/{name}", e)
            self._retry_at[key] = now + self.retry_after
            return hit[1] if hit else None
        self._objects[key] = (now, obj)
        self._retry_at.pop(key, None)
        return obj

    def identity(self, pod_uid: str, container_id: str | None = None,
                 container_name: str | None = None) -> PodIdentity | None:
        """Owner, names and fingerprints of a container, or None if the pod is not known."""
        try:
            pod = self.pod(pod_uid)
            if pod is None:
                return None
            return pod_identity(pod, self.get_object, container_id, container_name, self.keys)
        except Exception as e:  # noqa: BLE001 - never crash the caller
            self._failed(f"identity of pod {pod_uid}", e)
            return None


def make_api_client(kubeconfig: str | None = None, host: str | None = None):
    """An ApiClient: in-cluster config, else ``kubeconfig``, else an explicit ``host``.

    urllib3's own retries are switched off so :class:`Backoff` alone decides when to retry."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    cfg = k8s.Configuration()
    if host:
        cfg.host = host
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.retries = False
    return k8s.ApiClient(cfg)


def watcher_from_environment(node_name: str, fingerprint_keys: Mapping[str, str] | None = None,
                             kubeconfig: str | None = None, **kw) -> KubeWatcher | None:
    """A started :class:`KubeWatcher` when an API is configured (in-cluster service account or a
    kubeconfig), else None. Never raises: without an API the resolver uses OCI and cgroups."""
    import os

    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return None
    try:
        return KubeWatcher(node_name, make_api_client(kubeconfig), fingerprint_keys=fingerprint_keys, **kw).start()
    except Exception as e:  # noqa: BLE001 - a broken kubeconfig must not stop the sensor
        log.warning("kubernetes api not configured; identities come from OCI annotations and cgroups",
                    error=f"{type(e).__name__}: {e}")
        return None
