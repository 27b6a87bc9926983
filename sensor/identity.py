"""cgroup id -> identity: container, pod, namespace, workload and fingerprints.

Sources, in order of authority:

1. the Kubernetes API cache (:class:`sensor.pods.PodWatcher`), when configured;
2. the CRI annotations in the runtime's OCI ``config.json`` (found through runc's
   ``state.json``, containerd's task bundle, CRI-O's userdata or docker's container config);
3. the cgroup path alone (container id, pod uid, QoS).

A cgroup that is not a container maps to a host workload ``("host", "Unit", <systemd unit or
cgroup path>, "main")``.

Each cgroup id is resolved the first time it is seen and the facts are cached: short-lived
containers, and their runtime state, vanish soon after. An identity that is not complete yet
(a container whose runtime state was not written when the cgroup was first seen, or one the API
has not described yet) is looked up again by :meth:`Resolver.refresh` until it is complete or the
cgroup is gone; what is missing is kept as the entry's reason (:meth:`Resolver.why`).

All host paths are joined under ``host_root`` (the daemon may run in a pod with the host's
``/`` at ``/host``) with symlinks resolved inside that root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import structlog

from .cgroup import CgroupError, CgroupFS, ContainerRef, find_cgroup2_mount, host_unit_name, parse_container_ref
from .kube import workload_from_pod_name
from .workload import Workload

log = structlog.get_logger(__name__)

SANDBOX_CONTAINER = "POD"  # the kubelet's name for a pod's infra (pause) container
UNRESOLVED_NAMESPACE = "_unresolved"  # not a valid Kubernetes namespace, so it never collides


# ---- paths under a host root ----------------------------------------------------------------


class HostPathError(ValueError):
    """A host path that would leave the host root."""


def host_path(host_root: str | os.PathLike, path: str, max_links: int = 40) -> Path:
    """``path`` (absolute, as the host sees it) under ``host_root``, symlinks resolved within it.

    ``..`` never climbs above the host root and an absolute symlink restarts at the host root,
    as ``filepath-securejoin`` does; the result may not exist."""
    root = Path(host_root)
    if str(root) == "/":
        return Path("/" + str(path).lstrip("/"))
    pending = [p for p in str(path).split("/") if p]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > max_links:
                raise HostPathError(f"too many symlinks resolving {path} under {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


_SAFE_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]{0,127}$")


# ---- CRI annotations (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class CriInfo:
    """Pod and container names as the runtime recorded them in the OCI spec."""

    pod_name: str | None
    namespace: str | None
    pod_uid: str | None
    container_name: str | None
    sandbox: bool
    image: str | None = None
    labels: dict = field(default_factory=dict)


def _labels_json(raw: str | None) -> dict:
    if not raw or not isinstance(raw, str):
        return {}
    try:
        v = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}


def _crio_container_name(full: str | None) -> str | None:
    # io.kubernetes.cri-o.ContainerName: k8s_<container>_<pod>_<namespace>_<uid>_<attempt>
    if isinstance(full, str) and full.startswith("k8s_"):
        parts = full.split("_")
        if len(parts) >= 6:
            return parts[1]
    return None


def cri_from_annotations(ann: Mapping[str, str]) -> CriInfo | None:
    """Pod name, namespace, uid and container name from CRI annotations, or None if absent.

    containerd: ``io.kubernetes.cri.{sandbox-name,sandbox-namespace,sandbox-uid,container-name,
    container-type,image-name}``. CRI-O and docker (cri-dockerd labels):
    ``io.kubernetes.{pod.name,pod.namespace,pod.uid,container.name}``, with CRI-O's
    ``io.kubernetes.cri-o.{ContainerType,Labels,ContainerName,ImageName}`` as fallbacks."""
    crio_labels = _labels_json(ann.get("io.kubernetes.cri-o.Labels"))

    def pick(*keys: str) -> str | None:
        for k in keys:
            v = ann.get(k) or crio_labels.get(k)
            if v:
                return str(v)
        return None

    pod = pick("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name", "io.kubernetes.cri-o.Name")
    ns = pick("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace",
              "io.kubernetes.cri-o.Namespace")
    if not pod or not ns:
        return None
    ctype = pick("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType",
                 "io.kubernetes.docker.type") or "container"
    sandbox = ctype in ("sandbox", "podsandbox")
    cname = pick("io.kubernetes.cri.container-name", "io.kubernetes.container.name")
    if not cname:
        cname = _crio_container_name(ann.get("io.kubernetes.cri-o.ContainerName"))
    if sandbox:
        cname = SANDBOX_CONTAINER
    labels = {k: v for k, v in crio_labels.items() if not k.startswith("io.kubernetes.")}
    return CriInfo(pod_name=pod, namespace=ns,
                   pod_uid=pick("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
                   container_name=cname, sandbox=sandbox,
                   image=pick("io.kubernetes.cri.image-name", "io.kubernetes.cri-o.ImageName"),
                   labels=labels)


def labels_to_dict(labels: list | None) -> dict[str, str]:
    """runc's ``config.labels`` (``["key=value", ...]``) as a dict."""
    out: dict[str, str] = {}
    for item in labels or []:
        k, sep, v = str(item).partition("=")
        if sep:
            out[k] = v
    return out


# ---- runtime state on the host --------------------------------------------------------------

# runc state roots: runc's own default, containerd's runc shim (k8s.io namespace), CRI-O, docker
RUNC_ROOTS = ("/run/runc", "/run/containerd/runc/k8s.io", "/run/containerd/runc/moby",
              "/run/docker/runtime-runc/moby")
BUNDLE_DIRS = ("/run/containerd/io.containerd.runtime.v2.task/k8s.io",
               "/run/containerd/io.containerd.runtime.v2.task/moby")
CRIO_USERDATA = ("/run/containers/storage/overlay-containers",
                 "/var/lib/containers/storage/overlay-containers")
DOCKER_CONTAINERS = "/var/lib/docker/containers"


class RuntimeState:
    """Finds a container's OCI annotations among the runtimes' state on the host."""

    def __init__(self, host_root: str | os.PathLike = "/", runc_roots=RUNC_ROOTS, bundle_dirs=BUNDLE_DIRS,
                 crio_userdata=CRIO_USERDATA, docker_containers=DOCKER_CONTAINERS):
        self.host_root = Path(host_root)
        self.runc_roots = tuple(runc_roots)
        self.bundle_dirs = tuple(bundle_dirs)
        self.crio_userdata = tuple(crio_userdata)
        self.docker_containers = docker_containers

    def _read_json(self, path: str) -> dict | None:
        try:
            p = host_path(self.host_root, path)
            with open(p, "rb") as f:
                v = json.load(f)
            return v if isinstance(v, dict) else None
        except (OSError, ValueError, HostPathError):
            return None

    def runc_state(self, container_id: str) -> tuple[str, dict] | None:
        """(runc root, ``state.json``) of ``container_id`` under the first root that has it."""
        if not _SAFE_ID.match(container_id):
            return None
        for root in self.runc_roots:
            state = self._read_json(f"{root}/{container_id}/state.json")
            if state is not None:
                return root, state
        return None

    def remembered_path(self, cgroup_id: int) -> str | None:
        """The path of a container's cgroup that is gone: never known here (live state only;
        :class:`sensor.runtime_watch.RememberingRuntimeState` remembers)."""
        return None

    def annotations(self, container_id: str) -> tuple[dict[str, str], str] | None:
        """(annotations, where they came from) for ``container_id``, or None."""
        if not _SAFE_ID.match(container_id):
            return None
        found = self.runc_state(container_id)
        if found is not None:
            root, state = found
            labels = labels_to_dict((state.get("config") or {}).get("labels"))
            bundle = labels.pop("bundle", None) or state.get("bundle")
            if cri_from_annotations(labels):
                return labels, f"{root}/{container_id}/state.json"
            if bundle:
                cfg = self._read_json(f"{bundle}/config.json")
                if cfg and cfg.get("annotations"):
                    return dict(cfg["annotations"]), f"{bundle}/config.json"
            if labels:
                return labels, f"{root}/{container_id}/state.json"
        for d in self.bundle_dirs:
            cfg = self._read_json(f"{d}/{container_id}/config.json")
            if cfg and cfg.get("annotations"):
                return dict(cfg["annotations"]), f"{d}/{container_id}/config.json"
        for d in self.crio_userdata:
            cfg = self._read_json(f"{d}/{container_id}/userdata/config.json")
            if cfg and cfg.get("annotations"):
                return dict(cfg["annotations"]), f"{d}/{container_id}/userdata/config.json"
        cfg = self._read_json(f"{self.docker_containers}/{container_id}/config.v2.json")
        if cfg:
            labels = (cfg.get("Config") or {}).get("Labels") or {}
            if labels:
                return {str(k): str(v) for k, v in labels.items()}, \
                    f"{self.docker_containers}/{container_id}/config.v2.json"
        return None


def runtime_of_state(where: str) -> str:
    """Which runtime keeps the state file at ``where`` (as :meth:`RuntimeState.annotations`
    reports it)."""
    if where.startswith("/run/containerd/") and "/moby" not in where:
        return "containerd"
    if "/containers/storage/" in where:
        return "cri-o"
    if "docker" in where or "/moby" in where:
        return "docker"
    return "runc"


# ---- identity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a cgroup belongs to. ``source`` is ``kube``, ``oci``, ``cgroup``, ``host`` or
    ``unresolved`` (the cgroup was gone before it could be read)."""

    cgroup_id: int
    cgroup_path: str | None
    workload: Workload
    container: ContainerRef | None
    pod_name: str | None
    namespace: str | None
    container_name: str | None
    pod_uid: str | None
    source: str
    fingerprints: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "cgroup_id": self.cgroup_id, "cgroup_path": self.cgroup_path,
            "workload": self.workload.to_dict(),
            "container": self.container.to_dict() if self.container else None,
            "pod_name": self.pod_name, "namespace": self.namespace,
            "container_name": self.container_name, "pod_uid": self.pod_uid,
            "source": self.source, "fingerprints": dict(sorted(self.fingerprints.items())),
        }


def _name_part(s: str) -> str:
    # Workload keys are "/"-separated; a host cgroup path names a unit, so keep it readable.
    return s.strip("/").replace("/", "_") or "root"


def _key_part(s, fallback: str) -> str:
    """A workload key part from what a runtime recorded (annotations are only as good as whoever
    wrote the OCI spec): one that holds no "/" and no control character, so that one key names
    one workload."""
    text = "".join(c if c.isprintable() and c != "/" else "_" for c in str(s or "")).strip()
    return text[:253] or fallback


def build_identity(cgroup_id: int, path: str | None, ref: ContainerRef | None,
                   cri: CriInfo | None = None, kube=None) -> Identity:
    """The identity from what is known, most authoritative first (pure).

    ``kube`` is a :class:`sensor.kube.PodIdentity` or None."""
    if ref is None:
        if path is None:
            return Identity(cgroup_id, None, Workload.host(f"cgroup-{cgroup_id}"), None, None,
                            None, None, None, "unresolved")
        return Identity(cgroup_id, path, Workload.host(_name_part(host_unit_name(path))), None,
                        None, None, None, None, "host")
    if kube is not None and kube.container_name:
        return Identity(cgroup_id, path,
                        Workload(_key_part(kube.namespace, UNRESOLVED_NAMESPACE), _key_part(kube.kind, "Pod"),
                                 _key_part(kube.name, ref.pod_uid), _key_part(kube.container_name, "main")), ref,
                        kube.pod_name, kube.namespace, kube.container_name, ref.pod_uid, "kube",
                        dict(kube.fingerprints))
    if cri is not None:
        kind, name = workload_from_pod_name(cri.pod_name, cri.labels)
        cname = cri.container_name or ref.container_id[:12]
        # Only keys whose values match what the API path records, so a later upgrade to the
        # API identity does not look like a fingerprint change.
        fps = {}
        if cri.labels.get("pod-template-hash"):
            fps["pod_template_hash"] = cri.labels["pod-template-hash"]
        workload = Workload(_key_part(cri.namespace, UNRESOLVED_NAMESPACE), _key_part(kind, "Pod"),
                            _key_part(name, ref.pod_uid), _key_part(cname, ref.container_id[:12]))
        return Identity(cgroup_id, path, workload, ref,
                        cri.pod_name, cri.namespace, cname, ref.pod_uid, "oci", fps)
    return Identity(cgroup_id, path,
                    Workload(UNRESOLVED_NAMESPACE, "Pod", ref.pod_uid, ref.container_id[:12]), ref,
                    None, None, None, ref.pod_uid, "cgroup")


#: Identity sources that may still improve: a container known only by its cgroup path, or a
#: cgroup that was gone before it could be read.
INCOMPLETE_SOURCES = ("cgroup", "unresolved")


def is_complete(ident: Identity) -> bool:
    return ident.source not in INCOMPLETE_SOURCES


@dataclass
class _Entry:
    identity: Identity
    cri: CriInfo | None
    kube_generation: int = -1
    why: str = ""  # what an incomplete identity lacks


def _why(ident: Identity, kube_configured: bool) -> str:
    if ident.source == "unresolved":
        return "cgroup gone before it could be read"
    if ident.source == "cgroup":
        return (f"no runtime state for container {ident.container.container_id[:12]} "
                f"(runc, containerd, CRI-O and docker state searched)"
                + ("; the API does not know its pod" if kube_configured else ""))
    if ident.source == "oci" and kube_configured:
        return "named from OCI annotations; the API has not described its pod yet"
    return ""


class Resolver:
    """cgroup id -> :class:`Identity`, resolved at first sight and cached.

    ``resolve(cgroup_id, pid)`` reads ``/proc/<pid>/cgroup`` when a pid is given (one small
    read, checked against the id), and otherwise looks the id up in an index built by walking
    the hierarchy. Thread-safe; never raises for a cgroup that has vanished."""

    def __init__(self, cgroupfs: CgroupFS | None = None, host_root: str | os.PathLike = "/",
                 kube=None, runtime: RuntimeState | None = None, max_entries: int = 65536):
        self.host_root = Path(host_root)
        self.cgroupfs = cgroupfs if cgroupfs is not None else cgroupfs_for_host(host_root)
        self.kube = kube
        self.runtime = runtime if runtime is not None else RuntimeState(host_root)
        self.max_entries = max_entries
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"resolved": 0, "hits": 0, "upgraded": 0, "unresolved": 0}

    def peek(self, cgroup_id: int) -> Identity | None:
        with self._lock:
            e = self._cache.get(cgroup_id)
            return e.identity if e else None

    def forget(self, cgroup_id: int) -> None:
        with self._lock:
            self._cache.pop(cgroup_id, None)

    def resolve(self, cgroup_id: int, pid: int | None = None) -> Identity:
        with self._lock:
            e = self._cache.get(cgroup_id)
            if e is not None:
                self._cache.move_to_end(cgroup_id)
                self.stats["hits"] += 1
        if e is not None:
            self._maybe_upgrade(e)  # outside the lock: it may ask the API for an owner
            return e.identity
        e = self._resolve_new(cgroup_id, pid)
        with self._lock:
            self._cache[cgroup_id] = e
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return e.identity

    def _locate(self, cgroup_id: int, pid: int | None) -> str | None:
        if pid is not None:
            found = self.cgroupfs.pid_cgroup(pid)
            if found is not None and found[1] == cgroup_id:
                return found[0]
        try:
            path = self.cgroupfs.path_of(cgroup_id)
        except CgroupError as e:
            log.warning("cgroup index walk failed", cgroup_id=cgroup_id, error=str(e))
            path = None
        if path is None:
            path = self.runtime.remembered_path(cgroup_id)  # a container gone before first sight
        return path

    def _resolve_new(self, cgroup_id: int, pid: int | None) -> _Entry:
        path = self._locate(cgroup_id, pid)
        ref = parse_container_ref(path) if path else None
        cri = None
        if ref is not None:
            found = self.runtime.annotations(ref.container_id)
            if found is not None:
                cri = cri_from_annotations(found[0])
                if not ref.runtime:  # cgroupfs leaves are bare ids: name the runtime by its state
                    ref = dataclasses.replace(ref, runtime=runtime_of_state(found[1]))
        kube_ident, gen = self._kube_identity(ref)
        ident = build_identity(cgroup_id, path, ref, cri, kube_ident)
        self.stats["resolved"] += 1
        if ident.source == "unresolved":
            self.stats["unresolved"] += 1
        log.debug("cgroup resolved", cgroup_id=cgroup_id, path=path, workload=ident.workload.key,
                  source=ident.source)
        return _Entry(ident, cri, gen, _why(ident, self.kube is not None))

    def why(self, cgroup_id: int) -> str:
        """What the cached identity of ``cgroup_id`` still lacks ("" when complete)."""
        with self._lock:
            e = self._cache.get(cgroup_id)
            return e.why if e else ""

    def refresh(self, cgroup_id: int) -> Identity | None:
        """Look again for what a cached identity lacks: the runtime's state, which may have been
        written since the cgroup was first seen, and the API's answer. Returns the new identity
        when it changed, else None. Never raises for a cgroup that has vanished."""
        with self._lock:
            e = self._cache.get(cgroup_id)
        if e is None:
            return None
        ident = e.identity
        if ident.container is None:
            return None
        before = (ident.workload, ident.source)
        if ident.source == "cgroup":
            found = self.runtime.annotations(ident.container.container_id)
            if found is not None:
                cri = cri_from_annotations(found[0])
                ref = ident.container
                if not ref.runtime:
                    ref = dataclasses.replace(ref, runtime=runtime_of_state(found[1]))
                kube_ident, e.kube_generation = self._kube_identity(ref)
                e.cri = cri
                e.identity = build_identity(cgroup_id, ident.cgroup_path, ref, cri, kube_ident)
        if e.identity.source != "kube":
            self._maybe_upgrade(e)
        e.why = _why(e.identity, self.kube is not None)
        if (e.identity.workload, e.identity.source) == before:
            return None
        self.stats["refreshed"] = self.stats.get("refreshed", 0) + 1
        log.info("cgroup identity completed", cgroup_id=cgroup_id, workload=e.identity.workload.key,
                 source=e.identity.source, was=before[0].key)
        return e.identity

    def _kube_identity(self, ref: ContainerRef | None):
        if self.kube is None or ref is None:
            return None, -1
        gen = getattr(self.kube, "generation", 0)
        try:
            return self.kube.identity(ref.pod_uid, container_id=ref.container_id), gen
        except Exception as e:  # noqa: BLE001 - the API layer must never break resolution
            log.warning("kubernetes identity lookup failed", pod_uid=ref.pod_uid, error=str(e))
            return None, gen

    def _maybe_upgrade(self, e: _Entry) -> None:
        ident = e.identity
        if self.kube is None or ident.source == "kube" or ident.container is None:
            return
        gen = getattr(self.kube, "generation", 0)
        if gen == e.kube_generation:
            return
        kube_ident, e.kube_generation = self._kube_identity(ident.container)
        if kube_ident is not None and kube_ident.container_name:
            e.identity = build_identity(ident.cgroup_id, ident.cgroup_path, ident.container, e.cri,
                                        kube_ident)
            self.stats["upgraded"] += 1


def cgroupfs_for_host(host_root: str | os.PathLike = "/") -> CgroupFS:
    """The host's cgroup v2 hierarchy as seen from here.

    With ``host_root`` ``/`` this reads our own mountinfo. Otherwise (a pod with the host's
    ``/`` at ``/host`` and hostPID) the host's mount table is ``<host_root>/proc/1/mountinfo``
    and the hierarchy is that mount point under ``host_root``."""
    root = Path(host_root)
    if str(root) == "/":
        return CgroupFS()
    try:
        text = (root / "proc/1/mountinfo").read_text()
    except OSError as e:
        raise CgroupError(f"read {root}/proc/1/mountinfo (needs hostPID): {e}") from e
    m = find_cgroup2_mount(text)
    if m is None:
        raise CgroupError(f"no cgroup2 mount in {root}/proc/1/mountinfo")
    return CgroupFS(host_path(root, m.mount_point), proc_root=host_path(root, "/proc"))
