"""The cluster clients against a real HTTP server on 127.0.0.1 that speaks the Kubernetes API's
JSON for custom objects (list with label selectors and pagination, get, server-side apply,
merge patch, the status subresource, delete), with injectable failures.

The clients under test are the real ``kubernetes`` CustomObjectsApi plus Envelope's code; only
the API server is local.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import structlog
from kubernetes import client

from sensor.crd import (
    GROUP, LABEL_NODE, LABEL_WORKLOAD, PLURAL, VERSION, Backoff, ClusterApiError, ClusterProfiles,
    call_with_retry, contribution_to_crs, object_name,
)
from enforcer.crd import ClusterPolicies, for_workload, is_stale, node_statuses, policy_to_cr
from enforcer.policy import EgressRule, Policy
from sensor.profile import Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "researcher", "main")
W2 = Workload("agents", "Deployment", "writer", "main")


@pytest.fixture(autouse=True)
def _plain_logging():
    """Log to whatever stderr is now: an earlier test's ``envelope.cli.main`` may have bound
    structlog to a captured stream that pytest has since closed."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


# ---- a small API server ------------------------------------------------------------------------


def _merge_lists(old: list, new: list) -> list:
    for key in ("node", "type", "name"):
        if all(isinstance(x, dict) and key in x for x in old + new) and (old or new):
            out = {x[key]: x for x in old}
            for x in new:
                out[x[key]] = _apply_merge(out.get(x[key], {}), x)
            return [out[k] for k in sorted(out)]
    return new


def _apply_merge(old, new):
    """Server-side apply, simplified: maps merge, keyed lists merge by key, the rest replace."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _apply_merge(old.get(k), v) if k in old else v
        return out
    if isinstance(old, list) and isinstance(new, list):
        return _merge_lists(old, new)
    return new


def _merge_patch(old, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(old) if isinstance(old, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


class FakeKubeAPI:
    """Custom objects of any group/plural, namespaced, in memory."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (group, ns, plural, name)
        self.rv = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content-type)
        self.faults: list[int | str] = []  # next responses: an HTTP status, or "drop"
        self.page_size_cap: int | None = None
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null")

            def _send(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "message": message, "code": code})

            def _handle(self, method: str):
                url = urlparse(self.path)
                body = self._body() if method in ("POST", "PUT", "PATCH") else None
                with api.lock:
                    api.requests.append((method, url.path, self.headers.get("Content-Type", "")))
                    fault = api.faults.pop(0) if api.faults else None
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if isinstance(fault, int):
                    return self._status(fault, "InternalError", "injected failure")
                parts = url.path.strip("/").split("/")
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                # /apis/{group}/{version}/{plural}: a list across namespaces
                if len(parts) == 4 and parts[0] == "apis" and method == "GET":
                    with api.lock:
                        return self._list(parts[1], None, parts[3], q)
                # /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/status]]
                if len(parts) < 6 or parts[0] != "apis" or parts[3] != "namespaces":
                    return self._status(404, "NotFound", f"no route {url.path}")
                group, ns, plural = parts[1], parts[4], parts[5]
                name = parts[6] if len(parts) > 6 else None
                sub = parts[7] if len(parts) > 7 else None
                with api.lock:
                    return self._route(method, group, ns, plural, name, sub, q, body)

            def _route(self, method, group, ns, plural, name, sub, q, body):
                key = (group, ns, plural, name)
                if name is None and method == "GET":
                    return self._list(group, ns, plural, q)
                if name is None and method == "POST":
                    name = body["metadata"]["name"]
                    key = (group, ns, plural, name)
                    if key in api.objects:
                        return self._status(409, "AlreadyExists", f"{plural} {name} already exists")
                    return self._send(201, api._store(key, body, None))
                cur = api.objects.get(key)
                if method == "GET":
                    if cur is None:
                        return self._status(404, "NotFound", f"{plural} {name} not found")
                    return self._send(200, cur)
                if method == "DELETE":
                    if cur is None:
                        return self._status(404, "NotFound", f"{plural} {name} not found")
                    del api.objects[key]
                    return self._send(200, {"kind": "Status", "status": "Success"})
                if method == "PUT":
                    if cur is None:
                        return self._status(404, "NotFound", f"{plural} {name} not found")
                    if body["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]:
                        return self._status(409, "Conflict", "the object has been modified")
                    return self._send(200, api._store(key, body, cur, sub))
                if method == "PATCH":
                    ctype = self.headers.get("Content-Type", "")
                    if ctype.startswith("application/apply-patch"):
                        if not q.get("fieldManager"):
                            return self._status(400, "BadRequest", "fieldManager is required for apply")
                        if cur is None:
                            if sub:
                                return self._status(404, "NotFound", f"{plural} {name} not found")
                            return self._send(201, api._store(key, body, None))
                        merged = _apply_merge(copy.deepcopy(cur), body)
                    elif ctype.startswith("application/merge-patch"):
                        if cur is None:
                            return self._status(404, "NotFound", f"{plural} {name} not found")
                        merged = _merge_patch(copy.deepcopy(cur), body)
                    else:
                        return self._status(415, "UnsupportedMediaType", ctype)
                    return self._send(200, api._store(key, merged, cur, sub))
                return self._status(405, "MethodNotAllowed", method)

            def _list(self, group, ns, plural, q):
                sel = {}
                for term in filter(None, (q.get("labelSelector") or "").split(",")):
                    k, v = term.split("=", 1)
                    sel[k] = v
                items = [o for (g, n, p, _), o in sorted(api.objects.items())
                         if g == group and (ns is None or n == ns) and p == plural
                         and all(o["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
                start = int(q.get("continue") or 0)
                limit = int(q.get("limit") or 0) or len(items)
                if api.page_size_cap:
                    limit = min(limit, api.page_size_cap)
                page = items[start:start + limit]
                meta = {"resourceVersion": str(api.rv)}
                if start + limit < len(items):
                    meta["continue"] = str(start + limit)
                return self._send(200, {"apiVersion": f"{group}/v1alpha1", "kind": "List",
                                        "metadata": meta, "items": page})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def _store(self, key, body, cur, sub=None):
        obj = copy.deepcopy(body)
        if cur is not None:
            # the status subresource changes only status; the main resource never changes status
            if sub == "status":
                obj = dict(copy.deepcopy(cur), status=obj.get("status"))
            else:
                obj["status"] = copy.deepcopy(cur.get("status"))
                if obj["status"] is None:
                    obj.pop("status")
                if obj.get("spec") != cur.get("spec"):
                    obj["metadata"]["generation"] = cur["metadata"].get("generation", 1) + 1
                else:
                    obj["metadata"]["generation"] = cur["metadata"].get("generation", 1)
            obj["metadata"]["uid"] = cur["metadata"]["uid"]
        else:
            obj["metadata"]["uid"] = f"uid-{len(self.objects) + 1}"
            obj["metadata"]["generation"] = 1
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        obj["metadata"]["namespace"] = key[1]
        self.objects[key] = obj
        return obj

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.port}"
        cfg.retries = False  # Envelope's own backoff is what is under test
        return client.ApiClient(cfg)

    def names(self, plural: str = PLURAL) -> list[str]:
        return sorted(k[3] for k in self.objects if k[2] == plural)


@pytest.fixture
def kube():
    with FakeKubeAPI() as api:
        yield api


class Sleeps:
    """Records requested delays instead of waiting."""

    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, d: float) -> None:
        self.delays.append(d)


def _profile(node: str, sessions: int, keys=("syscall:read", "syscall:openat"), workload=W) -> Profile:
    p = Profile(workload)
    c = p.node(node)
    for s in range(sessions):
        sid = f"{node}-s{s}"
        c.open_session(sid, 100.0 + s, {"pod": f"pod-{s}"})
        for i, k in enumerate(keys):
            c.observe(sid, k, 1 + i + s, 100.0 + s + i)
        c.close_session(sid, 200.0 + s)
    c.touch(300.0 + sessions)
    return p


def _profiles(kube: FakeKubeAPI, sleeps: Sleeps | None = None, **kw) -> ClusterProfiles:
    backoff = Backoff(attempts=4, base=0.25, sleep=sleeps or Sleeps(), jitter=lambda: 1.0)
    return ClusterProfiles.from_api_client(kube.api_client(), backoff=backoff, **kw)


# ---- tests ---------------------------------------------------------------------------------------


def test_publish_then_read_merges_nodes(kube):
    cp = _profiles(kube)
    a, b = _profile("node-a", 2), _profile("node-b", 3, keys=("syscall:read", "exec:/usr/bin/git"))
    assert cp.publish(W, a.nodes["node-a"]).ok
    assert cp.publish(W, b.nodes["node-b"]).ok
    assert kube.names() == sorted([object_name(W, "node-a"), object_name(W, "node-b")])
    # every write was a server-side apply with a field manager
    patches = [r for r in kube.requests if r[0] == "PATCH"]
    assert patches and all(r[2] == "application/apply-patch+yaml" for r in patches)

    merged, problems = cp.read(W)
    assert problems == []
    assert merged.pack() == a.merge(b).pack()
    read = merged.behaviours()["syscall:read"]
    assert read.count == a.behaviours()["syscall:read"].count + b.behaviours()["syscall:read"].count
    assert read.sessions == 5
    assert {s.id for s in merged.sessions()} == {s.id for s in a.sessions()} | {s.id for s in b.sessions()}


def test_republishing_unchanged_contribution_writes_nothing(kube):
    cp = _profiles(kube)
    p = _profile("node-a", 2)
    assert cp.publish(W, p.nodes["node-a"]).written == 1
    n = len(kube.requests)
    res = cp.publish(W, p.nodes["node-a"])
    assert res.ok and res.unchanged and len(kube.requests) == n


def test_chunked_publish_reads_back_and_replaces_old_tails(kube):
    cp = _profiles(kube, chunk_size=200)
    keys = tuple(f"exec:/usr/bin/tool-{i}" for i in range(40))
    p1 = _profile("node-a", 2, keys=keys)
    r1 = cp.publish(W, p1.nodes["node-a"])
    assert r1.ok and r1.written > 2
    first = set(kube.names())
    assert len(first) == r1.written
    got, problems = cp.read(W)
    assert problems == [] and got.pack() == p1.pack()

    p2 = _profile("node-a", 3, keys=keys)  # a newer contribution: new digest, new tails
    r2 = cp.publish(W, p2.nodes["node-a"])
    assert r2.ok and r2.deleted == r1.written - 1  # every old tail went; the head was updated
    assert object_name(W, "node-a") in kube.names()
    assert not (first - {object_name(W, "node-a")}) & set(kube.names())
    got, problems = cp.read(W)
    assert problems == [] and got.pack() == p2.pack()


def test_read_follows_pagination(kube):
    kube.page_size_cap = 2
    cp = _profiles(kube)
    for i in range(5):
        cp.publish(W, _profile(f"node-{i}", 1).nodes[f"node-{i}"])
    n = len(kube.requests)
    got, _ = cp.read(W)
    assert sorted(got.nodes) == [f"node-{i}" for i in range(5)]
    assert [r[0] for r in kube.requests[n:]] == ["GET"] * 3  # pages of 2, 2 and 1


def test_read_all_and_other_workloads_stay_apart(kube):
    cp = _profiles(kube)
    cp.publish(W, _profile("node-a", 1).nodes["node-a"])
    cp.publish(W2, _profile("node-a", 2, workload=W2).nodes["node-a"])
    assembly = cp.read_all()
    assert sorted(assembly.profiles) == sorted([W, W2])
    assert assembly.profiles[W2].session_count == 2
    only, _ = cp.read(W)
    assert only.workload == W and only.session_count == 1


def test_transient_failures_are_retried_with_backoff(kube):
    sleeps = Sleeps()
    cp = _profiles(kube, sleeps)
    kube.faults = [503, "drop", 429]
    res = cp.publish(W, _profile("node-a", 1).nodes["node-a"])
    assert res.ok, res.error
    assert len(sleeps.delays) == 3
    assert sleeps.delays == sorted(sleeps.delays) and sleeps.delays[0] < sleeps.delays[-1]
    got, _ = cp.read(W)
    assert got.session_count == 1


def test_api_down_never_raises_from_publish_and_recovers(kube):
    sleeps = Sleeps()
    errors: list[str] = []
    cp = _profiles(kube, sleeps, on_api_error=lambda what, e: errors.append(what))
    kube.faults = [500] * 4
    c = _profile("node-a", 1).nodes["node-a"]
    res = cp.publish(W, c)
    assert not res.ok and "gave up after 4 attempts" in res.error
    assert len(errors) == 4 and errors[0].startswith("apply workloadprofiles/")
    assert kube.names() == []
    res = cp.publish(W, c)  # the API is back: the same contribution is written, not skipped
    assert res.ok and not res.unchanged and kube.names() == [object_name(W, "node-a")]


def test_unreachable_api_server_is_an_error_not_a_crash():
    sleeps = Sleeps()
    with FakeKubeAPI() as gone:
        api_client = gone.api_client()
    cp = ClusterProfiles.from_api_client(api_client, backoff=Backoff(attempts=3, sleep=sleeps))
    res = cp.publish(W, _profile("node-a", 1).nodes["node-a"])
    assert not res.ok and "gave up after 3 attempts" in res.error
    assert len(sleeps.delays) == 2
    with pytest.raises(ClusterApiError, match="list workloadprofiles"):
        cp.read(W)


def test_permanent_errors_are_not_retried(kube):
    sleeps = Sleeps()
    cp = _profiles(kube, sleeps)
    kube.faults = [403]
    res = cp.publish(W, _profile("node-a", 1).nodes["node-a"])
    assert not res.ok and "HTTP 403" in res.error
    assert sleeps.delays == []


def test_call_with_retry_honours_retry_after():
    from kubernetes.client.exceptions import ApiException

    sleeps = Sleeps()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            e = ApiException(status=429, reason="Too Many Requests")
            e.headers = {"Retry-After": "7"}
            raise e
        return "ok"

    assert call_with_retry(flaky, "list", Backoff(base=0.1, sleep=sleeps, jitter=lambda: 0.0)) == "ok"
    assert sleeps.delays == [7.0]


def test_remove_deletes_only_this_nodes_objects(kube):
    cp = _profiles(kube, chunk_size=150)
    cp.publish(W, _profile("node-a", 2).nodes["node-a"])
    cp.publish(W, _profile("node-b", 1).nodes["node-b"])
    before = kube.names()
    n = cp.remove(W, "node-a")
    assert n >= 2
    left = kube.names()
    assert len(left) == len(before) - n
    assert all(kube.objects[(GROUP, "envelope-system", PLURAL, name)]["metadata"]["labels"][LABEL_NODE]
               == "node-b" for name in left)
    got, problems = cp.read(W)
    assert sorted(got.nodes) == ["node-b"] and problems == []


def test_torn_chunk_set_is_reported_not_merged(kube):
    cp = _profiles(kube, chunk_size=150)
    cp.publish(W, _profile("node-a", 2).nodes["node-a"])
    cp.publish(W, _profile("node-b", 1).nodes["node-b"])
    tail = next(n for (g, ns, p, n), o in kube.objects.items()
                if o["spec"]["node"] == "node-a" and o["spec"]["chunk"]["index"] == 1)
    del kube.objects[(GROUP, "envelope-system", PLURAL, tail)]
    got, problems = cp.read(W)
    assert sorted(got.nodes) == ["node-b"]
    assert len(problems) == 1 and "incomplete chunk set" in problems[0].reason


def test_objects_carry_workload_label_for_selection(kube):
    cp = _profiles(kube)
    cp.publish(W, _profile("node-a", 1).nodes["node-a"])
    (obj,) = kube.objects.values()
    assert obj["metadata"]["labels"][LABEL_WORKLOAD] == contribution_to_crs(
        W, _profile("node-a", 1).nodes["node-a"])[0]["metadata"]["labels"][LABEL_WORKLOAD]
    assert obj["spec"]["summary"]["sessions"] == 1
    assert VERSION == "v1alpha1"


# ---- LeastPrivilegePolicy objects and per-node status ------------------------------------------------

POLICY = Policy(W, mode="enforce", syscalls=("read", "write", "openat"),
                egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),), execs=("/usr/bin/git",))


def _policies(kube: FakeKubeAPI, node: str, sleeps: Sleeps | None = None) -> ClusterPolicies:
    backoff = Backoff(attempts=3, base=0.25, sleep=sleeps or Sleeps(), jitter=lambda: 1.0)
    return ClusterPolicies.from_api_client(kube.api_client(), node, backoff=backoff, clock=lambda: 1_764_000_000.0)


def test_policy_create_list_and_per_node_status(kube):
    a, b = _policies(kube, "node-a"), _policies(kube, "node-b")
    created = a.create(POLICY)
    assert (created.namespace, created.name, created.generation) == ("agents", "researcher-main", 1)
    policies, problems = b.list()
    assert problems == [] and [p.name for p in policies] == ["researcher-main"]
    cp = for_workload(policies, W)
    assert cp.policy.syscalls == POLICY.syscalls and cp.policy.mode == "enforce"

    assert a.report(cp, "applied", localhost_profile="envelope/agents/deployment_researcher_main.json",
                    mode="enforce", cgroups=2)
    assert b.report(cp, "failed", "seccomp: kubelet seccomp dir is read-only")
    status_calls = [r for r in kube.requests if r[1].endswith("/status")]
    assert len(status_calls) == 2 and all(r[2] == "application/apply-patch+yaml" for r in status_calls)
    n = len(kube.requests)
    assert a.report(cp, "applied", localhost_profile="envelope/agents/deployment_researcher_main.json",
                    mode="enforce", cgroups=2)
    assert len(kube.requests) == n, "an unchanged entry is not written again"
    assert a.report(cp, "applied", localhost_profile="envelope/agents/deployment_researcher_main.json",
                    mode="enforce", cgroups=3)
    assert len(kube.requests) == n + 1

    cp = a.get("agents", "researcher-main")
    st = node_statuses(cp.obj)
    assert sorted(st) == ["node-a", "node-b"]
    assert st["node-a"].state == "applied" and st["node-a"].observed_generation == 1 and st["node-a"].cgroups == 3
    assert st["node-a"].localhost_profile == "envelope/agents/deployment_researcher_main.json"
    assert st["node-b"].state == "failed" and "read-only" in st["node-b"].reason
    assert cp.obj["spec"] == policy_to_cr(POLICY)["spec"], "status writes never touch the spec"


def test_stale_condition_and_mode_change(kube):
    a = _policies(kube, "node-a")
    cp = a.create(POLICY)
    assert not cp.stale
    assert a.mark_stale(cp, "FingerprintChanged", "image digest sha256:aa -> sha256:bb")
    cp = a.get("agents", "researcher-main")
    assert cp.stale and is_stale(cp.obj)
    changed = a.set_mode(cp, "alert")
    assert changed is not None and changed.policy.mode == "alert"
    cp = a.get("agents", "researcher-main")
    assert cp.policy.mode == "alert"
    # a changed spec is a new generation: the old Stale judgement no longer applies
    assert cp.generation == 2 and not cp.stale


def test_cross_namespace_policy_is_reported_not_used(kube):
    a = _policies(kube, "node-a")
    a.create(POLICY)
    sneaky = policy_to_cr(Policy(Workload("victim", "Deployment", "db", "main"), mode="observe"))
    sneaky["metadata"]["namespace"] = "agents"
    sneaky["metadata"]["name"] = "weaken-victim"
    kube.objects[("envelope.dev", "agents", "leastprivilegepolicies", "weaken-victim")] = sneaky | {
        "metadata": sneaky["metadata"] | {"resourceVersion": "99", "uid": "u", "generation": 1}}
    policies, problems = a.list()
    assert [p.name for p in policies] == ["researcher-main"]
    assert len(problems) == 1 and "not the policy's own namespace" in problems[0].reason


def test_status_report_survives_an_api_outage(kube):
    sleeps = Sleeps()
    a = _policies(kube, "node-a", sleeps)
    cp = a.create(POLICY)
    kube.faults = [503, 503, 503]
    assert a.report(cp, "applied") is False
    assert len(sleeps.delays) == 2
    assert a.report(cp, "applied") is True
    assert node_statuses(a.get("agents", "researcher-main").obj)["node-a"].state == "applied"


def test_missing_policy_is_none(kube):
    assert _policies(kube, "node-a").get("agents", "nope") is None


def test_publisher_publishes_flushed_profiles_and_retries_failures(kube):
    from sensor.crd import ProfilePublisher

    results = []
    cp = _profiles(kube)
    pub = ProfilePublisher(cp, "node-a", on_result=results.append)
    host = Workload.host("/system.slice/agent.service")
    profiles = {W: _profile("node-a", 1), W2: _profile("node-a", 2, workload=W2), host: _profile("node-a", 1, workload=host)}
    kube.faults = [500] * 4  # the first apply (W) exhausts its attempts; W2 goes through
    out = pub.publish(profiles, written=[W, W2, host])
    assert [(r.workload, r.ok) for r in out] == [(W, False), (W2, True)]
    assert pub.pending == {W} and len(results) == 2
    out = pub.publish(profiles, written=[])  # nothing new flushed: the failed one is retried
    assert [(r.workload, r.ok) for r in out] == [(W, True)] and pub.pending == set()
    assert sorted(cp.read_all().profiles) == sorted([W, W2])
    assert pub.publish(profiles, written=[]) == []


def test_publisher_thread_keeps_the_loop_free_during_an_outage_and_flushes_on_close(kube):
    from sensor.crd import ProfilePublisher, PublisherThread

    gate = threading.Event()  # the worker's retry sleeps block until the gate opens
    cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=3, sleep=lambda d: gate.wait()))
    worker = PublisherThread(ProfilePublisher(cp, "node-a"), retry_interval=3600).start()
    kube.faults = [503] * 100
    p1 = _profile("node-a", 1)
    worker.publish({W: p1}, written=[W])

    # while the worker is stuck retrying, the loop goes on: publish() only snapshots
    p2 = _profile("node-a", 4)
    caller = threading.Thread(target=lambda: [worker.publish({W: p2}, written=[W]) for _ in range(3)])
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "publish() waited for the API"
    p2.nodes["node-a"].observe("node-a-late", "syscall:late", 1, 999.0)  # later changes are not in the snapshot

    kube.faults = []
    gate.set()
    assert worker.close() is True
    got, _ = cp.read(W)
    assert got.session_count == 4 and "syscall:late" not in got.behaviours()


def test_fingerprint_change_marks_stale_audits_and_rebaselines(kube, tmp_path):
    from enforcer import audit, state
    from enforcer.crd import on_fingerprint_change
    from envelope.metrics import Metrics

    a = _policies(kube, "node-a")
    cp = a.create(POLICY)
    m = Metrics()
    state.set_mode(tmp_path, W, "enforce", reason="derived and reviewed", actor="test")
    out = on_fingerprint_change(tmp_path, W, ["image", "model"], cp=cp, policies=a, rebaseline=True, metrics=m,
                                detail="image sha256:aa -> sha256:bb", actor="envelope-daemon/node-a")
    assert out["stale_condition"] is True and out["rebaselined"] and out["cluster_mode"] == "alert"
    entries = audit.read(tmp_path, workload=W.key)
    assert [e["action"] for e in entries] == ["mode.set", "policy.stale", "rebaseline"]
    assert entries[1]["details"]["changed"] == ["image", "model"]
    assert audit.verify(tmp_path).ok
    assert state.get_mode(tmp_path, W) == "alert"
    got = a.get("agents", "researcher-main")
    assert got.policy.mode == "alert" and got.obj["status"]["conditions"][0]["reason"] == "FingerprintChanged"
    assert got.generation == 2 and got.stale, "still stale after the daemon's own mode change"
    assert m.registry.get_sample_value("envelope_policies_stale") == 1


def test_fingerprint_change_during_an_api_outage_still_acts_locally(kube, tmp_path):
    from enforcer import audit
    from enforcer.crd import on_fingerprint_change

    a = _policies(kube, "node-a")
    cp = a.create(POLICY)
    kube.faults = [503] * 10
    out = on_fingerprint_change(tmp_path, W, ["tool_catalog"], cp=cp, policies=a)
    assert out["stale_condition"] is False and not out["rebaselined"]
    assert [e["action"] for e in audit.read(tmp_path)] == ["policy.stale"]
