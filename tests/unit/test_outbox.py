"""A gateway's evidence reaches the cluster: the gateway (built by the composition root, flushing
into the real profile store) marks its contribution in the outbox, and the daemon's side
(:class:`sensor.outbox.Outbox` and the real publisher against the fake API server of tests/fakes)
publishes it beside the node's own contribution."""

from __future__ import annotations

import json
import os

import pytest
import structlog

from enforcer import mcp_protocol as proto
from envelope import wiring
from envelope.config import Config
from sensor.kubeapi import Backoff
from sensor.mcp_evidence import tool_call_key
from sensor.outbox import Outbox, mark
from sensor.state_dir import StateDir, atomic_write
from sensor.store import ProfileStore
from sensor.workload import Workload
from sensor.workloadprofile import ClusterProfiles, ProfilePublisher, PublisherThread
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.profiles import node_profile

W = Workload("agents", "Deployment", "researcher", "main")
LOG = tool_call_key("git_log")
TOOLS = [{"name": "git_log", "description": "Shows the commit logs", "inputSchema": {"type": "object"}}]


@pytest.fixture(autouse=True)
def _plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def m(**body) -> bytes:
    return proto.encode({"jsonrpc": "2.0", **body})


def gateway_session(config: Config, sid: str, calls: int) -> None:
    gw = wiring.mcp_gateway(config, W, None, "observe")
    gw.open(sid, {})
    gw.client(sid, m(id=1, method="tools/list"))
    gw.server(sid, m(id=1, result={"tools": TOOLS}))
    for i in range(calls):
        gw.client(sid, m(id=10 + i, method="tools/call",
                         params={"name": "git_log", "arguments": {"repo_path": "/srv/repo", "max_count": i}}))
    gw.close(sid)
    gw.flush()


def config_for(tmp_path, node: str = "node-a") -> Config:
    return Config.load(None, state_dir=tmp_path / "state").replace(node_name=node)


def test_a_flushed_gateway_contribution_is_taken_once_per_change(tmp_path):
    config = config_for(tmp_path)
    box = Outbox(config.state_dir, "node-a")
    assert box.changed() == {}  # no gateway yet: no outbox directory
    gateway_session(config, "s1", 2)
    got = box.changed()
    assert list(got) == [W] and list(got[W]) == ["node-a/mcp"]
    assert got[W]["node-a/mcp"].behaviours[LOG].count == 2
    assert box.changed() == {}  # unchanged since
    gateway_session(config, "s2", 3)
    again = box.changed()[W]["node-a/mcp"]
    assert again.behaviours[LOG].count == 5 and again.closed_sessions == 2
    assert Outbox(config.state_dir, "node-b").changed() == {}  # another node's daemon takes nothing
    assert oct(os.stat(StateDir(config.state_dir).outbox).st_mode & 0o777) == "0o700"


def test_a_marker_never_hands_over_the_nodes_own_contribution(tmp_path):
    store = ProfileStore(tmp_path)
    store.save(node_profile("node-a", 2, workload=W))
    mark(tmp_path, W, "node-a")           # the aggregator's own: published from memory only
    mark(tmp_path, W, "node-a/missing")   # named, but not in the stored profile
    assert Outbox(tmp_path, "node-a", store).changed() == {}


def test_a_damaged_marker_is_counted_and_skipped(tmp_path):
    config = config_for(tmp_path)
    gateway_session(config, "s1", 1)
    bad = StateDir(config.state_dir).outbox / "bad.json"
    bad.write_text("{not json")
    bad.chmod(0o600)
    box = Outbox(config.state_dir, "node-a")
    assert list(box.changed()) == [W] and box.problems == 1
    atomic_write(bad, json.dumps({"workload": {"namespace": "x"}, "contribution": "node-a/mcp"}).encode())
    assert box.changed() == {} and box.problems == 2


def test_the_daemons_publisher_writes_the_gateway_contribution_beside_its_own(tmp_path):
    config = config_for(tmp_path)
    gateway_session(config, "s1", 2)
    with FakeApiServer() as kube:
        cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=3, sleep=lambda d: None))
        worker = PublisherThread(ProfilePublisher(cp, "node-a"), retry_interval=3600).start()
        try:
            worker.publish({W: node_profile("node-a", 1, workload=W)}, written=[W])  # the daemon's own
            worker.publish_contributions(Outbox(config.state_dir, "node-a").changed())
        finally:
            assert worker.close() is True
        got, problems = cp.read(W)
    assert problems == [] and sorted(got.nodes) == ["node-a", "node-a/mcp"]
    assert got.behaviours()[LOG].count == 2 and got.nodes["node-a/mcp"].closed_sessions == 1
    assert len(got.nodes["node-a"].sessions) == 1 and "syscall:read" in got.behaviours()


def test_a_failed_write_of_either_contribution_keeps_the_workload_pending():
    p = node_profile("node-a", 1, workload=W)
    for other in ("node-a/mcp", "node-b"):
        p.nodes[other] = node_profile(other, 2, workload=W).nodes[other]
    with FakeApiServer() as kube:
        cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=3, sleep=lambda d: None))
        pub = ProfilePublisher(cp, "node-a")
        kube.faults = [500] * 3  # the node's own write exhausts its attempts; its gateway's goes through
        out = pub.publish({W: p}, written=[W])
        assert [(r.node, r.ok) for r in out] == [("node-a", False), ("node-a/mcp", True)] and pub.pending == {W}
        out = pub.publish({W: p}, written=[])  # retried; the gateway's, unchanged, is not written again
        assert [(r.node, r.ok, r.unchanged) for r in out] == [("node-a", True, False), ("node-a/mcp", True, True)]
        assert pub.pending == set()
        got, _ = cp.read(W)
    assert sorted(got.nodes) == ["node-a", "node-a/mcp"]  # another node's contribution is its daemon's
