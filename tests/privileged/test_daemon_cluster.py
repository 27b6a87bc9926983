"""``envelope daemon`` as a cluster component: the real daemon (real BPF sensor, real runc
container that looks like a Deployment's pod) against the fake API server of tests/fakes.

It resolves the container through the pod on its node, publishes the workload's profile as
WorkloadProfile objects, writes the LeastPrivilegePolicy's seccomp profile for the kubelet,
reports its node status, and flushes on SIGTERM; and with a black-holed API server (every request
accepted, none answered) it still counts every event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from enforcer.kubelet import localhost_profile
from enforcer.leastprivilegepolicy import ClusterPolicies, node_statuses
from enforcer.policy import Policy
from sensor.cgroup import CgroupFS, host_unit_name
from sensor.kubeapi import Backoff
from sensor.store import ProfileStore
from sensor.workload import Workload
from sensor.workloadprofile import ClusterProfiles
from tests.fakes.apiserver import FakeApiServer
from tests.privileged.daemon_log import running_daemon
from tests.privileged.runc_bundle import RuncContainer
from tests.polling import until


NODE = "envelope-test-node"
W = Workload("agents", "Deployment", "research-agent", "agent")
DIGEST = "sha256:" + "ab" * 32


def pod_for(c: RuncContainer) -> tuple[dict, dict]:
    """The Pod (on this node) and ReplicaSet the API would hold for the runc container."""
    rs_name = f"{c.deployment_name}-{c.template_hash}"
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": c.pod_name, "namespace": c.namespace, "uid": c.pod_uid, "resourceVersion": "10",
                     "labels": {"app": c.deployment_name, "pod-template-hash": c.template_hash},
                     "annotations": {"envelope.dev/model-version": "model-2026-01"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                                          "uid": "rs-uid", "controller": True}]},
        "spec": {"nodeName": NODE, "serviceAccountName": "research-agent",
                 "containers": [{"name": c.container_name, "image": "docker.io/library/busybox:1.35"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": c.container_name, "ready": True, "restartCount": 0, "image": "docker.io/library/busybox:1.35",
            "imageID": f"docker.io/library/busybox@{DIGEST}", "containerID": f"containerd://{c.id}",
            "state": {"running": {"startedAt": "2026-11-26T12:00:00Z"}}}]},
    }
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "metadata": {"name": rs_name, "namespace": c.namespace, "uid": "rs-uid",
                       "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": c.deployment_name, "uid": "d-uid", "controller": True}]}}
    return pod, rs


def wait_until(cond, timeout: float = 120.0) -> bool:
    return until(cond, timeout, interval=0.1)


@pytest.mark.runc
def test_daemon_publishes_profiles_and_applies_policies_through_the_api(tmp_path):
    with FakeApiServer() as kube, RuncContainer.deployment(
            "agents", "research-agent", "agent",
            ["/bin/sh", "-c", "sleep 2; for i in 1 2 3 4 5; do cat /etc/passwd >/dev/null; done; exec sleep 300"],
            tmp_path) as c:
        pod, rs = pod_for(c)
        kube.put(pod)
        kube.put(rs)
        ClusterPolicies.from_api_client(kube.api_client(), "tester", backoff=Backoff(attempts=1)).create(
            Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read", "write", "openat", "nanosleep")))
        kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
        kubelet = tmp_path / "kubelet-seccomp"
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "node_name": NODE, "cluster": "on",
            "kubeconfig": str(kubeconfig), "kubelet_seccomp_dir": str(kubelet),
            "profile_namespace": "envelope-system", "policy_sync_interval": 0.5}))
        try:
            with running_daemon(cfg, "--flush-interval", "1") as (daemon, log):
                c.run()
                c.wait_running()
                reader = ClusterProfiles.from_api_client(kube.api_client(), namespace="envelope-system",
                                                         backoff=Backoff(attempts=1))

                def published():
                    p, _ = reader.read(W)
                    return p is not None and "syscall:openat" in p.behaviours()

                assert wait_until(published), f"no WorkloadProfile for {W.key}; objects: {kube.names()}"
                profile, problems = reader.read(W)
                assert problems == [] and list(profile.nodes) == [NODE]
                fps = profile.fingerprints()
                assert fps["image"] == [DIGEST] and fps["model"] == ["model-2026-01"], "identity came from the API"
                assert fps["service_account"] == ["research-agent"]

                def entry():
                    return node_statuses(kube.object("envelope.dev", "leastprivilegepolicies", "agents",
                                                     "research-agent-agent") or {}).get(NODE)

                assert wait_until(lambda: entry() is not None), f"no node status reported: {''.join(log)[-3000:]}"
                assert entry().state == "applied", entry().reason
                assert entry().localhost_profile == localhost_profile(W)
                written = json.loads((kubelet / localhost_profile(W)).read_text())
                assert written["defaultAction"] == "SCMP_ACT_ERRNO"
                assert "nanosleep" in written["syscalls"][0]["names"]

                before = profile.behaviours()["syscall:openat"].count
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(timeout=120) == 0
                after, _ = reader.read(W)
                assert after.behaviours()["syscall:openat"].count >= before, "the shutdown flush published"
        finally:
            # The pinned egress set outlives the daemon by design; this test removes it.
            from enforcer.session import EnforcementSession
            EnforcementSession(tmp_path / "state").remove(W, reason="test cleanup")


def test_a_black_holed_api_server_changes_no_event_count(tmp_path):
    """The API server accepts and never answers: the daemon still starts, counts a workload's
    syscalls exactly, and flushes them on SIGTERM."""
    cgfs = CgroupFS()
    rel = f"/envelope.test/blackhole-{os.getpid()}"
    path, _ = cgfs.make(rel)
    with FakeApiServer() as kube:
        kube.mode = "blackhole"
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "node_name": NODE, "cluster": "on",
            "kubeconfig": kube.kubeconfig(tmp_path / "kubeconfig"), "kubelet_seccomp_dir": str(tmp_path / "kubelet"),
            "profile_namespace": "envelope-system", "policy_sync_interval": 0.5}))
        try:
            with running_daemon(cfg, "--flush-interval", "1") as (daemon, log):
                assert wait_until(lambda: kube.hanging >= 2), "the daemon's API calls are held in the black hole"
                script = ("import ctypes\nl=ctypes.CDLL(None)\n"
                          "for _ in range(777): l.personality(0xffffffff)\n")
                w = subprocess.Popen(["/usr/bin/python3", "-c", script],
                                     preexec_fn=lambda: open(f"{path}/cgroup.procs", "w").write("0"))
                assert w.wait() == 0
                time.sleep(2.5)  # let at least one counter read pass
                assert kube.hanging >= 2
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(timeout=120) == 0, "".join(log)[-3000:]
        finally:
            cgfs.remove(rel)
            cgfs.remove_empty_parents(rel)
    store = ProfileStore(tmp_path / "state")
    name = host_unit_name(rel).strip("/").replace("/", "_")
    matches = [w for w in store.workloads() if w.name == name]
    assert matches, [w.key for w in store.workloads()]
    assert store.load(matches[0]).behaviours()["syscall:personality"].count == 777
