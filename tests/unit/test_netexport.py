"""NetworkPolicy and CiliumNetworkPolicy exports: structure, semantics, and the NetworkPolicy
against the real Kubernetes schema (kubernetes-validate, strict) of a current version."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from enforcer import netexport
from enforcer.policy import EgressRule, Policy, load_policy
from sensor.workload import Workload

kv = pytest.importorskip("kubernetes_validate")

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "compiled"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
#: Cilium 1.18.2's CiliumNetworkPolicy schema (tests/fixtures/schemas/README.md names the source)
CILIUM_SCHEMA = json.loads((FIXTURES / "schemas" / "cilium-v1.18.2-ciliumnetworkpolicy-v2.schema.json").read_text())
SERVICES = [json.loads((FIXTURES / "k8s" / f"service-{n}.json").read_text())
            for n in ("model-gateway", "kube-dns", "vector-db-external")]
POLICIES = sorted((GOLDEN / "policies").glob("*.yaml"))
K8S_VERSION = kv.utils.latest_version()
W = Workload("agents", "Deployment", "web", "main")


def policy(egress, substrates=("syscall", "egress", "exec"), mode="enforce") -> Policy:
    return Policy(workload=W, mode=mode, substrates=substrates, egress=tuple(egress))


def validate(doc):
    return kv.validate(doc, K8S_VERSION, strict=True)


def cilium_problems(doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(CILIUM_SCHEMA).iter_errors(doc)]


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
    # Cilium: default deny for the selected pods through one empty rule, never an egressDeny
    # (deny rules win over every allow, other teams' DNS policies included)
    cilium = netexport.compile_cilium(policy([]))
    assert cilium["spec"] == {"endpointSelector": {"matchLabels": {"app": "web"}}, "egress": [{}]}
    assert netexport.compile_cilium(policy([], substrates=("syscall",)))["spec"]["egress"] == \
        [{"toEntities": ["all"]}]


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.stem)
def test_cilium_exports_validate_against_ciliums_schema(path):
    p = load_policy(path)
    for doc in (netexport.compile_cilium(p), netexport.compile_cilium(p, services=SERVICES),
                yaml.safe_load((GOLDEN / f"{path.stem}.cilium.yaml").read_text())):
        assert cilium_problems(doc) == []
        assert "egressDeny" not in doc["spec"]


def test_cilium_schema_check_is_real():
    doc = netexport.compile_cilium(policy([EgressRule("tcp", "10.0.0.0/8", (443,))]))
    doc["spec"]["egress"][0]["toPorts"][0]["ports"][0]["protocol"] = "TCPP"
    assert cilium_problems(doc)
    del doc["spec"]["endpointSelector"]
    assert any("is not valid under any of the given schemas" in p for p in cilium_problems(doc))
    assert cilium_problems(netexport.compile_cilium(policy([]))) == []


def test_clusterip_destinations_export_as_the_services_pods():
    p = policy([EgressRule("tcp", "10.96.41.17/32", (443, 9000)),  # model-gateway's ClusterIP
                EgressRule("udp", "10.96.0.10/32", (53,)),  # kube-dns
                EgressRule("tcp", "10.96.77.5/32", (6333,)),  # a Service without a selector
                EgressRule("tcp", "192.0.2.0/24", (443,))])
    dest = netexport.service_destinations(p, SERVICES)
    assert [r.cidr for r in dest.rules] == ["10.96.77.5/32", "192.0.2.0/24"]
    assert len(dest.unresolved) == 1 and "agents/vector-db, which has no selector" in dest.unresolved[0]
    np = netexport.compile_networkpolicy(p, services=SERVICES)
    assert validate(np)
    assert np["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"ipBlock": {"cidr": "10.96.77.5/32"}}], "ports": [{"protocol": "TCP", "port": 6333}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "inference"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/component": "server",
                                                 "app.kubernetes.io/name": "model-gateway"}}}],
         "ports": [{"protocol": "TCP", "port": 8443}, {"protocol": "TCP", "port": "grpc"}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}]},
    ]
    cilium = netexport.compile_cilium(p, services=SERVICES)
    assert cilium_problems(cilium) == []
    assert cilium["spec"]["egress"][-1] == {
        "toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns", "io.kubernetes.pod.namespace": "kube-system"}}],
        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}
    # the policy itself is unchanged: Envelope's egress programs still see and allow the ClusterIP
    assert sorted(r.cidr for r in p.egress) == ["10.96.0.10/32", "10.96.41.17/32", "10.96.77.5/32", "192.0.2.0/24"]
    # without the Services, the export is the CIDRs as before
    assert sorted(t["ipBlock"]["cidr"] for r in netexport.compile_networkpolicy(p)["spec"]["egress"]
                  for t in r["to"]) == ["10.96.0.10/32", "10.96.41.17/32", "10.96.77.5/32", "192.0.2.0/24"]


def test_a_wider_cidr_keeps_its_block_and_gains_the_services_inside():
    p = policy([EgressRule("udp", "10.96.0.0/16", (53,))])
    np = netexport.compile_networkpolicy(p, services=SERVICES)
    assert np["spec"]["egress"][0] == {"to": [{"ipBlock": {"cidr": "10.96.0.0/16"}}],
                                       "ports": [{"protocol": "UDP", "port": 53}]}
    assert np["spec"]["egress"][1]["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert len(np["spec"]["egress"]) == 2  # model-gateway has no UDP 53 port: not added


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
