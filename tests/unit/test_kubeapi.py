"""The one home of the API plumbing (sensor.kubeapi): backoff, retry, the client factory, and
the informer's list+watch against the fake API server (bookmarks, 410, selectors)."""

from __future__ import annotations

import functools

import pytest
from kubernetes import client

from sensor.kubeapi import Backoff, ClusterApiError, Informer, api_client, call_with_retry, list_all
from tests.fakes.apiserver import FakeApiServer
from tests.polling import until as wait_for

G, V, P = "envelope.dev", "v1alpha1", "leastprivilegepolicies"


def policy(name: str, ns: str = "agents") -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "LeastPrivilegePolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"workload": {"namespace": ns, "kind": "Deployment", "name": name, "container": "c"},
                     "mode": "alert"}}


def test_backoff_grows_to_its_cap_with_jitter():
    b = Backoff(base=0.5, cap=4.0, jitter=lambda: 1.0)
    assert [b.delay(a) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = Backoff(base=1.0, cap=8.0, jitter=lambda: 0.0)
    assert [low.delay(a) for a in range(3)] == [0.5, 1.0, 2.0]  # jitter takes up to half
    assert Backoff(base=0.1, jitter=lambda: 0.0).delay(0, retry_after=7) == 7.0
    assert Backoff(jitter=lambda: 1.0).delay(10_000) == 30.0  # capped, no overflow
    with pytest.raises(ValueError):
        Backoff(base=0)


def test_call_with_retry_gives_up_with_one_error_naming_the_call():
    sleeps = []
    calls = []

    def down():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(ClusterApiError, match="list things: gave up after 3 attempts: ConnectionError"):
        call_with_retry(down, "list things", Backoff(attempts=3, sleep=sleeps.append))
    assert len(calls) == 3 and len(sleeps) == 2


def test_api_client_without_configuration_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterApiError, match="no Kubernetes API configuration"):
        api_client(str(tmp_path / "missing"))
    assert api_client(host="http://127.0.0.1:1").configuration.host == "http://127.0.0.1:1"


def test_informer_lists_watches_and_follows_bookmarks():
    with FakeApiServer(bookmark_interval=0.05) as api:
        co = client.CustomObjectsApi(api.api_client())
        for n in ("a", "b", "c"):
            co.create_namespaced_custom_object(G, V, "agents", P, policy(n))
        events = []
        inf = Informer(P, functools.partial(co.list_cluster_custom_object, G, V, P), watch_timeout=1,
                       backoff=Backoff(base=0.01, cap=0.05), on_event=lambda t, o, old: events.append((t, o["metadata"]["name"])))
        api.store.max_page = 2  # the first list takes two pages
        inf.start()
        try:
            assert wait_for(inf.synced.is_set)
            assert sorted(o["metadata"]["name"] for o in inf.items()) == ["a", "b", "c"]
            co.delete_namespaced_custom_object(G, V, "agents", P, "b")
            co.patch_namespaced_custom_object(G, V, "agents", P, "c", {"spec": {"mode": "enforce"}},
                                              _content_type="application/merge-patch+json")
            assert wait_for(lambda: ("DELETED", "b") in events and ("MODIFIED", "c") in events)
            assert inf.get(("agents", "c"))["spec"]["mode"] == "enforce" and inf.get(("agents", "b")) is None
            # other resources move the store's resourceVersion; bookmarks carry it to the watch
            rv = int(inf.resource_version)
            api.put({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"}, "spec": {}})
            assert wait_for(lambda: int(inf.resource_version) > rv)
            assert inf.relists == 0 and inf.failures == 0
        finally:
            inf.stop()


def test_list_all_follows_continue_tokens():
    with FakeApiServer() as api:
        co = client.CustomObjectsApi(api.api_client())
        for i in range(5):
            co.create_namespaced_custom_object(G, V, "agents", P, policy(f"p{i}"))
        items, rv = list_all(functools.partial(co.list_cluster_custom_object, G, V, P), "list", page=2)
        assert [o["metadata"]["name"] for o in items] == [f"p{i}" for i in range(5)] and int(rv) >= 5
