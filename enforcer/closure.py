"""Closure: how observed behaviours become the elements the confidence decision judges.

Every substrate registers its element builders here, one per closure mode, in
:data:`BUILDERS`; :func:`elements` dispatches. ``probabilistic`` closure builds the
``structural`` elements (it adds soft detection rules on top, in :mod:`enforcer.derive`).

Structural rules, named in each element and in provenance:

* syscall: ``exact``, or ``syscall-group:NAME`` where an observed member of a named group of
  syscalls that do one kind of thing (:mod:`enforcer.syscall_groups`) stands for its whole
  group; a dangerous syscall (:data:`enforcer.syscall_groups.DANGEROUS`) is never admitted by
  association: it stays ``exact`` and is flagged ``dangerous``;
* egress: ``cidr-prefix`` (an address widens to its /24 or /64) or ``service-cidr`` (inside a
  configured known service CIDR), combined with ``exact-ports``, or ``port-range`` when more than
  ``max_ports`` distinct ports were seen there;
* exec: ``exact``, or ``directory-pattern`` (``/dir/*``) when more than ``max_siblings``
  distinct paths were seen in one directory, except in a system binary directory
  (:data:`SYSTEM_BIN_DIRS`, merged-usr aliases counted as one directory), where paths stay
  exact: widening there would admit every program of the system;
* egress names (:mod:`enforcer.name_closure`): ``exact-name``, or ``name-suffix``
  (``*.svc.example.com``) when more than ``max_name_siblings`` names were seen under a suffix
  that is not at or above a public suffix, with at most ``max_name_labels`` labels in front;
  a destination on port 53 is a resolver and stays one exact address (``dns-resolver``), so
  the resolvers the workload used are explicit entries of the policy.
* file: ``exact``, ``exact:sensitive``, ``directory-children`` (``dir/*``) or ``directory-tree``
  (``dir/**``), per access kind (:mod:`enforcer.file_closure`);
* mcp: tools and prompts ``exact`` by name, resources ``uri-template`` or ``url-pattern``
  (:mod:`enforcer.mcp_closure`; the argument envelopes of allowed tools are derived there too,
  from the profile's argument evidence, after the confidence decision);
* iam: :mod:`enforcer.iamclosure` (resources close per IAM action, never across actions);
* capability: ``literal`` under every closure mode (:data:`CAPABILITY_RULE`): one capability is
  one privilege, and none implies another.

Builders are pure: keys and options in, sorted elements out.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Callable

from sensor import capabilities
from sensor.workload import BehaviourKeyError, is_name_key, parse_net_key

from . import file_closure, http_closure, mcp_closure, name_closure, syscall_groups
from .elements import Element
from .policy import EgressRule

_SYSCALL_RE = re.compile(r"^[a-z_][a-z0-9_]*$")

#: Directories of the system's programs. Exec closure never widens into them by sibling count:
#: ``/usr/bin/*`` admits every program on the machine (a shell among them).
SYSTEM_BIN_DIRS = frozenset({"/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
                             "/usr/games", "/usr/local/games"})
#: Merged-/usr aliases (Debian 12, Fedora, Arch, ...): ``/bin/sh`` and ``/usr/bin/sh`` are one file.
MERGED_USR = {"/bin": "/usr/bin", "/sbin": "/usr/sbin", "/lib": "/usr/lib", "/lib64": "/usr/lib64",
              "/lib32": "/usr/lib32", "/libx32": "/usr/libx32"}


def merged_usr_dir(directory: str) -> str:
    """``directory`` with a merged-/usr alias replaced by its /usr name (pure). Matching resolves
    aliases and symlinks where the filesystem is at hand (:mod:`enforcer.exec_paths`); here the
    table only keeps ``/bin`` from being widened where ``/usr/bin`` would not be."""
    d = posixpath.normpath(directory) if directory else directory
    for alias, real in MERGED_USR.items():
        if d == alias or d.startswith(alias + "/"):
            return real + d[len(alias):]
    return d


def system_bin_dir(directory: str) -> bool:
    return merged_usr_dir(directory) in SYSTEM_BIN_DIRS

#: builder(substrate, sorted keys, derive options, known service networks) -> elements
Builder = Callable[[str, list, object, list], list]


def _addr_text(ip) -> str:
    return ip.compressed


def _aggregate(ip, opts, services: list) -> tuple[object, str]:
    for net in services:
        if net.version == ip.version and ip in net:
            return net, "service-cidr"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        # An IPv4 peer reached through a dual-stack socket (::ffff:a.b.c.d): widen it like IPv4,
        # inside ::ffff:0:0/96, never to a /64 that would span every mapped IPv4 address.
        return ipaddress.ip_network(f"{ip}/{96 + opts.ipv4_prefix}", strict=False), "cidr-prefix"
    prefix = opts.ipv4_prefix if ip.version == 4 else opts.ipv6_prefix
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False), "cidr-prefix"


def _literal_elements(substrate: str, keys: list[str]) -> list[Element]:
    out: list[Element] = []
    if substrate == "syscall":
        for k in keys:
            out.append(_exact_syscall(k, "literal"))
    elif substrate == "exec":
        for k in keys:
            path = k.split(":", 1)[1]
            out.append(Element(k, substrate, "literal", [k], entries=(k,), encodable=_exec_encodable(path)))
    else:
        groups: dict[tuple, list[str]] = {}
        bad: list[str] = []
        for k in keys:
            try:
                n = parse_net_key(k)
            except BehaviourKeyError:
                bad.append(k)
                continue
            host = ipaddress.ip_network(n.addr)
            groups.setdefault((n.proto, host.version, int(host.network_address), host.prefixlen, n.port, host),
                              []).append(k)
        for (proto, _, _, _, port, host), members in sorted(groups.items(), key=lambda kv: kv[0][:5]):
            rule = EgressRule(proto, host.compressed, (port,))
            out.append(Element(rule.id, substrate, "literal", sorted(members), entries=(rule.id,)))
        out += [Element(k, substrate, "literal", [k], encodable=False) for k in bad]
    return out


def _exact_syscall(key: str, rule: str) -> Element:
    name = key.split(":", 1)[1]
    why = syscall_groups.dangerous(name)
    if why:
        return Element(key, "syscall", rule, [key], entries=(key,), flags=("dangerous",),
                       detail=f"dangerous syscall: {why}; never admitted by association, only on "
                              f"its own evidence")
    return Element(key, "syscall", rule, [key], entries=(key,), encodable=bool(_SYSCALL_RE.match(name)))


def _exec_encodable(path: str) -> bool:
    return path.startswith("/") and "*" not in path and not path.endswith("/")


def _structural_elements(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
    out: list[Element] = []
    if substrate == "syscall":
        grouped: dict[str, list[str]] = {}
        for k in keys:
            g = syscall_groups.group_of(k.split(":", 1)[1])
            if g is None:
                out.append(_exact_syscall(k, "exact"))
            else:
                grouped.setdefault(g.name, []).append(k)
        for gname, members in sorted(grouped.items()):
            g = syscall_groups.BY_NAME[gname]
            seen = ", ".join(m.split(":", 1)[1] for m in sorted(members))
            entries = tuple(f"syscall:{n}" for n in g.members)
            out.append(Element(f"syscall-group:{gname}", substrate, f"syscall-group:{gname}", sorted(members),
                               detail=f"seen {seen}; admits {', '.join(g.members)} ({g.reason})",
                               entries=entries, unobserved=frozenset(entries) - set(members)))
    elif substrate == "exec":
        by_dir: dict[str, list[str]] = {}
        for k in keys:
            path = k.split(":", 1)[1]
            if not _exec_encodable(path):
                out.append(Element(k, substrate, "exact", [k], entries=(k,), encodable=False))
                continue
            by_dir.setdefault(posixpath.dirname(path), []).append(k)
        for d, members in sorted(by_dir.items()):
            if len(members) > opts.max_siblings and system_bin_dir(d):
                out += [Element(k, substrate, "exact", [k], entries=(k,),
                                detail=f"{len(members)} sibling paths in system binary directory {d}: "
                                       f"never widened to {d.rstrip('/')}/*")
                        for k in sorted(members)]
            elif len(members) > opts.max_siblings:
                pattern = d.rstrip("/") + "/*"
                out.append(Element(f"exec:{pattern}", substrate, "directory-pattern", sorted(members),
                                   detail=f"{len(members)} sibling paths in {d} (more than {opts.max_siblings})",
                                   flags=("directory-pattern",), entries=(f"exec:{pattern}",)))
            else:
                out += [Element(k, substrate, "exact", [k], entries=(k,)) for k in sorted(members)]
    else:
        nets: dict[tuple, dict[int, list[str]]] = {}
        addrs: dict[tuple, set] = {}
        how: dict[tuple, str] = {}
        netobj: dict[tuple, object] = {}
        bad: list[str] = []
        for k in keys:
            try:
                n = parse_net_key(k)
            except BehaviourKeyError:
                bad.append(k)
                continue
            net, rule = _aggregate(n.addr, opts, services)
            nk = (n.proto, net.version, int(net.network_address), net.prefixlen)
            nets.setdefault(nk, {}).setdefault(n.port, []).append(k)
            addrs.setdefault(nk, set()).add(n.addr)
            how[nk] = rule
            netobj[nk] = net
        for nk in sorted(nets):
            proto, version = nk[0], nk[1]
            net = netobj[nk]
            cidr = net.compressed
            ports = nets[nk]
            seen_addrs = sorted(addrs[nk], key=int)
            shown = ", ".join(_addr_text(a) for a in seen_addrs[:8]) + (
                f" and {len(seen_addrs) - 8} more" if len(seen_addrs) > 8 else "")
            addr_rule = how[nk]
            if addr_rule == "service-cidr":
                addr_detail = f"{shown} inside known service CIDR {cidr}"
            elif version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
                addr_detail = (f"{shown} (IPv4-mapped) aggregated to {cidr} (IPv4 prefix "
                               f"/{opts.ipv4_prefix} inside ::ffff:0:0/96)")
            else:
                p = opts.ipv4_prefix if version == 4 else opts.ipv6_prefix
                addr_detail = f"{shown} aggregated to {cidr} (IPv{version} prefix /{p})"
            if len(ports) > opts.max_ports:
                lo, hi = min(ports), max(ports)
                rule = EgressRule(proto, cidr, (), (lo, hi))
                members = sorted(k for ks in ports.values() for k in ks)
                out.append(Element(rule.id, substrate, f"{addr_rule}+port-range", members,
                                   detail=f"{addr_detail}; {len(ports)} distinct ports (more than "
                                          f"{opts.max_ports}) widened to {lo}-{hi}",
                                   flags=("port-range",), entries=(rule.id,)))
            else:
                for port in sorted(ports):
                    rule = EgressRule(proto, cidr, (port,))
                    out.append(Element(rule.id, substrate, f"{addr_rule}+exact-ports", sorted(ports[port]),
                                       detail=addr_detail, entries=(rule.id,)))
        out += [Element(k, substrate, "exact", [k], encodable=False) for k in bad]
    return out




def _literal(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
    return _literal_elements(substrate, keys)


def _files(mode: str) -> Builder:
    """The file substrate's closure (:mod:`enforcer.file_closure`): kinds never mixed, sensitive
    paths never widened, ``dir/*`` and ``dir/**`` by sibling count."""
    def build(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
        fopts = file_closure.FileClosureOptions(closure=mode, max_siblings=opts.max_siblings,
                                                tree_min_depth=opts.file_tree_depth)
        els, bad = file_closure.elements(keys, fopts)
        return els + [Element(k, substrate, "exact", [k], encodable=False) for k in bad]
    return build


DNS_PORT = 53


def _resolver_elements(keys: list[str]) -> list[Element]:
    """``dns-resolver``: each resolver (a destination on port 53) as one exact address."""
    groups: dict[tuple, list[str]] = {}
    for k in keys:
        n = parse_net_key(k)
        host = ipaddress.ip_network(n.addr)
        groups.setdefault((n.proto, host.version, int(host.network_address), host.compressed),
                          []).append(k)
    out = []
    for (proto, _, _, host), members in sorted(groups.items()):
        rule = EgressRule(proto, host, (DNS_PORT,))
        out.append(Element(rule.id, "egress", "dns-resolver", sorted(members),
                           detail=f"resolver {host.split('/')[0]} on {proto}/{DNS_PORT}: kept as one "
                                  f"exact address, never widened", entries=(rule.id,)))
    return out


def _egress(mode: str) -> Builder:
    """The egress substrate: addresses (CIDR rules), resolvers, and names."""
    def build(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
        names = [k for k in keys if k.startswith("dns:") or is_name_key(k)]
        addresses, resolvers = [], []
        for k in keys:
            if k in names:
                continue
            try:
                resolver = parse_net_key(k).port == DNS_PORT
            except BehaviourKeyError:
                resolver = False
            (resolvers if resolver else addresses).append(k)
        nopts = name_closure.NameOptions(
            max_siblings=getattr(opts, "max_name_siblings", name_closure.DEFAULT_MAX_NAME_SIBLINGS),
            max_labels=getattr(opts, "max_name_labels", name_closure.DEFAULT_MAX_NAME_LABELS),
            max_ports=opts.max_ports)
        if mode == "literal":
            out = _literal_elements(substrate, addresses)
        else:
            out = _structural_elements(substrate, addresses, opts, services)
        return (out + _resolver_elements(resolvers)
                + name_closure.elements(names, nopts, structural=mode != "literal"))
    return build


def _http(mode: str) -> Builder:
    """The http substrate's closure (:mod:`enforcer.http_closure`): path templates, methods and
    hosts never widened."""
    def build(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
        els, bad = http_closure.elements(keys, mode, opts.max_siblings)
        return els + [Element(k, substrate, "exact", [k], encodable=False) for k in bad]
    return build


def _mcp(mode: str) -> Builder:
    """The MCP substrate's key-level closure (:mod:`enforcer.mcp_closure`)."""
    def build(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
        return mcp_closure.elements(mode, keys, opts.max_siblings)
    return build


def iam_account(opts) -> str | None:
    """The account of the identity the IAM statements are derived for: the ``cloud_identity:aws``
    fingerprint that :func:`enforcer.derive.derive` settles before closure."""
    from .iamstatement import IDENTITY_FINGERPRINT, identity_account
    return identity_account((opts.fingerprint or {}).get(IDENTITY_FINGERPRINT))


def _iam_options(mode: str, opts):
    from .iamclosure import ClosureOptions
    return ClosureOptions(structural=mode == "structural", max_siblings=opts.max_siblings)


def _iam(mode: str) -> Builder:
    """The IAM substrate's closure (:mod:`enforcer.iamclosure`) with the action mapper of
    ``opts.iam_actions``. Imported on use: it loads botocore's models, which only IAM needs."""
    def build(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
        from . import iamclosure
        return iamclosure.elements(keys, opts.iam_actions, iam_account(opts), _iam_options(mode, opts))
    return build


#: The capability substrate's closure rule, recorded in the policy for every closure mode.
CAPABILITY_RULE = {"rule": "literal",
                   "structural": "literal: a capability is one privilege and no capability implies another, "
                                 "so there is nothing to widen to"}


def _capabilities(substrate: str, keys: list[str], opts, services: list) -> list[Element]:
    """One element per observed capability (a name the table does not know cannot be encoded)."""
    out = []
    for k in keys:
        try:
            capabilities.parse_key(k)
            ok = True
        except capabilities.CapabilityError:
            ok = False
        out.append(Element(k, substrate, "literal", [k], entries=(k,) if ok else (), encodable=ok))
    return out


#: substrate -> closure mode -> builder. Substrates add themselves here.
BUILDERS: dict[str, dict[str, Builder]] = {
    **{s: {"literal": _literal, "structural": _structural_elements}
       for s in ("syscall", "exec")},
    "egress": {"literal": _egress("literal"), "structural": _egress("structural")},
    "file": {"literal": _files("literal"), "structural": _files("structural")},
    "http": {"literal": _http("literal"), "structural": _http("structural")},
    "mcp": {"literal": _mcp("literal"), "structural": _mcp("structural")},
    "iam": {"literal": _iam("literal"), "structural": _iam("structural")},
    "capability": {"literal": _capabilities, "structural": _capabilities},
}


def derivable() -> tuple[str, ...]:
    """The substrates that have closure builders, in document order."""
    from sensor.workload import SUBSTRATES
    return tuple(s for s in SUBSTRATES if s in BUILDERS)


def elements(substrate: str, closure: str, keys: list[str], opts, services: list) -> list[Element]:
    """The closure decision for one substrate's behaviours."""
    mode = "structural" if closure == "probabilistic" else closure
    return BUILDERS[substrate][mode](substrate, sorted(keys), opts, services)


def _name_rules(closure: str, opts) -> dict:
    if closure == "literal":
        return {"rule": "exact-name"}
    return {"rule": "exact-name+name-suffix",
            "suffixAbove": getattr(opts, "max_name_siblings", name_closure.DEFAULT_MAX_NAME_SIBLINGS),
            "maxLabels": getattr(opts, "max_name_labels", name_closure.DEFAULT_MAX_NAME_LABELS),
            "publicSuffixList": "publicsuffixlist package (ICANN and private sections); never at "
                                "or above a public suffix",
            "ports": {"rule": "exact-ports", "rangeAbove": opts.max_ports}}


def rules(substrate: str, closure: str, opts, services: list) -> dict:
    """How ``closure`` treats ``substrate``, as recorded in the policy's closure decision."""
    if substrate == "mcp":
        return mcp_closure.rules(closure, opts.max_siblings, opts.max_values)
    if substrate == "iam":  # literal IAM closure still fills the caller's account and secret suffixes
        from . import iamclosure
        return iamclosure.rules(_iam_options("literal" if closure == "literal" else "structural", opts),
                                opts.iam_actions)
    if substrate == "capability":
        return dict(CAPABILITY_RULE)
    if closure == "literal":
        if substrate == "egress":
            return {"rule": "literal", "names": _name_rules(closure, opts),
                    "resolvers": {"rule": "dns-resolver"}}
        return {"rule": "literal"}
    if substrate == "syscall":
        return {"rule": "exact+syscall-groups",
                "dangerous": "never admitted by association; allowed only on their own evidence "
                             "(flagged), denied when they recur from review"}
    if substrate == "egress":
        return {
            "address": {"rule": "cidr-prefix", "ipv4Prefix": opts.ipv4_prefix,
                        "ipv6Prefix": opts.ipv6_prefix,
                        "serviceCidrs": [n.compressed for n in services]},
            "ports": {"rule": "exact-ports", "rangeAbove": opts.max_ports},
            "names": _name_rules(closure, opts),
            "resolvers": {"rule": "dns-resolver", "port": DNS_PORT},
        }
    if substrate == "exec":
        return {"rule": "directory-pattern", "siblingsAbove": opts.max_siblings,
                "neverWidened": sorted(SYSTEM_BIN_DIRS),
                "aliases": "merged-/usr aliases (/bin, /sbin, ...) count as their /usr directory"}
    if substrate == "http":
        return http_closure.rules(closure, opts.max_siblings)
    if substrate == "file":
        return {"rule": "directory-children+directory-tree", "siblingsAbove": opts.max_siblings,
                "treeMinDepth": opts.file_tree_depth, "kinds": "never mixed",
                "sensitive": "exact only, never widened"}
    return {"rule": closure}
