"""Network policy exports: one policy's egress allow-list as a Kubernetes ``NetworkPolicy`` and as
a ``CiliumNetworkPolicy``.

Pure and deterministic: the same policy and options give the same dict (and byte-identical
YAML through :func:`dump`). Both exports come from ``policy.egress``, the same rules the
cgroup/BPF egress programs enforce on the node, so one body of evidence feeds every substrate.

Pod selection. A policy names a workload ``(namespace, kind, name, container)``, not a label
selector. The exports select the workload's pods with ``app: <workload name>`` by default, the
common convention for a Deployment's pod template labels; pass ``pod_labels`` (``envelope compile
--pod-label KEY=VALUE``) when the workload's pods carry other labels. A NetworkPolicy selects
pods, not containers: every container of the selected pods gets the union of their egress, so
compile one export per pod, from a policy whose egress covers all of its containers.

Semantics kept:

* ``policyTypes: [Egress]`` only; ingress is not touched.
* Each egress rule is an ``ipBlock`` CIDR with its protocol and ports; a port range becomes
  ``port`` + ``endPort`` (Kubernetes 1.25+ and Cilium 1.16+).
* Rules with the same port list are merged into one egress rule with several CIDRs.
* A policy that leaves the egress substrate out does not constrain egress: the exports allow all
  egress (an empty NetworkPolicy egress rule; Cilium ``toEntities: [all]``).
* DNS is not special-cased: the export allows the resolver only if the policy does.
* NetworkPolicy and CiliumNetworkPolicy have no alert mode; the policy's mode is carried as an
  annotation and a policy in observe or alert mode still exports as an enforcing object.
"""

from __future__ import annotations

import re
from typing import Mapping

import yaml

from .seccomp import k8s_name

NETWORKPOLICY_API_VERSION = "networking.k8s.io/v1"
CILIUM_API_VERSION = "cilium.io/v2"
MANAGED_BY = {"app.kubernetes.io/managed-by": "envelope"}
DEFAULT_POD_LABEL = "app"

_LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                         r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class NetExportError(ValueError):
    """A policy or option that cannot be exported as a network policy."""


def pod_selector_labels(policy, pod_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels that select the workload's pods (default ``app: <workload name>``)."""
    labels = dict(pod_labels) if pod_labels else {DEFAULT_POD_LABEL: policy.workload.name}
    for k, v in labels.items():
        if not _LABEL_NAME.match(k):
            raise NetExportError(f"pod label key {k!r} is not a valid Kubernetes label key")
        if not isinstance(v, str) or not _LABEL_VALUE.match(v):
            raise NetExportError(f"pod label {k}={v!r}: not a valid Kubernetes label value "
                                 f"(use --pod-label KEY=VALUE)")
    return dict(sorted(labels.items()))


def _check_workload(policy) -> None:
    w = policy.workload
    if w.namespace == "host" and w.kind == "Unit":
        raise NetExportError(f"workload {w} is a host unit, not a pod: network policies select pods")


def _port_groups(policy) -> list[tuple[tuple, list[str]]]:
    """``[(ports, [cidr, ...])]`` with ports ``((PROTO, port, endPort|None), ...)``, sorted."""
    groups: dict[tuple, list[str]] = {}
    for r in policy.egress:
        if r.port_range is not None:
            lo, hi = r.port_range
            ports = ((r.proto.upper(), lo, hi if hi != lo else None),)
        else:
            ports = tuple((r.proto.upper(), p, None) for p in r.ports)
        cidrs = groups.setdefault(ports, [])
        if r.cidr not in cidrs:
            cidrs.append(r.cidr)
    # policy.egress is already sorted by (proto, family, address, prefix, ports); keep CIDR order
    # and sort groups by their port list for a stable document.
    return sorted(groups.items(), key=lambda kv: [(p, lo, hi or 0) for p, lo, hi in kv[0]])


def _metadata(policy, suffix: str) -> dict:
    w = policy.workload
    return {
        "name": k8s_name(getattr(policy, "metadata_name", "") or f"{w.name}-{w.container}", suffix),
        "namespace": w.namespace,
        "labels": dict(MANAGED_BY),
        "annotations": {"envelope.dev/workload": str(w), "envelope.dev/mode": policy.mode},
    }


def _egress_constrained(policy) -> bool:
    return "egress" in getattr(policy, "substrates", ("egress",))


def compile_networkpolicy(policy, pod_labels: Mapping[str, str] | None = None) -> dict:
    """The policy's egress as a ``networking.k8s.io/v1`` ``NetworkPolicy``."""
    _check_workload(policy)
    egress: list[dict] = []
    if not _egress_constrained(policy):
        egress.append({})  # an empty rule allows all egress
    else:
        for ports, cidrs in _port_groups(policy):
            rule_ports = []
            for proto, lo, hi in ports:
                p: dict = {"protocol": proto, "port": lo}
                if hi is not None:
                    p["endPort"] = hi
                rule_ports.append(p)
            egress.append({"to": [{"ipBlock": {"cidr": c}} for c in cidrs], "ports": rule_ports})
    return {
        "apiVersion": NETWORKPOLICY_API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": _metadata(policy, "egress"),
        "spec": {
            "podSelector": {"matchLabels": pod_selector_labels(policy, pod_labels)},
            "policyTypes": ["Egress"],
            "egress": egress,
        },
    }


def compile_cilium(policy, pod_labels: Mapping[str, str] | None = None) -> dict:
    """The policy's egress as a ``cilium.io/v2`` ``CiliumNetworkPolicy`` (L3 ``toCIDR`` + L4
    ``toPorts``)."""
    _check_workload(policy)
    egress: list[dict] = []
    if not _egress_constrained(policy):
        egress.append({"toEntities": ["all"]})
    else:
        for ports, cidrs in _port_groups(policy):
            pp = []
            for proto, lo, hi in ports:
                p: dict = {"port": str(lo), "protocol": proto}
                if hi is not None:
                    p["endPort"] = hi
                pp.append(p)
            egress.append({"toCIDR": list(cidrs), "toPorts": [{"ports": pp}]})
    spec: dict = {"endpointSelector": {"matchLabels": pod_selector_labels(policy, pod_labels)}}
    # An empty egress list would leave egress unrestricted in Cilium; deny all explicitly.
    if egress:
        spec["egress"] = egress
    else:
        spec["egressDeny"] = [{"toEntities": ["all"]}]
    return {
        "apiVersion": CILIUM_API_VERSION,
        "kind": "CiliumNetworkPolicy",
        "metadata": _metadata(policy, "egress"),
        "spec": spec,
    }


def parse_pod_labels(items: list[str] | None) -> dict[str, str] | None:
    """``["app=web", "tier=agent"]`` -> ``{"app": "web", "tier": "agent"}``."""
    if not items:
        return None
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise NetExportError(f"--pod-label {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def dump(doc: dict) -> str:
    """Deterministic YAML for an exported object."""
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False, width=4096)
