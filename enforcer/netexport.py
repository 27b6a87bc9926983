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
* An empty allow list selects the pods into default deny and allows nothing, and nothing more:
  NetworkPolicy ``egress: []``, Cilium ``egress: [{}]`` (Cilium's own default-deny idiom). Never
  an ``egressDeny``: deny rules win over every allow in Cilium, so a deny-all would also block
  what other policies allow the same pods (DNS, for one).

Names. A policy's ``allow.names`` become Cilium ``toFQDNs`` (``matchName``; a ``*.suffix``
pattern with a label limit of N becomes the N patterns ``*.suffix`` .. ``*.*...suffix``, since
Cilium's ``*.`` spans exactly one label), with their ports. Cilium learns a name's addresses
only from DNS traffic its proxy sees, so every rule that allows port 53 (the resolvers) carries
the DNS visibility rule ``rules.dns`` listing exactly the allowed names and patterns (resolve-only
names included). A NetworkPolicy cannot express names: its export falls back to the addresses
each name was observed at (the policy's provenance), as ``/32`` and ``/128`` blocks, says so in
the ``envelope.dev/names-as-addresses`` annotation, and :func:`name_warnings` gives the warning
the CLI prints: an address a name resolves to later is denied by that export.

Service ClusterIPs. The sensor sees the address a socket connects to, and for a Service that is
its ClusterIP; NetworkPolicy and Cilium match the pod address after the Service's DNAT, so a
ClusterIP rule would never match. Given the cluster's ``Service`` objects (``services``, read
through the API by the caller), a rule whose destination is a Service's ClusterIP is exported as
that Service's pods: ``podSelector`` from the Service's ``spec.selector`` and a
``namespaceSelector`` on ``kubernetes.io/metadata.name``, on the Service's ``targetPort``. A
wider CIDR keeps its ``ipBlock`` and also gets the pods of the Services inside it. A Service
without a selector (its endpoints are managed by hand) cannot be selected by labels and stays an
``ipBlock``; :func:`service_destinations` reports it. Envelope's own egress programs keep
enforcing the ClusterIP, which is what they see.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from sensor.safeyaml import dump_yaml

from .seccomp import k8s_name

NETWORKPOLICY_API_VERSION = "networking.k8s.io/v1"
#: The label the API server puts on every namespace (Kubernetes 1.21+).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
#: The label Cilium gives every endpoint for its pod's namespace.
CILIUM_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
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


def _port_groups(rules) -> list[tuple[tuple, list[str]]]:
    """``[(ports, [cidr, ...])]`` with ports ``((PROTO, port, endPort|None), ...)``, sorted."""
    groups: dict[tuple, list[str]] = {}
    for r in rules:
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


@dataclass(frozen=True)
class ServicePeer:
    """The pods behind one Service port: where traffic to its ClusterIP really goes."""

    namespace: str
    service: str
    selector: tuple[tuple[str, str], ...]
    proto: str  # TCP | UDP
    target_port: int | str  # a number, or the name of a container port


@dataclass
class ServiceDestinations:
    """A policy's egress split for network exports: rules kept as CIDRs, the Service pods that
    replace ClusterIPs, and the ClusterIP destinations that could not be replaced (and why)."""

    rules: list  # EgressRule
    peers: list[ServicePeer]
    unresolved: list[str]


def _service_ips(svc: Mapping) -> list:
    spec = svc.get("spec") or {}
    out = []
    for ip in list(spec.get("clusterIPs") or []) + [spec.get("clusterIP")]:
        if not ip or ip == "None":
            continue
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if addr not in out:
            out.append(addr)
    return out


def _port_in_rule(rule, port: int) -> bool:
    if rule.port_range is not None:
        return rule.port_range[0] <= port <= rule.port_range[1]
    return port in rule.ports


def service_destinations(policy, services: Iterable[Mapping] | None = None) -> ServiceDestinations:
    """Split ``policy.egress`` for network exports (pure; see the module docstring).

    A rule whose CIDR is a single address that is a Service's ClusterIP is replaced by the
    Service's pods on the matching ports; a wider rule is kept and gains the pods of the
    Services whose ClusterIP it covers."""
    services = sorted(services or [], key=lambda s: ((s.get("metadata") or {}).get("namespace", ""),
                                                       (s.get("metadata") or {}).get("name", "")))
    rules, peers, unresolved = [], [], []
    for rule in policy.egress:
        net = rule.network
        single = net.num_addresses == 1
        replaced = False
        for svc in services:
            meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
            ips = [ip for ip in _service_ips(svc) if ip.version == net.version and ip in net]
            if not ips:
                continue
            ns, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
            selector = spec.get("selector") or {}
            matched = [sp for sp in spec.get("ports") or []
                       if str(sp.get("protocol") or "TCP").lower() == rule.proto
                       and _port_in_rule(rule, int(sp.get("port", 0)))]
            if not matched:
                continue
            if not selector:
                unresolved.append(f"{rule.proto}:{ips[0]} is Service {ns}/{name}, which has no selector; "
                                  f"kept as an ipBlock, which matches no pod after the Service's DNAT")
                continue
            replaced = replaced or single
            for sp in matched:
                target = sp.get("targetPort", sp.get("port"))
                target = int(target) if isinstance(target, int) or str(target).isdigit() else str(target)
                peer = ServicePeer(ns, name, tuple(sorted((str(k), str(v)) for k, v in selector.items())),
                                   rule.proto.upper(), target)
                if peer not in peers:
                    peers.append(peer)
        if not replaced:
            rules.append(rule)
    peers.sort(key=lambda p: (p.namespace, p.service, p.proto, str(p.target_port)))
    return ServiceDestinations(rules, peers, unresolved)


def _peer_groups(peers: list[ServicePeer]) -> list[tuple[tuple[str, tuple], list[tuple[str, int | str]]]]:
    """Peers grouped by the pods they select: ``[((namespace, selector), [(proto, port), ...])]``."""
    groups: dict[tuple[str, tuple], list[tuple[str, int | str]]] = {}
    for p in peers:
        ports = groups.setdefault((p.namespace, p.selector), [])
        if (p.proto, p.target_port) not in ports:
            ports.append((p.proto, p.target_port))
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))


def _metadata(policy, suffix: str) -> dict:
    w = policy.workload
    return {
        "name": k8s_name(getattr(policy, "metadata_name", "") or f"{w.name}-{w.container}", suffix),
        "namespace": w.namespace,
        "labels": dict(MANAGED_BY),
        "annotations": {"envelope.dev/workload": str(w), "envelope.dev/mode": policy.mode},
    }


def _name_patterns(rule) -> list[str]:
    """Cilium patterns for a name rule: ``*.`` spans exactly one label in Cilium."""
    if not rule.wildcard:
        return [rule.pattern]
    base = rule.pattern[2:]
    return ["*." * n + base for n in range(1, rule.max_labels + 1)]


def _fqdn_selectors(rules) -> list[dict]:
    out: list[dict] = []
    for r in rules:
        for p in _name_patterns(r):
            sel = {"matchPattern": p} if "*" in p else {"matchName": p}
            if sel not in out:
                out.append(sel)
    return out


def _name_port_groups(policy) -> list[tuple[tuple, list]]:
    """``[(ports, [name rules])]`` as :func:`_port_groups` does for CIDRs."""
    groups: dict[tuple, list] = {}
    for r in policy.names:
        if r.proto is None:
            continue
        if r.port_range is not None:
            lo, hi = r.port_range
            ports = ((r.proto.upper(), lo, hi if hi != lo else None),)
        else:
            ports = tuple((r.proto.upper(), p, None) for p in r.ports)
        groups.setdefault(ports, []).append(r)
    return sorted(groups.items(), key=lambda kv: [(p, lo, hi or 0) for p, lo, hi in kv[0]])


def name_addresses(policy) -> dict[str, list[str]]:
    """pattern -> the addresses its connects were observed at (from provenance)."""
    from .names import NameRuleError, parse_name_entry
    out: dict[str, list[str]] = {}
    for p in policy.provenance:
        entry = p.get("entry", "")
        if not entry.startswith("name:"):
            continue
        try:
            pattern = parse_name_entry(entry).pattern
        except NameRuleError:
            continue
        seen = out.setdefault(pattern, [])
        for a in p.get("addresses") or []:
            if a not in seen:
                seen.append(a)
    return out


def _names_as_rules(policy) -> tuple[list, list[str]]:
    """The NetworkPolicy fallback: each name rule as rules on the addresses it was observed at;
    and the names that had none (nothing can be exported for them)."""
    from .policy import EgressRule
    addrs = name_addresses(policy)
    rules, missing = [], []
    for r in policy.names:
        if r.proto is None:
            continue
        seen = addrs.get(r.pattern) or []
        if not seen:
            missing.append(r.pattern)
        for a in seen:
            ip = ipaddress.ip_address(a)
            cidr = f"{ip.compressed}/{32 if ip.version == 4 else 128}"
            rules.append(EgressRule(r.proto, cidr, r.ports, r.port_range))
    return rules, sorted(set(missing))


def name_warnings(policy, fmt: str) -> list[str]:
    """What an export of ``policy`` in ``fmt`` cannot carry about its names."""
    if not policy.names or not _egress_constrained(policy):
        return []
    if fmt == "networkpolicy":
        addrs = name_addresses(policy)
        out = [f"NetworkPolicy cannot express names: {r.pattern} exported as the addresses it was "
               f"observed at ({', '.join(addrs.get(r.pattern) or []) or 'none'}); an address it "
               f"resolves to later is denied by this export (use --format cilium for toFQDNs)"
               for r in sorted({r.pattern: r for r in policy.names if r.proto}.values(),
                               key=lambda r: r.pattern)]
        return out
    if fmt == "cilium" and not any(_port_in_rule(r, 53) for r in policy.egress):
        return ["the policy allows names but no resolver (port 53): Cilium learns toFQDNs addresses "
                "only from DNS it sees, so these names will not resolve to allowed addresses"]
    return []


def _egress_constrained(policy) -> bool:
    return "egress" in getattr(policy, "substrates", ("egress",))


def compile_networkpolicy(policy, pod_labels: Mapping[str, str] | None = None,
                          services: Iterable[Mapping] | None = None) -> dict:
    """The policy's egress as a ``networking.k8s.io/v1`` ``NetworkPolicy``; ``services`` (the
    cluster's Service objects) turn ClusterIP destinations into the Services' pods."""
    _check_workload(policy)
    egress: list[dict] = []
    if not _egress_constrained(policy):
        egress.append({})  # an empty rule allows all egress
    else:
        dest = service_destinations(policy, services)
        fallback, _missing = _names_as_rules(policy)
        for ports, cidrs in _port_groups(list(dest.rules) + fallback):
            rule_ports = []
            for proto, lo, hi in ports:
                p: dict = {"protocol": proto, "port": lo}
                if hi is not None:
                    p["endPort"] = hi
                rule_ports.append(p)
            egress.append({"to": [{"ipBlock": {"cidr": c}} for c in cidrs], "ports": rule_ports})
        for (ns, selector), ports in _peer_groups(dest.peers):
            egress.append({"to": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}},
                                   "podSelector": {"matchLabels": dict(selector)}}],
                           "ports": [{"protocol": proto, "port": port} for proto, port in ports]})
    meta = _metadata(policy, "egress")
    if policy.names and _egress_constrained(policy):
        addrs = name_addresses(policy)
        meta["annotations"]["envelope.dev/names-as-addresses"] = "; ".join(
            f"{p}: {', '.join(addrs.get(p) or []) or 'no address observed'}"
            for p in sorted({r.pattern for r in policy.names if r.proto}))
    return {
        "apiVersion": NETWORKPOLICY_API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": pod_selector_labels(policy, pod_labels)},
            "policyTypes": ["Egress"],
            "egress": egress,
        },
    }


def compile_cilium(policy, pod_labels: Mapping[str, str] | None = None,
                   services: Iterable[Mapping] | None = None) -> dict:
    """The policy's egress as a ``cilium.io/v2`` ``CiliumNetworkPolicy`` (L3 ``toCIDR`` + L4
    ``toPorts``, and ``toEndpoints`` for the pods behind Service ClusterIPs)."""
    _check_workload(policy)
    egress: list[dict] = []
    if not _egress_constrained(policy):
        egress.append({"toEntities": ["all"]})
    else:
        dest = service_destinations(policy, services)
        visibility = {"dns": _fqdn_selectors(policy.names)} if policy.names else None

        def to_ports(pp: list[dict]) -> list[dict]:
            tp: dict = {"ports": pp}
            if visibility and any(p["port"] == "53" for p in pp):
                tp["rules"] = {"dns": [dict(x) for x in visibility["dns"]]}  # Cilium's DNS proxy sees, and allows, only these names
            return [tp]

        for ports, cidrs in _port_groups(dest.rules):
            pp = []
            for proto, lo, hi in ports:
                p: dict = {"port": str(lo), "protocol": proto}
                if hi is not None:
                    p["endPort"] = hi
                pp.append(p)
            egress.append({"toCIDR": list(cidrs), "toPorts": to_ports(pp)})
        for (ns, selector), ports in _peer_groups(dest.peers):
            egress.append({"toEndpoints": [{"matchLabels": {**dict(selector), CILIUM_NAMESPACE_LABEL: ns}}],
                           "toPorts": to_ports([{"port": str(port), "protocol": proto}
                                                for proto, port in ports])})
        for ports, rules in _name_port_groups(policy):
            pp = []
            for proto, lo, hi in ports:
                p = {"port": str(lo), "protocol": proto}
                if hi is not None:
                    p["endPort"] = hi
                pp.append(p)
            egress.append({"toFQDNs": _fqdn_selectors(rules), "toPorts": [{"ports": pp}]})
    if not egress:
        # Nothing allowed: one empty rule puts the pods in egress default deny and allows
        # nothing, while what other policies allow them still applies (an egressDeny would not).
        egress.append({})
    return {
        "apiVersion": CILIUM_API_VERSION,
        "kind": "CiliumNetworkPolicy",
        "metadata": _metadata(policy, "egress"),
        "spec": {"endpointSelector": {"matchLabels": pod_selector_labels(policy, pod_labels)},
                 "egress": egress},
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
    return dump_yaml(doc, default_flow_style=False, width=4096)
