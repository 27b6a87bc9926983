"""The fake API server keeps the rules Envelope relies on, checked through the official client:
server-side apply removes what a manager stops sending and keeps what others own, conflicts
without force, resourceVersion and generation, watch with bookmarks, and 410 Gone."""

from __future__ import annotations

import json
import threading

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from tests.fakes.apiserver import FakeApiServer

G, V, P = "envelope.dev", "v1alpha1", "leastprivilegepolicies"


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.05) as srv:
        yield srv


def objects(srv):
    return client.CustomObjectsApi(srv.api_client())


def apply(co, body, manager, sub=False, force=True):
    fn = co.patch_namespaced_custom_object_status if sub else co.patch_namespaced_custom_object
    return fn(G, V, "agents", P, body["metadata"]["name"], body, field_manager=manager, force=force,
              _content_type="application/apply-patch+yaml")


def policy(**spec):
    return {"apiVersion": f"{G}/{V}", "kind": "LeastPrivilegePolicy",
            "metadata": {"name": "p", "namespace": "agents", "labels": {"team": "a"}},
            "spec": {"workload": {"namespace": "agents", "kind": "Deployment", "name": "x", "container": "c"},
                     "mode": "alert", **spec}}


def test_apply_removes_fields_the_manager_stops_sending_and_keeps_others(api):
    co = objects(api)
    apply(co, policy(substrates=["syscall"]), "envelope")
    first = api.object(G, P, "agents", "p")
    assert first["metadata"]["generation"] == 1 and first["spec"]["substrates"] == ["syscall"]
    managers = {m["manager"]: m for m in first["metadata"]["managedFields"]}
    assert "f:substrates" in json.dumps(managers["envelope"]["fieldsV1"])
    # another manager changes the mode (a merge patch: an Update operation takes the field)
    co.patch_namespaced_custom_object(G, V, "agents", P, "p", {"spec": {"mode": "enforce"}},
                                      field_manager="operator", _content_type="application/merge-patch+json")
    # the first manager applies again without substrates and without mode
    body = policy()
    del body["spec"]["mode"]
    apply(co, body, "envelope")
    got = api.object(G, P, "agents", "p")
    assert "substrates" not in got["spec"], "a field the manager stopped sending is removed"
    assert got["spec"]["mode"] == "enforce", "a field another manager owns stays"
    assert got["metadata"]["generation"] == 3
    assert int(got["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])


def test_status_list_map_entries_belong_to_their_managers(api):
    co = objects(api)
    apply(co, policy(), "envelope")
    for node in ("n1", "n2"):
        apply(co, {"apiVersion": f"{G}/{V}", "kind": "LeastPrivilegePolicy",
                   "metadata": {"name": "p", "namespace": "agents"},
                   "status": {"nodes": [{"node": node, "state": "applied"}]}}, f"envelope/{node}", sub=True)
    got = api.object(G, P, "agents", "p")
    assert [n["node"] for n in got["status"]["nodes"]] == ["n1", "n2"]
    assert got["metadata"]["generation"] == 1, "status writes are not a new generation"
    # n1 stops sending its entry: only its entry goes
    apply(co, {"apiVersion": f"{G}/{V}", "kind": "LeastPrivilegePolicy", "metadata": {"name": "p", "namespace": "agents"},
               "status": {}}, "envelope/n1", sub=True)
    assert [n["node"] for n in api.object(G, P, "agents", "p")["status"]["nodes"]] == ["n2"]
    # the main resource ignores status; the status subresource ignores the spec
    body = policy()
    body["status"] = {"nodes": [{"node": "n3", "state": "failed"}]}
    apply(co, body, "envelope")
    assert [n["node"] for n in api.object(G, P, "agents", "p")["status"]["nodes"]] == ["n2"]


def test_apply_conflicts_without_force(api):
    co = objects(api)
    apply(co, policy(), "a")
    body = policy()
    body["spec"]["mode"] = "enforce"
    with pytest.raises(ApiException) as e:
        apply(co, body, "b", force=False)
    assert e.value.status == 409 and "conflicts with 'a'" in e.value.body
    apply(co, body, "b", force=True)
    assert api.object(G, P, "agents", "p")["spec"]["mode"] == "enforce"
    # the field moved to b: a's next apply without it does not remove it
    apply(co, dict(policy(), spec={k: v for k, v in policy()["spec"].items() if k != "mode"}), "a")
    assert api.object(G, P, "agents", "p")["spec"]["mode"] == "enforce"


def test_watch_streams_changes_and_bookmarks_then_gone(api):
    co = objects(api)
    apply(co, policy(), "envelope")
    listed = co.list_cluster_custom_object(G, V, P)
    rv = listed["metadata"]["resourceVersion"]
    resp = co.list_cluster_custom_object(G, V, P, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                         timeout_seconds=1, _preload_content=False)
    threading.Timer(0.2, lambda: apply(co, policy(substrates=["egress"]), "envelope")).start()
    events = [json.loads(line) for line in iter_resp_lines(resp) if line.strip()]
    types = [e["type"] for e in events]
    assert "MODIFIED" in types and "BOOKMARK" in types
    modified = next(e for e in events if e["type"] == "MODIFIED")
    assert modified["object"]["spec"]["substrates"] == ["egress"]
    bookmark = [e for e in events if e["type"] == "BOOKMARK"][-1]
    assert int(bookmark["object"]["metadata"]["resourceVersion"]) >= int(modified["object"]["metadata"]["resourceVersion"])
    api.compact()
    resp = co.list_cluster_custom_object(G, V, P, watch=True, resource_version=rv, timeout_seconds=1,
                                         _preload_content=False)
    (gone,) = [json.loads(line) for line in iter_resp_lines(resp) if line.strip()]
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410


def test_selectors_and_pages(api):
    core = client.CoreV1Api(api.api_client())
    for i in range(5):
        api.put({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "namespace": "a", "uid": f"u{i}",
                                                              "labels": {"app": "x" if i % 2 else "y"}},
                 "spec": {"nodeName": "n1" if i < 3 else "n2", "containers": []}})
    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in on_n1.items] == ["p0", "p1", "p2"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app=x").items] == ["p1", "p3"]
    first = core.list_pod_for_all_namespaces(limit=2)
    second = core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in first.items + second.items] == ["p0", "p1", "p2", "p3"]
    assert core.read_namespaced_pod("p0", "a").metadata.uid == "u0"


def test_black_hole_accepts_and_never_answers(api):
    api.mode = "blackhole"
    co = objects(api)
    with pytest.raises(Exception) as e:
        co.list_cluster_custom_object(G, V, P, _request_timeout=(1, 0.3))
    assert "timed out" in str(e.value).lower() or "timeout" in type(e.value).__name__.lower()
    assert api.count("GET", P) == 1
