"""``envelope cluster ...`` against a real HTTP API server on 127.0.0.1, found through a kubeconfig."""

from __future__ import annotations

import json

import msgpack
import pytest
import structlog
from tests.fakes.apiserver import FakeApiServer
from tests.fakes.profiles import node_profile

from enforcer.leastprivilegepolicy import ClusterPolicies
from enforcer.policy import EgressRule, Policy, dump_policy
from envelope.cli import main
from tests.kubeconfig import write_kubeconfig
from sensor.kubeapi import Backoff
from sensor.workloadprofile import ClusterProfiles
from sensor.profile import Profile
from sensor.workload import Workload

W = Workload("agents", "Deployment", "researcher", "main")


@pytest.fixture(autouse=True)
def _plain_logging():
    """Log to whatever stderr is now: an earlier test's ``envelope.cli.main`` may have bound
    structlog to a captured stream that pytest has since closed."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def kube(tmp_path):
    with FakeApiServer() as api:
        api.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{api.port}")
        yield api


def run(kube, capsys, *argv) -> tuple[int, str, str]:
    rc = main(["--state-dir", "/nonexistent", "cluster", "--kubeconfig", kube.kubeconfig, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def publish(kube) -> Profile:
    cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=1))
    a, b = node_profile("node-a", 2), node_profile("node-b", 3)
    cp.publish(W, a.nodes["node-a"])
    cp.publish(W, b.nodes["node-b"])
    return a.merge(b)


def test_profiles_lists_merged_workloads(kube, capsys):
    publish(kube)
    rc, out, _ = run(kube, capsys, "profiles", "-o", "json")
    assert rc == 0
    data = json.loads(out)
    assert data["problems"] == []
    (row,) = data["profiles"]
    assert row["workload"] == W.key and row["nodes"] == ["node-a", "node-b"] and row["sessions"] == 5
    rc, out, _ = run(kube, capsys, "profiles")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["WORKLOAD", "NODES", "BEHAVIOURS"]
    assert W.key in out


def test_profile_shows_and_saves_the_merged_profile(kube, capsys, tmp_path):
    merged = publish(kube)
    path = tmp_path / "researcher.msgpack"
    rc, out, _ = run(kube, capsys, "profile", "agents/researcher", "--save", str(path), "-o", "json")
    assert rc == 0
    view = json.loads(out)
    assert view["nodes"] == ["node-a", "node-b"] and view["sessions"]["count"] == 5
    saved = Profile.unpack(msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False))
    assert saved.pack() == merged.pack()


def test_profile_of_unknown_workload_is_one_clear_error(kube, capsys):
    publish(kube)
    rc, out, err = run(kube, capsys, "profile", "nobody")
    assert rc == 2 and err.strip() == "envelope: error: no WorkloadProfile objects for 'nobody' in envelope-system"


def test_apply_then_policies_shows_per_node_status(kube, capsys, tmp_path):
    policy = Policy(W, mode="alert", syscalls=("read", "write"), egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),))
    f = tmp_path / "policy.yaml"
    f.write_text(dump_policy(policy))
    rc, out, _ = run(kube, capsys, "apply", str(f))
    assert rc == 0 and "researcher-main applied in agents" in out
    node = ClusterPolicies.from_api_client(kube.api_client(), "node-a", backoff=Backoff(attempts=1))
    (cp,), _ = node.list()
    node.report(cp, "applied", localhost_profile="envelope/agents/deployment_researcher_main.json")
    rc, out, _ = run(kube, capsys, "policies", "-o", "json")
    (p,) = json.loads(out)["policies"]
    assert p["workload"] == W.key and p["mode"] == "alert" and p["stale"] is False
    assert p["nodes"]["node-a"]["state"] == "applied"
    rc, out, _ = run(kube, capsys, "policies")
    assert "agents/researcher-main" in out and "envelope/agents/deployment_researcher_main.json" in out


def test_unreachable_api_is_one_clear_error(tmp_path, capsys):
    with FakeApiServer() as gone:
        port = gone.port
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: x, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: x, user: u}}}}]
current-context: x
""")
    rc = main(["cluster", "--kubeconfig", str(cfg), "profiles"])
    _, err = capsys.readouterr()
    assert rc == 2
    last = err.strip().splitlines()[-1]  # after one structlog warning per retried attempt
    assert last.startswith("envelope: error: list workloadprofiles in envelope-system")
    assert "gave up after 3 attempts" in last


def test_missing_kubeconfig_is_one_clear_error(tmp_path, capsys):
    rc = main(["cluster", "--kubeconfig", str(tmp_path / "nope"), "profiles"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("envelope: error: no Kubernetes API configuration")


def test_cluster_profile_to_derived_policy_to_cluster_policy(kube, capsys, tmp_path):
    """The cluster workflow: merged evidence -> derive -> policy object in the workload's namespace."""
    merged = publish(kube)
    saved = tmp_path / "researcher.msgpack"
    assert run(kube, capsys, "profile", "researcher", "--save", str(saved))[0] == 0
    policy_file = tmp_path / "policy.yaml"
    assert main(["derive", str(saved), "--force", "--out", str(policy_file)]) == 0
    capsys.readouterr()
    rc, out, _ = run(kube, capsys, "apply", str(policy_file))
    assert rc == 0
    node = ClusterPolicies.from_api_client(kube.api_client(), "node-a", backoff=Backoff(attempts=1))
    (cp,), problems = node.list()
    assert problems == [] and cp.namespace == "agents" and cp.workload == W
    seen = {k.split(":", 1)[1] for k in merged.behaviours() if k.startswith("syscall:")}
    assert seen == {"read", "openat"}
    assert seen <= set(cp.policy.syscalls), "the syscalls seen on both nodes are allowed"


def test_ambiguous_name_asks_for_the_full_key(kube, capsys):
    from sensor.workloadprofile import load_cluster_profile

    publish(kube)
    other = Workload("staging", "Deployment", "researcher", "main")
    cp = ClusterProfiles.from_api_client(kube.api_client(), backoff=Backoff(attempts=1))
    cp.publish(other, node_profile("node-a", 1, workload=other).nodes["node-a"])
    rc, _, err = run(kube, capsys, "profile", "researcher")
    assert rc == 2 and "matches 2 workloads" in err and "give namespace/kind/name/container" in err
    profile, problems = load_cluster_profile("staging/researcher", kube.api_client())
    assert profile.workload == other and problems == []


# ---- envelope compile with the cluster's Services -------------------------------------------------


def test_compile_networkpolicy_with_services_from_the_cluster_and_from_a_file(kube, tmp_path, capsys):
    from pathlib import Path

    k8s = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"
    services = [json.loads((k8s / f"service-{n}.json").read_text()) for n in ("kube-dns", "vector-db-external")]
    for svc in services:
        kube.put(svc)
    policy = Policy(Workload("agents", "Deployment", "web", "main"), mode="enforce",
                    egress=(EgressRule("udp", "10.96.0.10/32", (53,)), EgressRule("tcp", "10.96.77.5/32", (6333,))))
    path = tmp_path / "p.yaml"
    path.write_text(dump_policy(policy))
    rc = main(["compile", str(path), "--format", "networkpolicy", "--services-from-cluster",
               "--kubeconfig", kube.kubeconfig])
    out, err = capsys.readouterr()
    assert rc == 0, err
    import yaml

    doc = yaml.safe_load(out)
    peers = [t for r in doc["spec"]["egress"] for t in r["to"]]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}} in peers
    assert {"ipBlock": {"cidr": "10.96.77.5/32"}} in peers  # no selector: kept, and said so
    assert "agents/vector-db, which has no selector" in err
    assert kube.count("GET", "/api/v1/services") == 1
    listing = tmp_path / "services.json"
    listing.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": services}))
    rc = main(["compile", str(path), "--format", "cilium", "--services", str(listing)])
    out, err = capsys.readouterr()
    assert rc == 0 and "toEndpoints" in out and "egressDeny" not in out
    assert main(["compile", str(path), "--format", "cilium", "--services", str(tmp_path / "missing.json")]) == 2


def test_the_replay_gate_keeps_a_breaking_enforce_policy_out_of_the_cluster(kube, capsys, tmp_path):
    """An enforce-mode policy reaches the cluster only if nothing in the workload's merged evidence
    would be denied; alert mode is not gated; skipping the gate is audited."""
    publish(kube)  # evidence: read and openat on two nodes
    breaks = tmp_path / "breaks.yaml"
    breaks.write_text(dump_policy(Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read",))))
    rc = main(["--state-dir", str(tmp_path / "state"), "cluster", "--kubeconfig", kube.kubeconfig, "apply",
               str(breaks)])
    err = capsys.readouterr().err
    assert rc == 1 and "would deny 1 observed behaviours (syscall:openat)" in err
    node = ClusterPolicies.from_api_client(kube.api_client(), "node-a", backoff=Backoff(attempts=1))
    assert node.list()[0] == []  # nothing was created
    holds = tmp_path / "holds.yaml"
    holds.write_text(dump_policy(Policy(W, mode="enforce", substrates=("syscall",), syscalls=("read", "openat"))))
    assert main(["--state-dir", str(tmp_path / "state"), "cluster", "--kubeconfig", kube.kubeconfig, "apply",
                 str(holds)]) == 0
    assert main(["--state-dir", str(tmp_path / "state"), "cluster", "--kubeconfig", kube.kubeconfig, "apply",
                 str(breaks), "--skip-replay-gate", "incident 42: deny openat now"]) == 0
    from enforcer import audit
    [entry] = audit.read(tmp_path / "state", action="replay.gate.skipped")
    assert entry["reason"] == "incident 42: deny openat now" and entry["workload"] == W.key
    capsys.readouterr()
