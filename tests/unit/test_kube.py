"""Owner resolution, workload naming, fingerprints and stale detection against recorded API
objects (the pure layer, sensor.kube). The pod watcher is tested in test_pods.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensor.kube import (
    DEFAULT_FINGERPRINT_KEYS,
    container_fingerprints,
    fingerprint_changes,
    image_digest,
    pod_container_name,
    pod_identity,
    resolve_owner,
    workload_from_pod_name,
)

K8S = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"


def load(name: str) -> dict:
    return json.loads((K8S / name).read_text())


def api_objects() -> dict:
    """Every recorded object by (kind, namespace, name): what a lookup against the API returns."""
    out = {}
    for f in sorted(K8S.glob("*.json")):
        obj = json.loads(f.read_text())
        if "kind" in obj and "metadata" in obj and obj["kind"] != "PodList":
            m = obj["metadata"]
            out[(obj["kind"], m.get("namespace", "default"), m["name"])] = obj
    return out


OBJECTS = api_objects()


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


def test_fixtures_are_valid_api_objects():
    """The recorded objects validate against the Kubernetes OpenAPI schema (strict)."""
    import kubernetes_validate as kv  # a test dependency (pyproject [test])
    checked = 0
    for f in sorted(K8S.glob("*.json")):
        obj = json.loads(f.read_text())
        if "apiVersion" not in obj or "kind" not in obj:
            continue  # OCI configs and docker container configs are not API objects
        kv.validate(obj, desired_version="1.33", strict=True)
        checked += 1
    assert checked >= 15


# ---- owner resolution ------------------------------------------------------------------------


@pytest.mark.parametrize("pod,expected", [
    ("pod-research-agent.json", ("Deployment", "research-agent")),
    ("pod-research-agent-rollout.json", ("Deployment", "research-agent")),
    ("pod-vector-store-2.json", ("StatefulSet", "vector-store")),
    ("pod-node-exporter.json", ("DaemonSet", "node-exporter")),
    ("pod-eval-nightly.json", ("CronJob", "eval-nightly")),
    ("pod-debug-shell.json", ("Pod", "debug-shell")),
])
def test_owner_resolution_across_kinds(pod, expected):
    assert resolve_owner(load(pod), lookup) == expected


def test_owner_chain_follows_the_replicaset_not_the_name():
    # A ReplicaSet owned by something other than a Deployment (e.g. an Argo Rollout) is
    # reported as that owner: the API answer wins over the naming rule.
    rs = json.loads(json.dumps(OBJECTS[("ReplicaSet", "agents", "research-agent-7c9f8b6d5")]))
    rs["metadata"]["ownerReferences"][0].update(kind="Rollout", name="research-agent-canary")
    got = resolve_owner(load("pod-research-agent.json"),
                        lambda k, ns, n: rs if k == "ReplicaSet" else None)
    assert got == ("Rollout", "research-agent-canary")
    orphan = json.loads(json.dumps(rs))
    orphan["metadata"].pop("ownerReferences")
    got = resolve_owner(load("pod-research-agent.json"),
                        lambda k, ns, n: orphan if k == "ReplicaSet" else None)
    assert got == ("ReplicaSet", "research-agent-7c9f8b6d5")


@pytest.mark.parametrize("pod,expected", [
    ("pod-research-agent.json", ("Deployment", "research-agent")),  # pod-template-hash rule
    ("pod-eval-nightly.json", ("CronJob", "eval-nightly")),  # <cronjob>-<schedule> job name
    ("pod-vector-store-2.json", ("StatefulSet", "vector-store")),
])
def test_owner_resolution_without_the_api(pod, expected):
    assert resolve_owner(load(pod), None) == expected


@pytest.mark.parametrize("name,labels,expected", [
    ("research-agent-7c9f8b6d5-x2k4p", None, ("Deployment", "research-agent")),
    ("web-5d8f7b6c9-q9wzt", {"pod-template-hash": "5d8f7b6c9"}, ("Deployment", "web")),
    ("coredns-5dd5756b68-7xz2v", None, ("Deployment", "coredns")),
    ("vector-store-2", None, ("StatefulSet", "vector-store")),
    ("kafka-broker-10", None, ("StatefulSet", "kafka-broker")),
    ("node-exporter-7xqzt", None, ("DaemonSet", "node-exporter")),
    ("kube-proxy-2457x", None, ("DaemonSet", "kube-proxy")),
    ("fluent-bit-24578", None, ("DaemonSet", "fluent-bit")),  # all-digit suffix from the generator alphabet
    ("eval-nightly-29400600-v7b2m", None, ("CronJob", "eval-nightly")),
    ("migrate-x", {"job-name": "migrate"}, ("Job", "migrate")),
    ("vector-store-0", {"statefulset.kubernetes.io/pod-name": "vector-store-0"}, ("StatefulSet", "vector-store")),
    ("cilium-bx7kq", {"controller-revision-hash": "6b7f9d8c4b", "pod-template-generation": "1"}, ("DaemonSet", "cilium")),
    ("debug-shell", None, ("Pod", "debug-shell")),
    ("etcd-control-plane", None, ("Pod", "etcd-control-plane")),  # static pod: name-node
])
def test_workload_from_pod_name(name, labels, expected):
    assert workload_from_pod_name(name, labels) == expected


# ---- fingerprints ----------------------------------------------------------------------------


def test_fingerprints_of_a_deployment_container():
    pod = load("pod-research-agent.json")
    sa = load("serviceaccount-research-agent.json")
    fp = container_fingerprints(pod, "agent", sa)
    assert fp == {
        "cloud_identity:aws": "arn:aws:iam::111122223333:role/research-agent-bedrock",
        "image": "sha256:4b1f6ce7a2e05cd2cf91b26f0e2d0bfa8a2d3c64b6e1bd2f4c9a0e7f3d5b8a21",
        "model": "claude-sonnet-4-5-20250929",
        "pod_template_hash": "7c9f8b6d5",
        "prompt_template": "sha256:c0ffee00d15ea5e5",
        "service_account": "research-agent",
        "tool_catalog": "search,fetch,python@v3",
    }
    assert list(fp) == sorted(fp)  # deterministic order
    side = container_fingerprints(pod, "otel-collector", sa)
    assert side["image"] == "sha256:1e0c6f3b5a7d9c2e4f6a8b0d2c4e6a8c0e2a4c6e8a0c2e4a6c8e0a2c4e6a8c0e"


def test_cloud_identities_gke_and_azure():
    sts = container_fingerprints(load("pod-vector-store-2.json"), "qdrant",
                                 load("serviceaccount-indexer-gke.json"))
    assert sts["cloud_identity:gcp"] == "indexer@example-prod.iam.gserviceaccount.com"
    assert sts["pod_template_hash"] == "vector-store-6d9f8c7b5d"  # controller-revision-hash
    job = container_fingerprints(load("pod-eval-nightly.json"), "eval",
                                 load("serviceaccount-planner-azure.json"))
    assert job["cloud_identity:azure"] == "5e0c2c1d-7f4b-4a3e-9d8c-1b2a3f4e5d6c"
    assert job["model"] == "claude-haiku-4-5" and "tool_catalog" not in job


def test_configurable_fingerprint_keys_read_labels_too():
    pod = load("pod-research-agent.json")
    pod["metadata"]["labels"]["ai.example.com/model"] = "gpt-4.1"
    keys = {"model": "ai.example.com/model"}
    fp = container_fingerprints(pod, "agent", None, keys)
    assert fp["model"] == "gpt-4.1" and "prompt_template" not in fp and "tool_catalog" not in fp
    assert set(DEFAULT_FINGERPRINT_KEYS.values()) == {
        "envelope.dev/model-version", "envelope.dev/prompt-template", "envelope.dev/tool-catalog"}


def test_image_digest_forms():
    assert image_digest("docker-pullable://busybox@sha256:768e") == "sha256:768e"
    assert image_digest("docker.io/library/nginx@sha256:abcd") == "sha256:abcd"
    assert image_digest("sha256:0123") == "sha256:0123"
    fp = container_fingerprints(load("pod-debug-shell.json"), "debug-shell")
    assert fp["image"] == "sha256:768e5c6f5cb6db0794eec98dc7a967f40631746c32232b78a3105fb946f3ab83"
    assert fp["service_account"] == "default"


def test_image_absent_until_reported():
    pod = load("pod-research-agent.json")
    pod["status"]["containerStatuses"][0]["imageID"] = ""
    assert "image" not in container_fingerprints(pod, "agent")


def test_stale_detection_across_a_rollout():
    sa = load("serviceaccount-research-agent.json")
    old = container_fingerprints(load("pod-research-agent.json"), "agent", sa)
    new = container_fingerprints(load("pod-research-agent-rollout.json"), "agent", sa)
    assert fingerprint_changes(old, new) == ["image", "model", "pod_template_hash"]
    assert fingerprint_changes(old, dict(old)) == []
    side_old = container_fingerprints(load("pod-research-agent.json"), "otel-collector", sa)
    side_new = container_fingerprints(load("pod-research-agent-rollout.json"), "otel-collector", sa)
    assert fingerprint_changes(side_old, side_new) == ["model", "pod_template_hash"]
    # a removed annotation and a new cloud identity are changes too
    assert fingerprint_changes({"tool_catalog": "a"}, {"cloud_identity:aws": "arn"}) == [
        "cloud_identity:aws", "tool_catalog"]


def test_pod_identity_by_container_id():
    pod = load("pod-research-agent.json")
    cid = "3f1b9c2d7e4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c"
    assert pod_container_name(pod, cid) == "agent"
    assert pod_container_name(pod, "f" * 64) is None
    ident = pod_identity(pod, lookup, container_id=cid)
    assert (ident.namespace, ident.kind, ident.name, ident.container_name) == (
        "agents", "Deployment", "research-agent", "agent")
    assert ident.fingerprints["cloud_identity:aws"].startswith("arn:aws:iam::")


_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_dns_segment = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@given(segments=st.lists(_dns_segment, min_size=1, max_size=4),
       h=st.text(alphabet=_SAFE, min_size=6, max_size=10), suffix=st.text(alphabet=_SAFE, min_size=5, max_size=5))
def test_generated_deployment_pod_names_resolve_to_the_deployment(segments, h, suffix):
    deploy = "-".join(segments)
    pod = f"{deploy}-{h}-{suffix}"
    assert workload_from_pod_name(pod, {"pod-template-hash": h}) == ("Deployment", deploy)
    assert workload_from_pod_name(pod) == ("Deployment", deploy)


@given(segments=st.lists(_dns_segment, min_size=1, max_size=4), ordinal=st.integers(0, 9999))
def test_statefulset_pod_names_resolve_to_the_statefulset(segments, ordinal):
    sts = "-".join(segments)
    assert workload_from_pod_name(f"{sts}-{ordinal}") == ("StatefulSet", sts)
