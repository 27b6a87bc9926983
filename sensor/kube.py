"""What Kubernetes objects say about a container: owners, workload naming and fingerprints
(the AI-BOM).

Pure functions over API objects as JSON dicts (the shape ``kubectl get -o json`` prints):
:func:`resolve_owner`, :func:`workload_from_pod_name`, :func:`container_fingerprints`,
:func:`fingerprint_changes`, :func:`pod_identity`. They import nothing from the ``kubernetes``
package and are tested against recorded objects. The pods of a node come from
:class:`sensor.pods.PodWatcher`; the API plumbing is :mod:`sensor.kubeapi`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

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
