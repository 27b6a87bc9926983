"""NetworkPolicy and CiliumNetworkPolicy exports: structure, semantics, and the NetworkPolicy
against the real Kubernetes schema (kubernetes-validate, strict) of a current version."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from enforcer import netexport
from enforcer.policy import EgressRule, Policy, load_policy
from sensor.workload import Workload

kv = pytest.importorskip("kubernetes_validate")

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "compiled"
POLICIES = sorted((GOLDEN / "policies").glob("*.yaml"))
K8S_VERSION = kv.utils.latest_version()
W = Workload("agents", "Deployment", "web", "main")


def policy(egress, substrates=("syscall", "egress", "exec"), mode="enforce") -> Policy:
    return Policy(workload=W, mode=mode, substrates=substrates, egress=tuple(egress))


def validate(doc):
    return kv.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.stem)
def test_networkpolicy_passes_strict_schema(path):
    doc = netexport.compile_networkpolicy(load_policy(path))
    assert validate(doc)
    # and the golden file as written
    golden = yaml.safe_load((GOLDEN / f"{path.stem}.networkpolicy.yaml").read_text())
    assert validate(golden)


def test_schema_check_is_real():
    doc = netexport.compile_networkpolicy(policy([EgressRule("tcp", "10.0.0.0/8", (443,))]))
    doc["spec"]["egress"][0]["ports"][0]["portt"] = 1
    with pytest.raises(kv.ValidationError):
        validate(doc)


def test_networkpolicy_rules():
    p = policy([EgressRule("tcp", "10.0.3.0/24", (443, 8443)),
                EgressRule("tcp", "192.0.2.1/32", (443, 8443)),
                EgressRule("udp", "10.96.0.10/32", (53,)),
                EgressRule("tcp", "2001:db8::/32", (), (8000, 8100)),
                EgressRule("tcp", "198.51.100.0/24", (), (9000, 9000))])
    doc = netexport.compile_networkpolicy(p)
    spec = doc["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert spec["podSelector"] == {"matchLabels": {"app": "web"}}
    assert "ingress" not in spec
    rules = {tuple((q["protocol"], q["port"], q.get("endPort")) for q in r["ports"]):
             [t["ipBlock"]["cidr"] for t in r["to"]] for r in spec["egress"]}
    assert rules == {
        (("TCP", 443, None), ("TCP", 8443, None)): ["10.0.3.0/24", "192.0.2.1/32"],
        (("UDP", 53, None),): ["10.96.0.10/32"],
        (("TCP", 8000, 8100),): ["2001:db8::/32"],
        (("TCP", 9000, None),): ["198.51.100.0/24"],  # a one-port range is a plain port
    }
    assert validate(doc)


def test_empty_egress_denies_and_unconstrained_allows():
    deny = netexport.compile_networkpolicy(policy([]))
    assert deny["spec"]["egress"] == [] and deny["spec"]["policyTypes"] == ["Egress"]
    allow = netexport.compile_networkpolicy(policy([], substrates=("syscall",)))
    assert allow["spec"]["egress"] == [{}]
    assert validate(deny) and validate(allow)
    assert netexport.compile_cilium(policy([]))["spec"]["egressDeny"] == [{"toEntities": ["all"]}]
    assert netexport.compile_cilium(policy([], substrates=("syscall",)))["spec"]["egress"] == \
        [{"toEntities": ["all"]}]


def test_cilium_rules():
    p = policy([EgressRule("tcp", "10.0.3.0/24", (443,)),
                EgressRule("tcp", "2001:db8::/32", (), (8000, 8100))])
    doc = netexport.compile_cilium(p)
    assert doc["apiVersion"] == "cilium.io/v2" and doc["kind"] == "CiliumNetworkPolicy"
    assert doc["spec"]["endpointSelector"] == {"matchLabels": {"app": "web"}}
    assert doc["spec"]["egress"] == [
        {"toCIDR": ["10.0.3.0/24"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        {"toCIDR": ["2001:db8::/32"],
         "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}]},
    ]


def test_pod_labels_override_and_validation():
    p = policy([EgressRule("tcp", "10.0.0.0/8", (443,))])
    doc = netexport.compile_networkpolicy(p, {"app.kubernetes.io/name": "web", "tier": "agent"})
    assert doc["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "web", "tier": "agent"}
    assert validate(doc)
    with pytest.raises(netexport.NetExportError):
        netexport.compile_networkpolicy(p, {"bad key!": "x"})
    with pytest.raises(netexport.NetExportError):
        netexport.parse_pod_labels(["novalue"])
    assert netexport.parse_pod_labels(["a=b", "c=d"]) == {"a": "b", "c": "d"}


def test_host_unit_is_refused():
    p = Policy(workload=Workload.host("backup"), egress=(EgressRule("tcp", "10.0.0.0/8", (22,)),))
    with pytest.raises(netexport.NetExportError, match="host unit"):
        netexport.compile_networkpolicy(p)


def test_same_policy_same_bytes():
    p = load_policy(POLICIES[0])
    q = load_policy(POLICIES[0])
    assert netexport.dump(netexport.compile_networkpolicy(p)) == \
        netexport.dump(netexport.compile_networkpolicy(q))
    assert netexport.dump(netexport.compile_cilium(p)) == netexport.dump(netexport.compile_cilium(q))
