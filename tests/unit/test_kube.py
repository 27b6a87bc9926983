"""Owner resolution, workload naming, fingerprints and stale detection against recorded API
objects; the pod watcher against a real HTTP server on 127.0.0.1 that fails and recovers."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from tests.kubeconfig import write_kubeconfig  # noqa: E402
from hypothesis import given
from hypothesis import strategies as st

from sensor.kube import (
    DEFAULT_FINGERPRINT_KEYS,
    Backoff,
    KubeWatcher,
    container_fingerprints,
    fingerprint_changes,
    image_digest,
    make_api_client,
    watcher_from_environment,
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


# ---- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_exponentially_to_a_cap_and_resets():
    b = Backoff(initial=0.5, maximum=4.0, factor=2.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5
    j = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rng=random.Random(7))
    delays = [j.next() for _ in range(5)]
    for d, base in zip(delays, [1, 2, 4, 8, 8]):
        assert base * 0.5 <= d <= base
    with pytest.raises(ValueError):
        Backoff(initial=0)


# ---- the watcher against a real local API server -------------------------------------------


class FakeApiServer:
    """A real HTTP server on 127.0.0.1 speaking just enough of the Kubernetes API.

    ``mode`` is ``"error"`` (every request gets HTTP 500), ``"reset"`` (the connection is
    closed without a response) or ``"ok"`` (pods of the node, one watch event, owners)."""

    def __init__(self):
        self.mode = "error"
        self.requests: list[str] = []
        self.watch_events: list[dict] = []
        self.stop = threading.Event()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                srv.requests.append(self.path)
                if srv.mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if srv.mode == "error":
                    return self._json(500, {"kind": "Status", "status": "Failure", "code": 500,
                                            "message": "etcdserver: request timed out"})
                url = urlparse(self.path)
                q = parse_qs(url.query)
                if url.path == "/api/v1/pods":
                    assert q.get("fieldSelector") == ["spec.nodeName=worker-2"], q
                    if q.get("watch") == ["true"]:
                        return self._watch()
                    return self._json(200, load("podlist-worker-2.json"))
                parts = url.path.strip("/").split("/")
                # /apis/apps/v1/namespaces/<ns>/replicasets/<name>, /api/v1/namespaces/<ns>/serviceaccounts/<name>
                kinds = {"replicasets": "ReplicaSet", "jobs": "Job", "serviceaccounts": "ServiceAccount"}
                if len(parts) >= 4 and parts[-2] in kinds and parts[-4] == "namespaces":
                    obj = OBJECTS.get((kinds[parts[-2]], parts[-3], parts[-1]))
                    if obj is not None:
                        return self._json(200, obj)
                return self._json(404, {"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"})

            def _watch(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events, srv.watch_events = srv.watch_events, []
                for ev in events:
                    data = (json.dumps(ev) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                srv.stop.wait(0.2)  # hold the watch open briefly, as the API server does
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    srv = FakeApiServer()
    yield srv
    srv.close()


def wait_for(cond, timeout=30.0):
    """Poll ``cond``; the timeout only stops a hung test, it is not what is being tested."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def make_watcher(url, **kw):
    kw.setdefault("retry_after", 0.0)
    return KubeWatcher("worker-2", make_api_client(host=url),
                       backoff=Backoff(initial=0.01, maximum=0.05, jitter=0.0),
                       request_timeout=2.0, watch_timeout=1, **kw)


@pytest.mark.parametrize("mode", ["error", "reset"])
def test_watcher_retries_with_backoff_and_never_crashes(api, mode):
    api.mode = mode
    w = make_watcher(api.url).start()
    try:
        # failures accumulate and so does the backoff (it is reset only by a success)
        assert wait_for(lambda: w.failures >= 4 and w.backoff.attempt >= 4)
        assert w._thread is not None and w._thread.is_alive()
        assert not w.synced.is_set()
        assert w.last_error and "pod list/watch" in w.last_error
        # reads answer None instead of raising while the API is down
        assert w.identity("8f7d2c1e-4a6b-4c3d-9e8f-1a2b3c4d5e6f") is None
        idle = make_watcher(api.url)  # not started, so its counter is this call's alone
        assert idle.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5") is None
        assert idle.failures == 1 and "get ReplicaSet agents/research-agent-7c9f8b6d5" in idle.last_error
        # the API comes back: the same watcher lists, watches and resolves
        api.requests.clear()
        rollout = load("pod-research-agent-rollout.json")
        api.watch_events = [{"type": "ADDED", "object": rollout}]
        api.mode = "ok"
        assert wait_for(w.synced.is_set)
        assert wait_for(lambda: w.pod(rollout["metadata"]["uid"]) is not None)
        ident = w.identity("8f7d2c1e-4a6b-4c3d-9e8f-1a2b3c4d5e6f",
                           container_id="3f1b9c2d7e4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c")
        assert ident is not None
        assert (ident.namespace, ident.kind, ident.name, ident.container_name) == (
            "agents", "Deployment", "research-agent", "agent")
        assert ident.fingerprints["cloud_identity:aws"] == \
            "arn:aws:iam::111122223333:role/research-agent-bedrock"
        assert any("/replicasets/research-agent-7c9f8b6d5" in r for r in api.requests)
        assert any("watch=true" in r for r in api.requests)
    finally:
        w.stop()
    assert w._thread is None


def test_owner_cache_survives_an_outage(api):
    api.mode = "ok"
    w = make_watcher(api.url, owner_ttl=0.0)  # every read goes to the API
    rs = w.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5")
    assert rs is not None and rs["metadata"]["ownerReferences"][0]["name"] == "research-agent"
    assert w.get_object("Job", "agents", "no-such-job") is None  # 404 is an answer, not a failure
    assert w.failures == 0
    api.mode = "error"
    again = w.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5")
    assert again == rs and w.failures == 1  # the last good answer is kept through the outage


def test_watch_events_update_delete_and_expire():
    t = [0.0]
    w = KubeWatcher("worker-2", make_api_client(host="http://127.0.0.1:9"),
                    tombstone_ttl=60.0, clock=lambda: t[0])
    pod = load("pod-node-exporter.json")
    uid = pod["metadata"]["uid"]
    g = w.generation
    w.apply_event({"type": "ADDED", "object": pod})
    assert w.pod(uid) is not None and w.generation == g + 1
    assert w.resource_version == "5530"
    w.apply_event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "6000"}}})
    assert w.resource_version == "6000" and w.generation == g + 1
    w.apply_event({"type": "DELETED", "object": pod})
    assert w.pod(uid) is not None  # kept for late lookups of short-lived containers
    assert w.pod_by_name("monitoring", "node-exporter-7xqzt") is not None
    t[0] = 61.0
    w.apply_event({"type": "ADDED", "object": load("pod-debug-shell.json")})
    assert w.pod(uid) is None
    with pytest.raises(Exception, match="too old"):
        w.apply_event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}})


def test_failed_owner_lookup_is_not_retried_on_every_read(api):
    t = [100.0]
    w = make_watcher(api.url, retry_after=30.0, clock=lambda: t[0])
    assert w.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5") is None
    assert w.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5") is None
    assert len(api.requests) == 1 and w.failures == 1  # the second read did not wait on the API
    api.mode = "ok"
    t[0] += 31.0
    assert w.get_object("ReplicaSet", "agents", "research-agent-7c9f8b6d5") is not None
    assert len(api.requests) == 2


def test_expired_watch_relists(api):
    api.mode = "ok"
    api.watch_events = [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
        "message": "too old resource version: 951100 (951377)"}}]
    w = make_watcher(api.url).start()
    try:
        def lists():
            return [r for r in api.requests if r.startswith("/api/v1/pods") and "watch=true" not in r]
        assert wait_for(lambda: len(lists()) >= 2)  # listed, watch expired, listed again
        assert w.failures == 0 and w.synced.is_set()
        assert w.pod_by_name("agents", "vector-store-2") is not None
    finally:
        w.stop()


def test_watcher_from_environment(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert watcher_from_environment("worker-2") is None  # no API configured: OCI and cgroups only
    assert watcher_from_environment("worker-2", kubeconfig=str(tmp_path / "missing")) is None
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    api.mode = "ok"
    w = watcher_from_environment("worker-2", kubeconfig=str(kubeconfig),
                                 backoff=Backoff(initial=0.01, maximum=0.05), watch_timeout=1)
    assert w is not None
    try:
        assert wait_for(w.synced.is_set)
        assert w.pod("c9d0e1f2-a3b4-4c5d-8e6f-8091a2b3c4d5") is not None
    finally:
        w.stop()


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
