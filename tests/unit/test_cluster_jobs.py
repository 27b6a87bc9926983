"""The daemon's Kubernetes jobs (pod watching, profile publishing, policy application, stale
detection), wired by the daemon's own ``build_cluster``, against the fake API server of
tests/fakes.

Everything under test is real: the ``kubernetes`` client, the pod watcher, the publisher
thread, the policy and stale jobs over the policy informer, the OCI compiler, the kubelet
seccomp directory (under a tmp host root), the audit log and the metrics registry. The inputs
are stand-ins where the real thing needs root: the observer (a real Aggregator with a small
resolver that answers ``peek``) and, in the tests that are not about egress, the node's egress
enforcement.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import structlog

from enforcer import audit, state
from enforcer.session import ApplyError, CgroupResult
from enforcer.kubelet import localhost_profile
from enforcer.leastprivilegepolicy import ClusterPolicies, condition, is_stale, node_statuses, policy_to_cr
from enforcer.policy import EgressRule, Policy
from enforcer.seccomp import compile_oci
from envelope.config import Config
from envelope.daemon import build_cluster, cluster_client
from envelope.errors import UserError
from envelope.metrics import Metrics
from sensor.aggregate import Aggregator
from sensor.pump import NodeBinding, Pump
from sensor.cgroup import parse_container_ref
from sensor.identity import build_identity
from sensor.kube import container_fingerprints
from sensor.kubeapi import Backoff
from sensor.store import ProfileStore
from sensor.workload import Workload
from sensor.workloadprofile import ClusterProfiles
from tests.fakes.apiserver import FakeApiServer

K8S = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"
NODE = "worker-2"
W = Workload("agents", "Deployment", "research-agent", "agent")
LOCALHOST = "envelope/agents/deployment_research-agent_agent.json"
KUBELET_DIR = "/var/lib/kubelet/seccomp"
SYSCALLS = {0: "read", 1: "write", 257: "openat", 39: "getpid"}


def load(name: str) -> dict:
    return json.loads((K8S / name).read_text())


@pytest.fixture(autouse=True)
def _plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


# ---- the API server -----------------------------------------------------------------------------

G, LPP = "envelope.dev", "leastprivilegepolicies"


@pytest.fixture
def kube(tmp_path):
    with FakeApiServer(bookmark_interval=0.2) as api:
        api.kubeconfig_path = api.kubeconfig(tmp_path / "kubeconfig")
        api.put(load("replicaset-research-agent.json"))
        api.put(load("serviceaccount-research-agent.json"))
        yield api


def policy_obj(kube, namespace: str, name: str) -> dict:
    return kube.object(G, LPP, namespace, name)


def config(kube, tmp_path, **kw) -> Config:
    kw.setdefault("policy_sync_interval", 0.05)
    return Config(state_dir=tmp_path / "state", node_name=NODE, host_root=tmp_path / "host",
                  kubelet_seccomp_dir=Path(KUBELET_DIR), cluster="on", kubeconfig=kube.kubeconfig_path,
                  profile_namespace="envelope-system", **kw)


def open_sync(cfg: Config, metrics: Metrics | None = None, **kw):
    """The daemon's cluster jobs, built by the daemon's own wiring."""
    client = cluster_client(cfg)
    assert client is not None
    kw.setdefault("backoff", Backoff(attempts=3, base=0.01, cap=0.05))
    kw.setdefault("watch_backoff", Backoff(base=0.01, cap=0.05, jitter=lambda: 1.0))
    kw.setdefault("watch_timeout", 1)
    kw.setdefault("publish_retry", 0.05)
    return build_cluster(cfg, metrics, client, **kw)


def wait_for(cond, sync=None, timeout: float = 30.0) -> bool:
    """Poll ``cond``, stepping the sync's loop hook as the daemon does. The timeout only stops a
    hung test; it is not what is being tested."""
    deadline = time.monotonic() + timeout
    while True:
        if sync is not None:
            sync.tick()
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def known_identity(sync, uid: str, container: str):
    """The pod watcher's answer once its owner lookups (on its own thread) are in."""
    assert wait_for(lambda: sync.pods.identity(uid, container_name=container) is not None, sync)
    return sync.pods.identity(uid, container_name=container)


class Resolver:
    """Answers ``peek`` like the daemon's resolver, from identities built by the real code."""

    def __init__(self):
        self.identities = {}

    def peek(self, cgroup_id):
        return self.identities.get(cgroup_id)


def observer(cfg: Config) -> Pump:
    agg = Aggregator(NODE, ProfileStore(cfg.state_dir), SYSCALLS.__getitem__)
    return Pump(None, NodeBinding(Resolver()), agg)


def bind_container(obs, cgroup_id: int, pod: dict, container: str, kube_ident=None) -> None:
    """Bind a container of ``pod`` as the observer does at its first event."""
    status = next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)
    cid = status["containerID"].split("//", 1)[1]
    path = f"/kubepods/burstable/pod{pod['metadata']['uid']}/{cid}"
    ref = parse_container_ref(path)
    assert ref is not None
    ident = build_identity(cgroup_id, path, ref, None, kube_ident)
    assert ident.source == "kube" and ident.workload == W
    obs.binding.resolver.identities[cgroup_id] = ident
    obs.agg.bind(cgroup_id, ident.workload, cid, meta={"pod_name": ident.pod_name},
                 fingerprints=ident.fingerprints)


class Enforcement:
    """The node's egress enforcement as the cluster side sees it (the real one needs root and
    BPF). Records what it is asked, from which thread, and can fail."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[Workload, str, str]] = []
        self.threads: set[str] = set()
        self.removed: list[Workload] = []
        self.fail = fail

    def apply_policy(self, policy, mode, source="cluster"):
        self.calls.append((policy.workload, mode, source))
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise ApplyError(f"apply {policy.workload}: {self.fail}; rolled back, previous state kept")
        return [CgroupResult(f"/sys/fs/cgroup/unified/kubepods/burstable/pod-x/{i}", True, attached=True)
                for i in range(2)]

    def remove_policy(self, workload, source="cluster"):
        self.removed.append(workload)


POLICY = Policy(W, mode="enforce", syscalls=("read", "write", "openat", "getpid"),
                egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),), execs=("/usr/bin/git",))


def api_policies(kube) -> ClusterPolicies:
    return ClusterPolicies.from_api_client(kube.api_client(), "tester", backoff=Backoff(attempts=1))


def node_entry(kube, name="research-agent-agent", namespace="agents"):
    obj = policy_obj(kube, namespace, name)
    return node_statuses(obj).get(NODE) if obj else None


def seccomp_file(tmp_path) -> Path:
    return tmp_path / "host" / KUBELET_DIR.lstrip("/") / LOCALHOST


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# ---- when the API is used -------------------------------------------------------------------------


def test_the_cluster_setting_decides_whether_the_api_is_used(kube, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = config(kube, tmp_path)
    assert cluster_client(cfg.replace(cluster="off")) is None
    off = tmp_path / "off.yaml"
    off.write_text("cluster: off\n")  # YAML 1.1: an unquoted off is the boolean false
    assert Config.load(off).cluster == "off" and cluster_client(Config.load(off)) is None
    assert cluster_client(cfg.replace(cluster="auto")) is None  # not in a pod
    missing = str(tmp_path / "no-kubeconfig")
    with pytest.raises(UserError, match="cluster: on, but no Kubernetes API configuration"):
        cluster_client(cfg.replace(kubeconfig=missing))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # a pod, but no usable credentials
    assert cluster_client(cfg.replace(cluster="auto", kubeconfig=missing)) is None
    with pytest.raises(UserError, match="not one of auto, on, off"):
        cfg.replace(cluster="sometimes")

    on = tmp_path / "on.yaml"
    on.write_text(f"cluster: on\nkubeconfig: {missing}\n")
    with pytest.raises(UserError, match="cluster: on, but"):
        cluster_client(Config.load(on))

    kube.put(load("pod-research-agent.json"))
    sync = open_sync(cfg, None)
    sync.start(None, None)
    try:
        assert wait_for(sync.pods.synced.is_set)  # the pod watcher started in the background
        ident = known_identity(sync, "8f7d2c1e-4a6b-4c3d-9e8f-1a2b3c4d5e6f", "agent")
        assert (ident.namespace, ident.kind, ident.name) == ("agents", "Deployment", "research-agent")
        assert kube.count("GET", "/api/v1/pods") >= 1
    finally:
        sync.close()


# ---- publishing ---------------------------------------------------------------------------------------


def test_flushed_profiles_are_published_and_the_last_flush_on_close(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    obs = observer(cfg)
    sync = open_sync(cfg, metrics)
    sync.start(obs, None)
    pod = load("pod-research-agent.json")
    kube.put(pod)
    assert wait_for(lambda: sync.pods.pod(pod["metadata"]["uid"]) is not None, sync)
    bind_container(obs, 11, pod, "agent", known_identity(sync, pod["metadata"]["uid"], "agent"))
    host = Workload.host("system.slice/cron.service")
    obs.agg.bind(12, host, "cgroup-12")
    for cg in (11, 12):
        obs.agg.on_counts({cg: {0: 5, 257: 2}}, time.time())
    written = obs.agg.flush()
    assert sorted(written) == sorted([W, host])
    sync.publish(obs.agg.profiles, written)

    reader = ClusterProfiles.from_api_client(kube.api_client(), namespace="envelope-system",
                                             backoff=Backoff(attempts=1))
    assert wait_for(lambda: reader.read(W)[0] is not None, sync)
    got, problems = reader.read(W)
    assert problems == []
    assert [c.pack(compact=True) for c in got.nodes.values()] == [
        c.pack(compact=True) for c in obs.agg.profiles[W].nodes.values()], "the node's contribution, exactly"
    assert got.behaviours()["syscall:read"].count == 5
    assert got.fingerprints()["image"] == ["sha256:4b1f6ce7a2e05cd2cf91b26f0e2d0bfa8a2d3c64b6e1bd2f4c9a0e7f3d5b8a21"]
    assert sorted(reader.read_all().profiles) == [W], "host workloads stay on the node"
    assert wait_for(lambda: sample(metrics, "envelope_profile_publish_total", result="written") == 1)

    # more evidence, one more flush, then shutdown: close() writes it before returning
    obs.agg.on_counts({11: {0: 9, 1: 4}}, time.time())
    sync.publish(obs.agg.profiles, obs.agg.flush())
    assert sync.close() is True
    got, _ = reader.read(W)
    assert got.behaviours()["syscall:read"].count == 9 and got.behaviours()["syscall:write"].count == 4


# ---- policies -----------------------------------------------------------------------------------------


def test_policy_is_written_for_the_kubelet_applied_and_reported(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    enforcement = Enforcement()
    api_policies(kube).create(POLICY)
    sync = open_sync(cfg, metrics)
    sync.start(observer(cfg), enforcement)
    try:
        assert wait_for(lambda: node_entry(kube) is not None, sync)
        entry = node_entry(kube)
        assert entry.state == "applied", entry.reason
        assert entry.localhost_profile == LOCALHOST == localhost_profile(W)
        assert (entry.mode, entry.observed_generation, entry.cgroups, entry.stale) == ("enforce", 1, 2, False)
        path = seccomp_file(tmp_path)
        data = path.read_bytes()
        assert entry.seccomp_digest == "sha256:" + hashlib.sha256(data).hexdigest()
        profile = json.loads(data)
        assert profile == compile_oci(POLICY, "enforce", runtime="runc").profile
        assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
        comments = {r["comment"] for r in profile["syscalls"]}
        assert "runtime-completeness:runc" in comments, "a container's profile lets the runtime start it"
        # egress went through the enforcement, in the loop's thread (the one calling tick)
        assert enforcement.calls == [(W, "enforce", "cluster")]
        assert enforcement.threads == {threading.current_thread().name}

        # every reporting node (this one) applied the generation: Ready
        assert wait_for(lambda: (condition(policy_obj(kube, "agents", "research-agent-agent"), "Ready")
                                 or {}).get("status") == "True", sync)
        ready = condition(policy_obj(kube, "agents", "research-agent-agent"), "Ready")
        assert (ready["reason"], ready["observedGeneration"]) == ("Applied", 1)
        # nothing changed: later rounds neither re-apply nor rewrite the status
        writes = kube.count("PATCH", "/status")
        syncs = sync.policies.stats["rounds"]
        assert wait_for(lambda: sync.policies.stats["rounds"] >= syncs + 3, sync)
        assert enforcement.calls == [(W, "enforce", "cluster")] and kube.count("PATCH", "/status") == writes

        # a new generation (mode alert) is acted on again
        api_policies(kube).set_mode(api_policies(kube).get("agents", "research-agent-agent"), "alert")
        assert wait_for(lambda: node_entry(kube).observed_generation == 2, sync)
        entry = node_entry(kube)
        assert (entry.state, entry.mode) == ("applied", "alert")
        assert json.loads(path.read_bytes())["defaultAction"] == "SCMP_ACT_LOG"
        assert enforcement.calls[-1] == (W, "alert", "cluster")

        # the policy is deleted: its profile goes, and so do its egress programs
        kube.delete(G, LPP, "agents", "research-agent-agent")
        assert wait_for(lambda: not path.exists() and enforcement.removed == [W], sync)
    finally:
        sync.close()
    assert sample(metrics, "envelope_policy_apply_failures_total", workload=W.key, substrate="syscall") == 0


def test_malformed_policy_is_failed_with_its_reason_and_others_still_apply(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    api_policies(kube).create(POLICY)
    bad = policy_to_cr(Policy(Workload("agents", "Deployment", "writer", "main"), mode="enforce",
                              syscalls=("read",)))
    bad["spec"]["allow"]["syscalls"] = ["read", "rm -rf /"]
    kube.put(bad)
    sync = open_sync(cfg, metrics)
    sync.start(observer(cfg), Enforcement())
    try:
        assert wait_for(lambda: node_entry(kube, "writer-main") is not None
                        and node_entry(kube) is not None, sync)
    finally:
        sync.close()
    failed = node_entry(kube, "writer-main")
    assert failed.state == "failed"
    assert failed.observed_generation == policy_obj(kube, "agents", "writer-main")["metadata"]["generation"]
    assert "spec.allow.syscalls[1]" in failed.reason and "not a syscall name" in failed.reason
    assert failed.localhost_profile is None
    assert not (tmp_path / "host" / KUBELET_DIR.lstrip("/") / "envelope/agents/deployment_writer_main.json").exists()
    assert node_entry(kube).state == "applied" and seccomp_file(tmp_path).exists()
    assert sample(metrics, "envelope_policy_apply_failures_total",
                  workload="agents/Deployment/writer/main", substrate="syscall") == 1


def test_a_failed_write_is_reported_and_retried(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    api_policies(kube).create(POLICY)
    kubelet = tmp_path / "host" / KUBELET_DIR.lstrip("/")
    kubelet.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (kubelet / "envelope").symlink_to(tmp_path / "elsewhere")  # planted: never followed
    sync = open_sync(cfg, metrics)
    sync.start(observer(cfg), Enforcement())
    try:
        assert wait_for(lambda: node_entry(kube) is not None, sync)
        entry = node_entry(kube)
        assert entry.state == "failed" and "symlink" in entry.reason and entry.reason.startswith("seccomp:")
        assert list((tmp_path / "elsewhere").iterdir()) == []
        assert sample(metrics, "envelope_policy_apply_failures_total", workload=W.key, substrate="syscall") >= 1
        (kubelet / "envelope").unlink()
        assert wait_for(lambda: node_entry(kube).state == "applied", sync)
        assert seccomp_file(tmp_path).exists()
    finally:
        sync.close()


def test_egress_failures_and_a_node_without_enforcement(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    api_policies(kube).create(POLICY)
    observe_only = Policy(Workload("agents", "Deployment", "indexer", "main"), mode="observe",
                          syscalls=("read",))
    api_policies(kube).create(observe_only)
    sync = open_sync(cfg, metrics)
    sync.start(observer(cfg), None)  # this node does not enforce egress
    try:
        assert wait_for(lambda: node_entry(kube) is not None and node_entry(kube, "indexer-main") is not None, sync)
    finally:
        sync.close()
    entry = node_entry(kube)
    assert entry.state == "failed" and "needs egress enforcement" in entry.reason
    assert entry.localhost_profile == LOCALHOST and seccomp_file(tmp_path).exists()
    assert sample(metrics, "envelope_policy_apply_failures_total", workload=W.key, substrate="egress") == 1
    indexer = node_entry(kube, "indexer-main")
    assert indexer.state == "applied" and indexer.mode == "observe"

    # with an enforcement that fails, the apply error is the reason, and it is tried again
    enforcement = Enforcement(fail="attach /sys/fs/cgroup/unified/kubepods/x: Operation not permitted")
    sync = open_sync(cfg, metrics)
    sync.start(observer(cfg), enforcement)
    try:
        assert wait_for(lambda: len(enforcement.calls) >= 2 and "rolled back" in node_entry(kube).reason, sync)
    finally:
        sync.close()
    entry = node_entry(kube)
    assert entry.state == "failed" and entry.reason.startswith("egress: apply")
    assert sample(metrics, "envelope_policy_apply_failures_total", workload=W.key, substrate="egress") >= 3


# ---- the API down ---------------------------------------------------------------------------------------


def test_api_down_never_crashes_counts_retries_and_recovers(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    api_policies(kube).create(POLICY)
    pod = load("pod-research-agent.json")
    kube.put(pod)
    kube.mode = "down"
    obs = observer(cfg)
    sync = open_sync(cfg, metrics)
    sync.start(obs, Enforcement())
    try:
        def counted(call):
            return sample(metrics, "envelope_api_errors_total", call=call)

        # the node keeps working from cgroup and OCI identity: a container is bound and flushed
        obs.agg.bind(11, W, "c-1")
        obs.agg.on_counts({11: {0: 3}}, time.time())
        sync.publish(obs.agg.profiles, obs.agg.flush())
        assert wait_for(lambda: counted("list/watch leastprivilegepolicies") >= 2
                        and counted("apply workloadprofiles") >= 3 and counted("list/watch pods") >= 2, sync)
        assert sync.policy_informer.failures >= 2 and "HTTP 503" in sync.policy_informer.last_error
        assert sync.policies.running and sync.publisher._thread.is_alive() and sync.pods.running
        assert node_entry(kube) is None and kube.names() == []
        assert sync.pods.identity(pod["metadata"]["uid"], container_name="agent") is None

        kube.mode = "ok"  # the API is back: everything catches up without a restart
        reader = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=1))
        assert wait_for(lambda: node_entry(kube) is not None and reader.read(W)[0] is not None
                        and sync.pods.synced.is_set(), sync)
        assert node_entry(kube).state == "applied"
        assert reader.read(W)[0].behaviours()["syscall:read"].count == 3
    finally:
        assert sync.close() is True


def test_close_makes_one_short_last_attempt_while_the_api_is_down(kube, tmp_path):
    cfg = config(kube, tmp_path)
    obs = observer(cfg)
    kube.mode = "down"
    sync = open_sync(cfg, None, backoff=Backoff())  # default backoff: 5 attempts per call
    sync.start(obs, None)
    obs.agg.bind(11, W, "c-1")
    obs.agg.on_counts({11: {0: 3}}, time.time())
    sync.publish(obs.agg.profiles, obs.agg.flush())

    def applies():
        return kube.count("PATCH", "/workloadprofiles/")

    assert wait_for(lambda: applies() >= 1, sync)
    before = applies()
    assert sync.close() is False  # the retry sleeps end at once; nothing could be written
    # at most the attempt in flight plus the two of the final flush, not another five
    assert applies() - before <= 3
    assert not sync.publisher._thread and not sync.policies.running


# ---- stale detection ---------------------------------------------------------------------------------------


def derived_policy(pod: dict) -> Policy:
    """A policy whose validity records the fingerprint of ``pod``'s agent container."""
    fps = container_fingerprints(pod, "agent", load("serviceaccount-research-agent.json"))
    validity = {"fingerprint": {k: [v] for k, v in fps.items()},
                "triggers": [{"name": n, "key": k, "source": "fingerprint"} for k, n in
                             (("image", "image-change"), ("model", "model-version-change"),
                              ("prompt_template", "prompt-template-change"), ("tool_catalog", "tool-catalog-change"),
                              ("service_account", "identity-scope-change"))],
                "derivedAt": "2026-11-20T16:00:00Z"}
    return Policy(W, mode="enforce", substrates=("syscall",), syscalls=POLICY.syscalls, validity=validity)


def test_rollout_with_a_new_image_and_model_marks_the_policy_stale(kube, tmp_path):
    cfg = config(kube, tmp_path, rebaseline_on_stale=True)
    metrics = Metrics()
    old, new = load("pod-research-agent.json"), load("pod-research-agent-rollout.json")
    api_policies(kube).create(derived_policy(old))
    state.set_mode(cfg.state_dir, W, "enforce", reason="derived and reviewed", actor="test")
    kube.put(new)
    obs = observer(cfg)
    sync = open_sync(cfg, metrics)
    sync.start(obs, Enforcement())
    try:
        assert wait_for(lambda: sync.pods.synced.is_set(), sync)
        bind_container(obs, 21, new, "agent", known_identity(sync, new["metadata"]["uid"], "agent"))
        obs.agg.on_counts({21: {0: 7, 39: 1}}, time.time())
        assert "syscall:read" in obs.agg.profiles[W].behaviours()

        assert wait_for(lambda: is_stale(policy_obj(kube, "agents", "research-agent-agent")), sync)
        assert wait_for(lambda: node_entry(kube).stale is True, sync)
        # the re-baseline is recorded; the daemon's enforcement side restarts the window on it
        assert wait_for(lambda: state.rebaseline_generation(cfg.state_dir, W) == 1, sync)
        # re-baselining moves the cluster policy to alert; the judgement stays with the new generation
        assert wait_for(lambda: policy_obj(kube, "agents", "research-agent-agent")["spec"]["mode"] == "alert", sync)
        assert wait_for(lambda: condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
                        ["observedGeneration"] == 2, sync)
        obj = policy_obj(kube, "agents", "research-agent-agent")
        assert is_stale(obj) and obj["metadata"]["generation"] == 2
        cond = condition(obj, "Stale")
        assert (cond["type"], cond["reason"]) == ("Stale", "FingerprintChanged")
        assert "image" in cond["message"] and "model" in cond["message"]
        assert obj["spec"]["mode"] == "alert", "re-baselining moves the cluster policy to alert"
        stale_entries = audit.read(cfg.state_dir, workload=W.key, action="policy.stale")
        assert len(stale_entries) == 1
        assert stale_entries[0]["details"]["changed"] == ["image", "model"]  # pod_template_hash is informational
        assert "research-agent-5b8d4f7c9-q9wzt" in stale_entries[0]["reason"]
        assert state.get_mode(cfg.state_dir, W) == "alert"
        assert [e["action"] for e in audit.read(cfg.state_dir, workload=W.key)] == \
            ["mode.set", "policy.stale", "rebaseline"]
        assert audit.verify(cfg.state_dir).ok
        assert sample(metrics, "envelope_policies_stale") == 1
        assert sample(metrics, "envelope_policy_stale", workload=W.key) == 1
        # the new generation (alert) is applied; the same change is not handled twice
        assert wait_for(lambda: node_entry(kube).mode == "alert", sync)
        syncs = sync.policies.stats["rounds"]
        assert wait_for(lambda: sync.policies.stats["rounds"] >= syncs + 3, sync)
    finally:
        sync.close()
    assert len(audit.read(cfg.state_dir, action="policy.stale")) == 1

    # a restarted daemon remembers the change it handled
    again = open_sync(cfg, Metrics())
    obs2 = observer(cfg)
    again.start(obs2, Enforcement())
    try:
        assert wait_for(again.pods.synced.is_set, again)
        bind_container(obs2, 21, new, "agent", known_identity(again, new["metadata"]["uid"], "agent"))
        syncs = again.policies.stats["rounds"]
        assert wait_for(lambda: again.policies.stats["rounds"] >= syncs + 3, again)
    finally:
        again.close()
    assert len(audit.read(cfg.state_dir, action="policy.stale")) == 1
    assert [e["action"] for e in audit.read(cfg.state_dir, workload=W.key)][-1] == "rebaseline"


def test_an_annotation_changed_in_place_is_seen_through_the_pod_watch(kube, tmp_path):
    cfg = config(kube, tmp_path)  # no re-baseline: mark stale only
    metrics = Metrics()
    pod = load("pod-research-agent.json")
    api_policies(kube).create(derived_policy(pod))
    kube.put(pod)
    obs = observer(cfg)
    sync = open_sync(cfg, metrics)
    sync.start(obs, Enforcement())
    try:
        assert wait_for(sync.pods.synced.is_set, sync)
        bind_container(obs, 31, pod, "agent", known_identity(sync, pod["metadata"]["uid"], "agent"))
        assert wait_for(lambda: node_entry(kube) is not None, sync)
        syncs = sync.policies.stats["rounds"]
        assert wait_for(lambda: sync.policies.stats["rounds"] >= syncs + 3, sync)
        assert not is_stale(policy_obj(kube, "agents", "research-agent-agent")), "the running pod matches"
        assert audit.read(cfg.state_dir, action="policy.stale") == []

        changed = copy.deepcopy(pod)
        changed["metadata"]["annotations"]["envelope.dev/tool-catalog"] = "search,fetch,python@v3,shell"
        kube.put(changed)  # `kubectl annotate` on the running pod: same container, same cgroup
        assert wait_for(lambda: is_stale(policy_obj(kube, "agents", "research-agent-agent")), sync)
    finally:
        sync.close()
    (entry,) = audit.read(cfg.state_dir, action="policy.stale")
    assert entry["details"]["changed"] == ["tool_catalog"] and entry["details"]["rebaseline"] is False
    obj = policy_obj(kube, "agents", "research-agent-agent")
    assert obj["spec"]["mode"] == "enforce", "without rebaseline_on_stale the mode stays"
    assert sample(metrics, "envelope_policies_stale") == 1


def test_a_policy_another_node_marked_stale_is_audited_here_but_not_marked_again(kube, tmp_path):
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    old, new = load("pod-research-agent.json"), load("pod-research-agent-rollout.json")
    other = ClusterPolicies.from_api_client(kube.api_client(), "worker-1", backoff=Backoff(attempts=1))
    cp = other.create(derived_policy(old))
    assert other.mark_stale(cp, "FingerprintChanged", "fingerprint inputs changed: image (seen on worker-1)")
    kube.put(new)
    obs = observer(cfg)
    sync = open_sync(cfg, metrics)
    sync.start(obs, Enforcement())
    try:
        assert wait_for(lambda: sync.pods.pod(new["metadata"]["uid"]) is not None, sync)
        bind_container(obs, 41, new, "agent", known_identity(sync, new["metadata"]["uid"], "agent"))
        assert wait_for(lambda: audit.read(cfg.state_dir, action="policy.stale") != [], sync)
        assert wait_for(lambda: node_entry(kube) is not None and node_entry(kube).stale is True, sync)
    finally:
        sync.close()
    (entry,) = audit.read(cfg.state_dir, action="policy.stale")
    assert entry["details"]["changed"] == ["image", "model"]
    cond = condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
    assert cond["message"].endswith("(seen on worker-1)"), "the condition another node set is left as it was"
    assert sample(metrics, "envelope_policy_stale", workload=W.key) == 1


# ---- a black-holed API server ------------------------------------------------------------------------


def test_a_black_holed_api_server_changes_no_event_count(kube, tmp_path):
    """The API accepts every request and never answers: the loop's side (counting, flushing,
    handing profiles to publishing, the jobs' tick, identity reads) goes on and counts every
    event, while the jobs' own threads wait on their requests."""
    cfg = config(kube, tmp_path)
    metrics = Metrics()
    api_policies(kube).create(POLICY)
    pod = load("pod-research-agent.json")
    kube.put(pod)
    obs = observer(cfg)
    sync = open_sync(cfg, metrics, request_timeout=(1.0, 3.0))  # held 3 s, then retried: held again
    sync.start(obs, Enforcement())
    try:
        assert wait_for(lambda: node_entry(kube) is not None, sync)
        bind_container(obs, 21, pod, "agent", known_identity(sync, pod["metadata"]["uid"], "agent"))
        kube.mode = "blackhole"
        rollout = load("pod-research-agent-rollout.json")
        sync.pods.informer.apply_event({"type": "ADDED", "object": rollout})  # its owner is not cached
        steps = 0
        for i in range(1, 401):  # the daemon's loop: counter readings, ticks, flushes, identity reads
            obs.agg.on_counts({21: {0: i, 257: 2 * i}}, time.time())
            sync.tick()
            assert sync.pods.identity(rollout["metadata"]["uid"], container_name="agent") is None
            if i % 50 == 0:
                sync.publish(obs.agg.profiles, obs.agg.flush())
            steps += 1
            if i == 200:
                assert wait_for(lambda: kube.hanging >= 2, sync)  # requests are held in the black hole
        assert steps == 400 and kube.hanging >= 2
        b = obs.agg.profiles[W].behaviours()
        assert (b["syscall:read"].count, b["syscall:openat"].count) == (400, 800), "every event counted"
    finally:
        kube.mode = "ok"
        sync.close(timeout=5.0)


def test_a_rederived_policy_clears_stale_and_a_mode_change_keeps_it(kube, tmp_path):
    cfg = config(kube, tmp_path)
    pod = load("pod-research-agent.json")
    other = ClusterPolicies.from_api_client(kube.api_client(), "worker-1", backoff=Backoff(attempts=1))
    cp = other.create(derived_policy(pod))
    assert other.mark_stale(cp, "FingerprintChanged", "fingerprint inputs changed: image (seen on worker-1)")
    marked = condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
    sync = open_sync(cfg, Metrics())
    sync.start(observer(cfg), Enforcement())
    try:
        # a mode change is a new generation of the same derivation: the judgement is carried
        other.set_mode(other.get("agents", "research-agent-agent"), "alert")
        assert wait_for(lambda: condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
                        ["observedGeneration"] == 2, sync)
        carried = condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
        assert carried["status"] == "True" and carried["lastTransitionTime"] == marked["lastTransitionTime"]
        # derived again (a new validity): this node clears it
        import dataclasses
        rederived = dataclasses.replace(derived_policy(load("pod-research-agent-rollout.json")), mode="alert")
        other.create(rederived)
        assert wait_for(lambda: condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
                        ["status"] == "False", sync)
        cleared = condition(policy_obj(kube, "agents", "research-agent-agent"), "Stale")
        assert (cleared["reason"], cleared["observedGeneration"]) == ("Rederived", 3)
        assert not is_stale(policy_obj(kube, "agents", "research-agent-agent"))
        assert wait_for(lambda: (condition(policy_obj(kube, "agents", "research-agent-agent"), "Ready") or {})
                        .get("observedGeneration") == 3, sync)
    finally:
        sync.close()
