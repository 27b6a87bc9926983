"""CRI annotation parsing, runtime state discovery under a host root, and cgroup-id resolution
with caching and API upgrade. Runtime state lives in a temporary host root laid out like a node."""

from __future__ import annotations

import json
import time
import os
import shutil
from pathlib import Path

import pytest

from sensor.cgroup import CgroupFS, parse_container_ref
from sensor.identity import (
    SANDBOX_CONTAINER,
    UNRESOLVED_NAMESPACE,
    HostPathError,
    Resolver,
    RuntimeState,
    build_identity,
    cgroupfs_for_host,
    cri_from_annotations,
    host_path,
    labels_to_dict,
)
from sensor.kubeapi import Backoff, api_client
from sensor.pods import PodWatcher
from sensor.workload import Workload

K8S = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"


def load(name: str) -> dict:
    return json.loads((K8S / name).read_text())


CTRD_CID = "3f1b9c2d7e4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c"
CTRD_SANDBOX = "6e0d5c4b3a291807f6e5d4c3b2a1908f7e6d5c4b3a2918070f6e5d4c3b2a1908"
CRIO_CID = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d"
DOCKER_CID = "e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"
AGENT_POD_UID = "8f7d2c1e-4a6b-4c3d-9e8f-1a2b3c4d5e6f"


# ---- annotations -----------------------------------------------------------------------------


def test_containerd_annotations():
    cri = cri_from_annotations(load("oci-config-containerd-container.json")["annotations"])
    assert (cri.pod_name, cri.namespace, cri.pod_uid, cri.container_name, cri.sandbox) == (
        "research-agent-7c9f8b6d5-x2k4p", "agents", AGENT_POD_UID, "agent", False)
    assert cri.image == "ghcr.io/example/research-agent:1.8.2"


def test_containerd_sandbox_is_the_pod_container():
    cri = cri_from_annotations(load("oci-config-containerd-sandbox.json")["annotations"])
    assert cri.sandbox and cri.container_name == SANDBOX_CONTAINER
    assert cri.pod_name == "research-agent-7c9f8b6d5-x2k4p"


def test_crio_annotations_direct_and_from_labels_json():
    ann = load("oci-config-crio-container.json")["annotations"]
    cri = cri_from_annotations(ann)
    assert (cri.pod_name, cri.namespace, cri.container_name, cri.pod_uid) == (
        "vector-store-2", "agents", "qdrant", "d4e5f6a7-b8c9-4d0e-9f1a-3b4c5d6e7f80")
    # only the JSON Labels annotation and the k8s_ container name left
    slim = {k: v for k, v in ann.items() if not k.startswith("io.kubernetes.pod.")
            and k != "io.kubernetes.container.name"}
    slim["io.kubernetes.cri-o.Labels"] = json.dumps(
        {"io.kubernetes.pod.name": "vector-store-2", "io.kubernetes.pod.namespace": "agents"})
    cri = cri_from_annotations(slim)
    assert (cri.pod_name, cri.namespace, cri.container_name) == ("vector-store-2", "agents", "qdrant")


def test_docker_labels():
    labels = load("docker-config-v2-cri-dockerd.json")["Config"]["Labels"]
    cri = cri_from_annotations(labels)
    assert (cri.pod_name, cri.namespace, cri.container_name, cri.sandbox) == (
        "debug-shell", "default", "debug-shell", False)
    assert cri_from_annotations({**labels, "io.kubernetes.docker.type": "podsandbox"}).sandbox


def test_no_cri_annotations():
    assert cri_from_annotations({}) is None
    assert cri_from_annotations({"io.kubernetes.cri.sandbox-name": "x"}) is None  # no namespace
    assert cri_from_annotations({"io.kubernetes.cri-o.Labels": "not json"}) is None


def test_runc_labels():
    assert labels_to_dict(["a=b", "bundle=/run/x", "c=d=e", "junk"]) == {
        "a": "b", "bundle": "/run/x", "c": "d=e"}


# ---- host paths ------------------------------------------------------------------------------


def test_host_path_stays_under_root(tmp_path):
    root = tmp_path / "host"
    (root / "run/containerd").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var/run")  # absolute link: resolved inside the host root
    os.symlink("../../../../../../etc", root / "run/escape")
    assert host_path(root, "/var/run/containerd") == root / "run/containerd"
    assert host_path(root, "/run/escape/passwd") == root / "etc/passwd"
    assert host_path(root, "/../../etc/shadow") == root / "etc/shadow"
    assert host_path("/", "/run/x") == Path("/run/x")
    os.symlink("loop", root / "loop")
    with pytest.raises(HostPathError):
        host_path(root, "/loop/x")


# ---- runtime state on a node-shaped host root ------------------------------------------------


def write(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))


@pytest.fixture
def node(tmp_path):
    """A host root with containerd, CRI-O, runc and docker state for the fixture containers."""
    root = tmp_path / "host"
    # containerd: runc state under the k8s.io namespace, bundle under the v2 task dir
    bundle = f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{CTRD_CID}"
    write(root / bundle.lstrip("/") / "config.json", load("oci-config-containerd-container.json"))
    write(root / f"run/containerd/runc/k8s.io/{CTRD_CID}/state.json",
          {"id": CTRD_CID, "init_process_pid": 4242,
           "config": {"labels": [f"bundle={bundle}"]}})  # no annotations: read the bundle
    write(root / f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{CTRD_SANDBOX}/config.json",
          load("oci-config-containerd-sandbox.json"))
    # CRI-O
    write(root / f"run/containers/storage/overlay-containers/{CRIO_CID}/userdata/config.json",
          load("oci-config-crio-container.json"))
    # docker via cri-dockerd
    write(root / f"var/lib/docker/containers/{DOCKER_CID}/config.v2.json",
          load("docker-config-v2-cri-dockerd.json"))
    return root


def test_runtime_state_finds_each_runtime(node):
    rs = RuntimeState(node)
    ann, where = rs.annotations(CTRD_CID)
    assert where.endswith(f"k8s.io/{CTRD_CID}/config.json")
    assert ann["io.kubernetes.cri.container-name"] == "agent"
    ann, where = rs.annotations(CTRD_SANDBOX)
    assert ann["io.kubernetes.cri.container-type"] == "sandbox"
    ann, where = rs.annotations(CRIO_CID)
    assert "overlay-containers" in where and ann["io.kubernetes.container.name"] == "qdrant"
    ann, where = rs.annotations(DOCKER_CID)
    assert where.endswith("config.v2.json") and ann["io.kubernetes.pod.name"] == "debug-shell"
    assert rs.annotations("0" * 64) is None
    assert rs.annotations("../../etc") is None  # ids are never path fragments


def test_runc_state_labels_carry_annotations(tmp_path):
    root = tmp_path / "host"
    cid = "ab" * 32
    write(root / f"run/runc/{cid}/state.json", {"id": cid, "config": {"labels": [
        "io.kubernetes.cri.sandbox-name=web-5d8f7b6c9-q9wzt",
        "io.kubernetes.cri.sandbox-namespace=shop",
        "io.kubernetes.cri.container-name=nginx",
        "bundle=/nonexistent"]}})
    ann, where = RuntimeState(root).annotations(cid)
    assert where == f"/run/runc/{cid}/state.json"
    assert "bundle" not in ann and ann["io.kubernetes.cri.container-name"] == "nginx"


# ---- identity (pure) -------------------------------------------------------------------------


REF = parse_container_ref(
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{AGENT_POD_UID.replace('-', '_')}"
    f".slice/cri-containerd-{CTRD_CID}.scope")


def test_identity_sources():
    cri = cri_from_annotations(load("oci-config-containerd-container.json")["annotations"])
    oci = build_identity(7, REF.cgroup_path, REF, cri)
    assert oci.source == "oci"
    assert oci.workload == Workload("agents", "Deployment", "research-agent", "agent")
    assert (oci.pod_name, oci.namespace, oci.container_name, oci.pod_uid) == (
        "research-agent-7c9f8b6d5-x2k4p", "agents", "agent", AGENT_POD_UID)
    bare = build_identity(7, REF.cgroup_path, REF, None)
    assert bare.source == "cgroup"
    assert bare.workload == Workload(UNRESOLVED_NAMESPACE, "Pod", AGENT_POD_UID, CTRD_CID[:12])
    host = build_identity(8, "/system.slice/containerd.service", None)
    assert host.source == "host" and host.workload == Workload.host("containerd.service")
    gone = build_identity(9, None, None)
    assert gone.source == "unresolved" and gone.workload == Workload.host("cgroup-9")
    plain = build_identity(10, "/envelope/record/run-1", None)
    assert plain.workload == Workload.host("envelope_record_run-1")
    assert Workload.parse(plain.workload.key) == plain.workload
    assert json.loads(json.dumps(oci.to_dict()))["workload"]["kind"] == "Deployment"


# ---- the resolver over a directory tree laid out like a cgroup hierarchy ---------------------


@pytest.fixture
def hierarchy(tmp_path):
    cg = tmp_path / "cgroup"
    cg.mkdir()
    return cg


def mkcg(root: Path, rel: str) -> int:
    p = root / rel.lstrip("/")
    p.mkdir(parents=True)
    return os.stat(p).st_ino


def test_resolver_resolves_caches_and_survives_removal(node, hierarchy):
    rel = REF.cgroup_path
    cid = mkcg(hierarchy, rel)
    host_cid = mkcg(hierarchy, "/system.slice/kubelet.service")
    r = Resolver(CgroupFS(hierarchy), host_root=node)
    ident = r.resolve(cid)
    assert ident.source == "oci" and ident.workload.key == "agents/Deployment/research-agent/agent"
    assert r.resolve(host_cid).workload == Workload.host("kubelet.service")
    # the container exits: its cgroup and its runtime state vanish, the identity stays
    shutil.rmtree(hierarchy / "kubepods.slice")
    shutil.rmtree(node / "run/containerd")
    assert r.resolve(cid) == ident and r.stats["hits"] == 1
    # a cgroup seen for the first time after it vanished is reported as unresolved
    assert r.resolve(123456789).source == "unresolved"
    r.forget(cid)
    assert r.peek(cid) is None


def test_resolver_bounded_cache(node, hierarchy):
    ids = [mkcg(hierarchy, f"/system.slice/u{i}.service") for i in range(5)]
    r = Resolver(CgroupFS(hierarchy), host_root=node, max_entries=3)
    for i in ids:
        r.resolve(i)
    assert [r.peek(i) is not None for i in ids] == [False, False, True, True, True]


def test_resolver_upgrades_to_the_api_identity(node, hierarchy):
    cid = mkcg(hierarchy, REF.cgroup_path)
    # A real watcher fed by watch events; its API host is unreachable, so owner lookups fail
    # (on the watcher's own thread) and the pod-template-hash rule stands in.
    kube = PodWatcher("worker-2", api_client(host="http://127.0.0.1:9"), request_timeout=0.5,
                      backoff=Backoff(base=0.05, cap=0.1)).start()
    r = Resolver(CgroupFS(hierarchy), host_root=node, kube=kube)
    first = r.resolve(cid)
    assert first.source == "oci" and first.fingerprints == {}
    kube.informer.apply_event({"type": "ADDED", "object": load("pod-research-agent.json")})
    deadline = time.monotonic() + 30
    while kube.identity(AGENT_POD_UID, container_id=CTRD_CID) is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the lookups fail fast (connection refused); the timeout stops a hang only
    upgraded = r.resolve(cid)
    kube.stop()
    assert upgraded.source == "kube" and r.stats["upgraded"] == 1
    assert upgraded.workload == first.workload  # the same workload key either way
    assert upgraded.fingerprints["image"].startswith("sha256:4b1f6ce7")
    assert upgraded.fingerprints["pod_template_hash"] == "7c9f8b6d5"
    assert kube.failures >= 1  # the unreachable API was counted, not raised


def test_resolver_with_api_down_and_no_runtime_state(tmp_path, hierarchy):
    cid = mkcg(hierarchy, REF.cgroup_path)
    kube = PodWatcher("worker-2", api_client(host="http://127.0.0.1:9"), request_timeout=0.5)
    r = Resolver(CgroupFS(hierarchy), host_root=tmp_path / "empty-host", kube=kube)
    ident = r.resolve(cid)
    assert ident.source == "cgroup" and ident.pod_uid == AGENT_POD_UID
    assert ident.container.container_id == CTRD_CID


def test_cgroupfs_for_a_host_root(tmp_path):
    host = tmp_path / "host"
    (host / "proc/1").mkdir(parents=True)
    (host / "sys/fs/cgroup/unified").mkdir(parents=True)
    (host / "proc/1/mountinfo").write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    fs = cgroupfs_for_host(host)
    assert fs.root == host / "sys/fs/cgroup/unified" and fs.proc_root == host / "proc"
    with pytest.raises(Exception, match="hostPID"):
        cgroupfs_for_host(tmp_path / "nohost")


def test_runtime_named_from_state_for_bare_cgroupfs_ids(node, hierarchy):
    cid = mkcg(hierarchy, f"/kubepods/burstable/pod{AGENT_POD_UID}/{CTRD_CID}")
    ident = Resolver(CgroupFS(hierarchy), host_root=node).resolve(cid)
    assert ident.container.runtime == "containerd" and ident.source == "oci"
    crio = mkcg(hierarchy, f"/kubepods/besteffort/podd4e5f6a7-b8c9-4d0e-9f1a-3b4c5d6e7f80/{CRIO_CID}")
    ident = Resolver(CgroupFS(hierarchy), host_root=node).resolve(crio)
    assert ident.container.runtime == "cri-o"
    assert ident.workload == Workload("agents", "StatefulSet", "vector-store", "qdrant")


def test_an_identity_completed_later_moves_what_was_counted(tmp_path, hierarchy):
    """The runtime writes its state after the sensor first saw the cgroup: the container is
    bound to a cgroup-only identity, then completed, and what was counted moves to the
    Deployment's profile, nothing lost or counted twice; the emptied profile is dropped."""
    from sensor.aggregate import Aggregator
    from sensor.pump import NodeBinding
    from sensor.store import ProfileStore

    host = tmp_path / "late-host"
    cid = mkcg(hierarchy, REF.cgroup_path)
    resolver = Resolver(CgroupFS(hierarchy), host_root=host)
    store = ProfileStore(tmp_path / "state")
    agg = Aggregator("n1", store, str, clock=lambda: 1000.0)
    binding = NodeBinding(resolver)
    assert binding.bind(cid, agg)
    early = agg.bindings[cid].workload
    assert early.namespace == "_unresolved" and cid in binding.incomplete
    assert "no runtime state" in binding.unresolved().popitem()[0]
    agg.on_counts({cid: {0: 7, 1: 2}}, 1001.0)
    agg.observe(cid, "exec:/usr/bin/python3", 1, 1001.5)
    agg.flush()
    assert store.load(early) is not None
    assert binding.refresh(agg) == 0  # nothing new yet

    # the runtime's state appears
    bundle = f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{CTRD_CID}"
    write(host / bundle.lstrip("/") / "config.json", load("oci-config-containerd-container.json"))
    write(host / f"run/containerd/runc/k8s.io/{CTRD_CID}/state.json",
          {"id": CTRD_CID, "config": {"labels": [f"bundle={bundle}"]}})
    assert binding.refresh(agg) == 1
    final = agg.bindings[cid].workload
    assert final == Workload("agents", "Deployment", "research-agent", "agent")
    assert cid not in binding.incomplete and binding.unresolved() == {}
    agg.on_counts({cid: {0: 10, 1: 2}}, 1002.0)  # cumulative: 3 more reads, no more writes
    b = agg.profile(final).behaviours()
    assert (b["syscall:0"].count, b["syscall:1"].count, b["exec:/usr/bin/python3"].count) == (10, 2, 1)
    assert all(s.sessions == 1 for s in b.values())
    assert early not in agg.profiles
    agg.flush()
    assert store.load(early) is None and store.load(final).behaviours()["syscall:0"].count == 10
