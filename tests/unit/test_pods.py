"""The pod watcher (sensor.pods) against the fake API server: list+watch of one node's pods,
owner and service-account lookups on its own thread, and never a wait on the caller's thread,
also while the API fails, flaps or is black-holed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sensor.kubeapi import Backoff
from sensor.pods import PodWatcher, lookups_of
from tests.fakes.apiserver import FakeApiServer
from tests.polling import until as wait_for

K8S = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"
AGENT = "8f7d2c1e-4a6b-4c3d-9e8f-1a2b3c4d5e6f"
AGENT_CID = "3f1b9c2d7e4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c"


def load(name: str) -> dict:
    return json.loads((K8S / name).read_text())


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.1) as srv:
        for name in ("replicaset-research-agent.json", "serviceaccount-research-agent.json"):
            srv.put(load(name))
        yield srv


def watcher(api, **kw) -> PodWatcher:
    kw.setdefault("retry_after", 0.0)
    return PodWatcher("worker-2", api.api_client(), backoff=Backoff(base=0.01, cap=0.05),
                      request_timeout=(1.0, 2.0), watch_timeout=1, **kw)


def test_lookups_of_a_pod_are_its_owner_and_service_account():
    assert lookups_of(load("pod-research-agent.json")) == [
        ("ReplicaSet", "agents", "research-agent-7c9f8b6d5"), ("ServiceAccount", "agents", "research-agent")]
    assert lookups_of(load("pod-debug-shell.json")) == [("ServiceAccount", "default", "default")]


def test_pods_of_the_node_are_watched_and_owners_prefetched(api):
    w = watcher(api).start()
    try:
        assert wait_for(w.synced.is_set)
        api.put(load("pod-research-agent.json"))
        other = load("pod-node-exporter.json")
        other["spec"]["nodeName"] = "worker-9"
        api.put(other)
        assert wait_for(lambda: w.identity(AGENT, container_id=AGENT_CID) is not None)
        ident = w.identity(AGENT, container_id=AGENT_CID)
        assert (ident.namespace, ident.kind, ident.name, ident.container_name) == (
            "agents", "Deployment", "research-agent", "agent")
        assert ident.fingerprints["cloud_identity:aws"] == "arn:aws:iam::111122223333:role/research-agent-bedrock"
        assert w.pod(other["metadata"]["uid"]) is None, "only this node's pods"
        # the lookups went out when the pod appeared in the watch, once each
        assert api.count("GET", "/replicasets/research-agent-7c9f8b6d5") == 1
        assert api.count("GET", "/serviceaccounts/research-agent") == 1
        # a change in place is seen through the watch
        changed = copy.deepcopy(load("pod-research-agent.json"))
        changed["metadata"]["annotations"]["envelope.dev/tool-catalog"] = "search"
        api.put(changed)
        assert wait_for(lambda: w.identity(AGENT, container_id=AGENT_CID).fingerprints["tool_catalog"] == "search")
        # deleted: kept for late lookups of short-lived containers
        api.delete("", "pods", "agents", "research-agent-7c9f8b6d5-x2k4p")
        assert wait_for(lambda: w.informer.get(AGENT) is None)
        assert w.pod(AGENT) is not None and w.pod_by_name("agents", "research-agent-7c9f8b6d5-x2k4p")
    finally:
        w.stop()


@pytest.mark.parametrize("failure", ["down", "drop"])
def test_watcher_retries_with_backoff_never_crashes_and_recovers(api, failure):
    if failure == "down":
        api.mode = "down"
    else:
        api.faults = ["drop"] * 6
    api.put(load("pod-research-agent.json"))
    w = watcher(api).start()
    try:
        assert wait_for(lambda: w.failures >= 3)
        assert w.running and "list/watch pods" in w.last_error
        assert w.identity(AGENT) is None  # not known yet, and no wait on the API
        api.mode = "ok"
        assert wait_for(w.synced.is_set)
        assert wait_for(lambda: w.identity(AGENT, container_id=AGENT_CID) is not None)
    finally:
        w.stop()


def test_owner_answers_survive_an_outage_and_failures_wait_before_a_retry(api):
    t = [100.0]
    w = watcher(api, owner_ttl=10.0, retry_after=30.0, clock=lambda: t[0])
    rs = w.fetch("ReplicaSet", "agents", "research-agent-7c9f8b6d5")
    assert rs["metadata"]["ownerReferences"][0]["name"] == "research-agent"
    assert w.fetch("Job", "agents", "no-such-job") is None and w.failures == 0  # 404 is an answer
    api.mode = "down"
    t[0] += 11.0  # the answer is old: served while it is refreshed
    assert w.cached("ReplicaSet", "agents", "research-agent-7c9f8b6d5") == (True, rs)
    w._fetch(("ReplicaSet", "agents", "research-agent-7c9f8b6d5"))  # the refresh, as the lookup thread runs it
    assert w.failures == 1 and w.cached("ReplicaSet", "agents", "research-agent-7c9f8b6d5") == (True, rs)
    # a lookup that failed the first time answers "not found" (the naming rules stand in) and is
    # not queued again before retry_after
    w._fetch(("ServiceAccount", "agents", "research-agent"))
    assert w.cached("ServiceAccount", "agents", "research-agent") == (True, None)
    assert ("ServiceAccount", "agents", "research-agent") not in w._queued
    t[0] += 31.0
    w.cached("ServiceAccount", "agents", "research-agent")
    assert ("ServiceAccount", "agents", "research-agent") in w._queued


def test_an_expired_watch_relists(api):
    api.put(load("pod-research-agent.json"))
    w = watcher(api).start()
    try:
        assert wait_for(w.synced.is_set)
        w.stop()  # away for a while (it keeps its resourceVersion)
        lists = api.count("GET", "/api/v1/pods")
        late = load("pod-vector-store-2.json")
        late["spec"]["nodeName"] = "worker-2"
        api.put(late)
        api.compact()  # the history it would resume from is gone: 410 Gone, then a relist
        w.start()
        assert wait_for(lambda: w.informer.relists >= 1)
        assert wait_for(lambda: w.pod_by_name("agents", "vector-store-2") is not None)
        assert api.count("GET", "/api/v1/pods") > lists and w.failures == 0
    finally:
        w.stop()


def test_identity_never_waits_on_a_black_holed_api(api):
    api.put(load("pod-research-agent.json"))
    w = watcher(api).start()
    try:
        assert wait_for(lambda: w.identity(AGENT, container_id=AGENT_CID) is not None)
        api.mode = "blackhole"  # from now on every request is accepted and never answered
        fresh = load("pod-research-agent-rollout.json")
        fresh["metadata"]["uid"] = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
        fresh["metadata"]["ownerReferences"][0]["name"] = "research-agent-6d5c4b3a2"  # an owner not cached
        w.informer.apply_event({"type": "ADDED", "object": fresh})
        assert wait_for(lambda: api.hanging >= 1)  # the lookup thread is stuck in the black hole
        answers = [w.identity(fresh["metadata"]["uid"], container_name="agent") for _ in range(1000)]
        assert answers == [None] * 1000  # answered from the cache, 1000 times, while a request hangs
        assert api.hanging >= 1
        assert w.identity(AGENT, container_id=AGENT_CID) is not None  # what was cached still answers
    finally:
        api.mode = "ok"
        w.stop()
