"""Pod containers get their Deployment even when the runtime's state is written after the
sensor first saw their cgroup: the real daemon watches real runc pod containers (kubelet
cgroupsPath, CRI annotations), short-lived and long-lived, with no API server and with one that
accepts and never answers, and every container's evidence lands in the Deployment's profile,
none under an unresolved identity."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.fakes.apiserver import FakeApiServer
from tests.privileged.daemon_log import running_daemon
from tests.privileged.runc_bundle import RuncContainer

NODE = "identity-node"
SHORT = ["/bin/sh", "-c", "cat /etc/passwd >/dev/null"]  # done in a few ms
LONG = ["/bin/sh", "-c", "for i in 1 2 3; do cat /etc/group >/dev/null; sleep 1; done"]


def run_pod_containers(tmp_path: Path, deployment: str) -> list[RuncContainer]:
    done = []
    for n, args in enumerate([SHORT, LONG, SHORT]):
        with RuncContainer.deployment("agents", deployment, "worker", args, tmp_path / f"c{n}") as c:
            c.run()
            assert c.wait() == 0, c.read_stderr()
            done.append(c)
    return done


def daemon_config(tmp_path: Path, **config) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "node_name": NODE,
                                   "flush_interval": 1.0, "poll_interval": 0.5, **config}))
    return cfg


def check_profiles(tmp_path: Path, deployment: str, log: list[str]) -> None:
    store = ProfileStore(tmp_path / "state")
    ours = [w for w in store.workloads() if deployment in w.key or w.namespace == "_unresolved"]
    want = Workload("agents", "Deployment", deployment, "worker")
    assert ours == [want], f"profiles: {[w.key for w in store.workloads()]}; log: {''.join(log)[-2000:]}"
    p = store.load(want)
    b = p.behaviours()
    others = {w.key: [s.meta for s in store.load(w).sessions()] for w in store.workloads() if w != want}
    assert p.session_count == 3 and p.closed_sessions == 3, (
        f"sessions: {[s.meta for s in p.sessions()]}; other profiles: {others}; log: {''.join(log)[-3000:]}")
    assert b["exec:/bin/sh"].count == 3 and b["exec:/bin/sh"].sessions == 3
    # busybox's shell runs cat and sleep by re-exec'ing itself: 1 + (3 cat + 3 sleep) + 1, exact
    assert b["exec:/proc/self/exe"].count == 8 and b["exec:/proc/self/exe"].sessions == 3


@pytest.mark.runc
def test_pod_containers_get_their_deployment_without_an_api(tmp_path):
    with running_daemon(daemon_config(tmp_path, cluster="off")) as (d, log):
        run_pod_containers(tmp_path, f"indexer-{os.getpid()}")
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=120) == 0
    check_profiles(tmp_path, f"indexer-{os.getpid()}", log)


@pytest.mark.runc
def test_pod_containers_get_their_deployment_while_the_api_never_answers(tmp_path):
    with FakeApiServer() as kube:
        kube.mode = "blackhole"
        cfg = daemon_config(tmp_path, cluster="on", kubeconfig=kube.kubeconfig(tmp_path / "kubeconfig"),
                            kubelet_seccomp_dir=str(tmp_path / "kubelet"), profile_namespace="envelope-system")
        with running_daemon(cfg) as (d, log):
            run_pod_containers(tmp_path, f"ranker-{os.getpid()}")
            d.send_signal(signal.SIGTERM)
            assert d.wait(timeout=120) == 0
    check_profiles(tmp_path, f"ranker-{os.getpid()}", log)
