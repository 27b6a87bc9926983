"""The cluster clients (WorkloadProfile publishing and reading, LeastPrivilegePolicy objects and
their status) against the fake API server of tests/fakes, with injected failures.

The clients under test are the real ``kubernetes`` CustomObjectsApi plus Envelope's code; only
the API server is a stand-in.
"""

from __future__ import annotations

import threading

import pytest
import structlog

from enforcer.leastprivilegepolicy import ClusterPolicies, for_workload, is_stale, node_statuses, policy_to_cr
from enforcer.policy import EgressRule, Policy
from sensor.kubeapi import Backoff, ClusterApiError, call_with_retry
from sensor.workload import Workload
from sensor.workloadprofile import (
    GROUP, LABEL_NODE, LABEL_WORKLOAD, PLURAL, VERSION, ClusterProfiles, contribution_to_crs, object_name,
)
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.profiles import node_profile

W = Workload("agents", "Deployment", "researcher", "main")
W2 = Workload("agents", "Deployment", "writer", "main")


@pytest.fixture(autouse=True)
def _plain_logging():
    """Log to whatever stderr is now: an earlier test's ``envelope.cli.main`` may have bound
    structlog to a captured stream that pytest has since closed."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def kube():
    with FakeApiServer() as api:
        yield api


class Sleeps:
    """Records requested delays instead of waiting."""

    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, d: float) -> None:
        self.delays.append(d)


def _profiles(kube: FakeApiServer, sleeps: Sleeps | None = None, **kw) -> ClusterProfiles:
    backoff = Backoff(attempts=4, base=0.25, sleep=sleeps or Sleeps(), jitter=lambda: 1.0)
    return ClusterProfiles.from_api_client(kube.api_client(), backoff=backoff, **kw)


# ---- tests ---------------------------------------------------------------------------------------


def test_publish_then_read_merges_nodes(kube):
    cp = _profiles(kube)
    a, b = node_profile("node-a", 2), node_profile("node-b", 3, keys=("syscall:read", "exec:/usr/bin/git"))
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
    p = node_profile("node-a", 2)
    assert cp.publish(W, p.nodes["node-a"]).written == 1
    n = len(kube.requests)
    res = cp.publish(W, p.nodes["node-a"])
    assert res.ok and res.unchanged and len(kube.requests) == n


def test_chunked_publish_reads_back_and_replaces_old_tails(kube):
    cp = _profiles(kube, chunk_size=200)
    keys = tuple(f"exec:/usr/bin/tool-{i}" for i in range(40))
    p1 = node_profile("node-a", 2, keys=keys)
    r1 = cp.publish(W, p1.nodes["node-a"])
    assert r1.ok and r1.written > 2
    first = set(kube.names())
    assert len(first) == r1.written
    got, problems = cp.read(W)
    assert problems == [] and got.pack() == p1.pack()

    p2 = node_profile("node-a", 3, keys=keys)  # a newer contribution: new digest, new tails
    r2 = cp.publish(W, p2.nodes["node-a"])
    assert r2.ok and r2.deleted == r1.written - 1  # every old tail went; the head was updated
    assert object_name(W, "node-a") in kube.names()
    assert not (first - {object_name(W, "node-a")}) & set(kube.names())
    got, problems = cp.read(W)
    assert problems == [] and got.pack() == p2.pack()


def test_read_follows_pagination(kube):
    kube.store.max_page = 2
    cp = _profiles(kube)
    for i in range(5):
        cp.publish(W, node_profile(f"node-{i}", 1).nodes[f"node-{i}"])
    n = len(kube.requests)
    got, _ = cp.read(W)
    assert sorted(got.nodes) == [f"node-{i}" for i in range(5)]
    assert [r[0] for r in kube.requests[n:]] == ["GET"] * 3  # pages of 2, 2 and 1


def test_read_all_and_other_workloads_stay_apart(kube):
    cp = _profiles(kube)
    cp.publish(W, node_profile("node-a", 1).nodes["node-a"])
    cp.publish(W2, node_profile("node-a", 2, workload=W2).nodes["node-a"])
    assembly = cp.read_all()
    assert sorted(assembly.profiles) == sorted([W, W2])
    assert assembly.profiles[W2].session_count == 2
    only, _ = cp.read(W)
    assert only.workload == W and only.session_count == 1


def test_transient_failures_are_retried_with_backoff(kube):
    sleeps = Sleeps()
    cp = _profiles(kube, sleeps)
    kube.faults = [503, "drop", 429]
    res = cp.publish(W, node_profile("node-a", 1).nodes["node-a"])
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
    c = node_profile("node-a", 1).nodes["node-a"]
    res = cp.publish(W, c)
    assert not res.ok and "gave up after 4 attempts" in res.error
    assert len(errors) == 4 and errors[0].startswith("apply workloadprofiles/")
    assert kube.names() == []
    res = cp.publish(W, c)  # the API is back: the same contribution is written, not skipped
    assert res.ok and not res.unchanged and kube.names() == [object_name(W, "node-a")]


def test_unreachable_api_server_is_an_error_not_a_crash():
    sleeps = Sleeps()
    with FakeApiServer() as gone:
        api_client = gone.api_client()
    cp = ClusterProfiles.from_api_client(api_client, backoff=Backoff(attempts=3, sleep=sleeps))
    res = cp.publish(W, node_profile("node-a", 1).nodes["node-a"])
    assert not res.ok and "gave up after 3 attempts" in res.error
    assert len(sleeps.delays) == 2
    with pytest.raises(ClusterApiError, match="list workloadprofiles"):
        cp.read(W)


def test_permanent_errors_are_not_retried(kube):
    sleeps = Sleeps()
    cp = _profiles(kube, sleeps)
    kube.faults = [403]
    res = cp.publish(W, node_profile("node-a", 1).nodes["node-a"])
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
    cp.publish(W, node_profile("node-a", 2).nodes["node-a"])
    cp.publish(W, node_profile("node-b", 1).nodes["node-b"])
    before = kube.names()
    n = cp.remove(W, "node-a")
    assert n >= 2
    left = kube.names()
    assert len(left) == len(before) - n
    assert all(kube.object(GROUP, PLURAL, "envelope-system", name)["metadata"]["labels"][LABEL_NODE]
               == "node-b" for name in left)
    got, problems = cp.read(W)
    assert sorted(got.nodes) == ["node-b"] and problems == []


def test_torn_chunk_set_is_reported_not_merged(kube):
    cp = _profiles(kube, chunk_size=150)
    cp.publish(W, node_profile("node-a", 2).nodes["node-a"])
    cp.publish(W, node_profile("node-b", 1).nodes["node-b"])
    tail = next(n for (ns, n), o in kube.objects(GROUP, PLURAL).items()
                if o["spec"]["node"] == "node-a" and o["spec"]["chunk"]["index"] == 1)
    kube.delete(GROUP, PLURAL, "envelope-system", tail)
    got, problems = cp.read(W)
    assert sorted(got.nodes) == ["node-b"]
    assert len(problems) == 1 and "incomplete chunk set" in problems[0].reason


def test_objects_carry_workload_label_for_selection(kube):
    cp = _profiles(kube)
    cp.publish(W, node_profile("node-a", 1).nodes["node-a"])
    (obj,) = kube.objects(GROUP, PLURAL).values()
    assert obj["metadata"]["labels"][LABEL_WORKLOAD] == contribution_to_crs(
        W, node_profile("node-a", 1).nodes["node-a"])[0]["metadata"]["labels"][LABEL_WORKLOAD]
    assert obj["spec"]["summary"]["sessions"] == 1
    assert VERSION == "v1alpha1"


# ---- LeastPrivilegePolicy objects and per-node status ------------------------------------------------

POLICY = Policy(W, mode="enforce", syscalls=("read", "write", "openat"),
                egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),), execs=("/usr/bin/git",))


def _policies(kube: FakeApiServer, node: str, sleeps: Sleeps | None = None) -> ClusterPolicies:
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
    # a mode change is a new generation, but the policy was not derived again: still stale
    assert cp.generation == 2 and cp.stale
    cond = cp.obj["status"]["conditions"][0]
    assert (cond["type"], cond["status"], cond["observedGeneration"]) == ("Stale", "True", 1)
    # re-derived (a new validity): the judgement no longer applies
    import dataclasses
    rederived = dataclasses.replace(POLICY, validity={"fingerprint": {"image": ["sha256:bb"]},
                                                      "derivedAt": "2026-11-30T10:00:00Z"})
    again = a.create(rederived)
    assert again.generation == 3 and not again.stale


def test_cross_namespace_policy_is_reported_not_used(kube):
    a = _policies(kube, "node-a")
    a.create(POLICY)
    sneaky = policy_to_cr(Policy(Workload("victim", "Deployment", "db", "main"), mode="observe"))
    sneaky["metadata"]["namespace"] = "agents"
    sneaky["metadata"]["name"] = "weaken-victim"
    kube.put(sneaky)
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
    from sensor.workloadprofile import ProfilePublisher

    results = []
    cp = _profiles(kube)
    pub = ProfilePublisher(cp, "node-a", on_result=results.append)
    host = Workload.host("/system.slice/agent.service")
    profiles = {W: node_profile("node-a", 1), W2: node_profile("node-a", 2, workload=W2), host: node_profile("node-a", 1, workload=host)}
    kube.faults = [500] * 4  # the first apply (W) exhausts its attempts; W2 goes through
    out = pub.publish(profiles, written=[W, W2, host])
    assert [(r.workload, r.ok) for r in out] == [(W, False), (W2, True)]
    assert pub.pending == {W} and len(results) == 2
    out = pub.publish(profiles, written=[])  # nothing new flushed: the failed one is retried
    assert [(r.workload, r.ok) for r in out] == [(W, True)] and pub.pending == set()
    assert sorted(cp.read_all().profiles) == sorted([W, W2])
    assert pub.publish(profiles, written=[]) == []


def test_publisher_thread_keeps_the_loop_free_during_an_outage_and_flushes_on_close(kube):
    from sensor.workloadprofile import ProfilePublisher, PublisherThread

    gate = threading.Event()  # the worker's retry sleeps block until the gate opens
    cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=3, sleep=lambda d: gate.wait()))
    worker = PublisherThread(ProfilePublisher(cp, "node-a"), retry_interval=3600).start()
    kube.faults = [503] * 100
    p1 = node_profile("node-a", 1)
    worker.publish({W: p1}, written=[W])

    # while the worker is stuck retrying, the loop goes on: publish() only snapshots
    p2 = node_profile("node-a", 4)
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
    from enforcer.leastprivilegepolicy import on_fingerprint_change
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
    from enforcer.leastprivilegepolicy import on_fingerprint_change

    a = _policies(kube, "node-a")
    cp = a.create(POLICY)
    kube.faults = [503] * 10
    out = on_fingerprint_change(tmp_path, W, ["tool_catalog"], cp=cp, policies=a)
    assert out["stale_condition"] is False and not out["rebaselined"]
    assert [e["action"] for e in audit.read(tmp_path)] == ["policy.stale"]
