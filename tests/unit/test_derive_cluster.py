"""``envelope derive --from-cluster``: derive from WorkloadProfile objects merged across nodes,
read from a real HTTP API server on 127.0.0.1 through a kubeconfig."""

from __future__ import annotations

import pytest
import structlog
import yaml
from tests.fakes.apiserver import FakeApiServer

from envelope.cli import main
from tests.kubeconfig import write_kubeconfig
from sensor.kubeapi import Backoff
from sensor.workloadprofile import ClusterProfiles
from sensor.profile import Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "researcher", "main")
T0 = 1_767_225_600.0


@pytest.fixture(autouse=True)
def _plain_logging():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def kube(tmp_path):
    with FakeApiServer() as api:
        api.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{api.port}")
        yield api


def node_profile(node: str, sessions: int, offset: int) -> Profile:
    """Each node alone has two sessions of ``connect``: below M=3 on its own, above it merged."""
    p = Profile(W)
    c = p.node(node)
    for s in range(sessions):
        sid = f"{node}-s{s}"
        start = T0 + (offset + s) * 86400.0
        c.open_session(sid, start)
        c.observe(sid, "syscall:read", 4, start + 1)
        c.observe(sid, "connect:tcp:10.0.3.7:443", 3, start + 2)
        c.close_session(sid, start + 60)
    c.touch(T0 + 10 * 86400.0)
    return p


def test_derive_from_cluster_merges_nodes(kube, capsys, tmp_path):
    cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=1))
    cp.publish(W, node_profile("node-a", 2, 0).nodes["node-a"])
    cp.publish(W, node_profile("node-b", 2, 2).nodes["node-b"])
    rc = main(["--state-dir", str(tmp_path / "none"), "derive", "researcher", "--from-cluster",
               "--kubeconfig", kube.kubeconfig])
    out, err = capsys.readouterr()
    assert rc == 0, err
    spec = yaml.safe_load(out)["spec"]
    assert spec["allow"]["egress"] == [{"proto": "tcp", "cidr": "10.0.3.0/24", "ports": [443]}]
    prov = {p["entry"]: p for p in spec["provenance"]}
    assert prov["egress:tcp:10.0.3.0/24:443"]["evidence"]["sessions"] == 4
    assert prov["syscall:read"]["evidence"]["count"] == 16


def test_derive_from_cluster_errors_are_one_line(kube, capsys, tmp_path):
    rc = main(["derive", "nobody", "--from-cluster", "--kubeconfig", kube.kubeconfig])
    _, err = capsys.readouterr()
    assert rc == 2 and err.strip().startswith("envelope: error: --from-cluster: no WorkloadProfile objects")
    assert len(err.strip().splitlines()) == 1
    rc = main(["--state-dir", str(tmp_path), "derive", "x", "--kubeconfig", kube.kubeconfig])
    _, err = capsys.readouterr()
    assert rc == 2 and "need --from-cluster" in err
