"""Workload identity and behaviour keys.

A workload is ``(namespace, kind, name, container)``. Inside Kubernetes the kind is usually
``Deployment``; outside it is ``("host", "Unit", <name>, "main")``.

A behaviour is one dimension value, written as a key whose first field names it:
``syscall:openat``, ``exec:/usr/bin/git``, ``connect:tcp:10.0.3.7:443``,
``send:udp:[fd00::a]:53``, ``dns:api.example.com`` (a name the workload resolved),
``connect:tcp:api.example.com:443`` (a connect to an address this cgroup received in a DNS
answer for that name), ``file:read:/etc/ssl/certs/ca.pem``,
``http:GET api.example.com/v1/docs/8812``, ``mcp:tools/call:git_log``,
``aws:s3:GetObject arn:aws:s3:::bucket/key``, ``capability:NET_BIND_SERVICE`` (a granted
capability check, :mod:`sensor.capabilities`). The substrate that can enforce a behaviour follows
from its kind.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

#: Every substrate, in document order.
SUBSTRATES = ("syscall", "egress", "exec", "file", "http", "mcp", "iam", "capability")
#: What ``derive`` encodes unless told otherwise: the substrates every node observes and
#: enforces in the kernel without further setup (capability checks cost one tracepoint with
#: in-kernel counting, see ``bpf/capabilities.c``).
DEFAULT_SUBSTRATES = ("syscall", "egress", "exec", "capability")
#: Substrates whose sessions say whether they were observed (session meta ``observed``): an
#: empty capability list drops every capability, so evidence of no checks must come from a
#: session the capability probe watched, not from a kernel that has no such probe.
MARKED_SUBSTRATES = ("capability",)

_SUBSTRATE_OF_KIND = {
    "syscall": "syscall",
    "exec": "exec",
    "connect": "egress",
    "send": "egress",
    "dns": "egress",
    "file": "file",
    "http": "http",
    "mcp": "mcp",
    "aws": "iam",
    "capability": "capability",
}


class BehaviourKeyError(ValueError):
    """A behaviour key that does not parse."""


def substrate_of(key: str) -> str:
    """The enforcement substrate of a behaviour key (one of :data:`SUBSTRATES`)."""
    kind = key.split(":", 1)[0]
    try:
        return _SUBSTRATE_OF_KIND[kind]
    except KeyError:
        raise BehaviourKeyError(f"unknown behaviour kind {kind!r} in {key!r}") from None


def syscall_key(name: str) -> str:
    return f"syscall:{name}"


def exec_key(path: str) -> str:
    return f"exec:{path}"


def file_key(kind: str, path: str) -> str:
    """``file:read:/etc/ssl/certs/ca.pem``; ``kind`` is one of enforcer.file_patterns.KINDS."""
    return f"file:{kind}:{path}"


def net_key(kind: str, proto: str, addr: str, port: int) -> str:
    """``connect:tcp:10.0.0.1:443`` or ``send:udp:[::1]:53``; IPv6 addresses are bracketed."""
    ip = ipaddress.ip_address(addr)
    host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{kind}:{proto}:{host}:{port}"


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def valid_name(name: str) -> bool:
    """A host name as the DNS programs match it: at least two lower-case labels of letters,
    digits, ``-`` and ``_``, dotted, no trailing dot, at most 253 characters. (A resolver
    expands a short name through its search list before asking, so questions have a dot.)"""
    return (len(name) <= 253 and "." in name and bool(_NAME_RE.match(name))
            and not _is_address(name))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def dns_key(name: str) -> str:
    """``dns:api.example.com`` (lower case, no trailing dot)."""
    return f"dns:{name.rstrip('.').lower()}"


def name_key(kind: str, proto: str, name: str, port: int) -> str:
    """``connect:tcp:api.example.com:443``: a connect or send attributed to a resolved name."""
    return f"{kind}:{proto}:{name}:{port}"


@dataclass(frozen=True)
class NameBehaviour:
    kind: str  # connect | send
    proto: str  # tcp | udp
    name: str
    port: int


def parse_name_key(key: str) -> NameBehaviour:
    """Parse ``connect:tcp:api.example.com:443``; an address key is not a name key."""
    try:
        kind, proto, rest = key.split(":", 2)
        name, port = rest.rsplit(":", 1)
        parsed = NameBehaviour(kind, proto, name, int(port))
    except ValueError as e:
        raise BehaviourKeyError(f"bad name behaviour key {key!r}: {e}") from None
    if kind not in ("connect", "send") or proto not in ("tcp", "udp") or not valid_name(name) \
            or not 0 <= parsed.port < 65536:
        raise BehaviourKeyError(f"bad name behaviour key {key!r}")
    return parsed


def is_name_key(key: str) -> bool:
    try:
        parse_name_key(key)
        return True
    except BehaviourKeyError:
        return False


@dataclass(frozen=True)
class NetBehaviour:
    kind: str  # connect | send
    proto: str  # tcp | udp
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def parse_net_key(key: str) -> NetBehaviour:
    """Parse ``connect:tcp:10.0.0.1:443`` / ``send:udp:[::1]:53``."""
    try:
        kind, proto, rest = key.split(":", 2)
        host, port = rest.rsplit(":", 1)
        host = host[1:-1] if host.startswith("[") else host
        parsed = NetBehaviour(kind, proto, ipaddress.ip_address(host), int(port))
    except ValueError as e:
        raise BehaviourKeyError(f"bad network behaviour key {key!r}: {e}") from None
    if kind not in ("connect", "send") or proto not in ("tcp", "udp"):
        raise BehaviourKeyError(f"bad network behaviour key {key!r}")
    return parsed


@dataclass(frozen=True, order=True)
class Workload:
    namespace: str
    kind: str
    name: str
    container: str

    @classmethod
    def host(cls, name: str) -> "Workload":
        return cls("host", "Unit", name, "main")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}/{self.container}"

    @classmethod
    def parse(cls, key: str) -> "Workload":
        """``namespace/kind/name/container``. Namespaces, kinds and container names never hold
        a "/", but a host unit's name may (a cgroup path such as ``/user.slice/x``): everything
        between the kind and the last "/" is the name."""
        parts = key.split("/") if isinstance(key, str) else []
        if len(parts) < 4:
            raise ValueError(f"workload key must be namespace/kind/name/container, got {key!r}")
        namespace, kind, container = parts[0], parts[1], parts[-1]
        name = "/".join(parts[2:-1])
        if not (namespace and kind and container and name.strip("/") or name == "/"):
            raise ValueError(f"workload key must be namespace/kind/name/container, got {key!r}")
        return cls(namespace, kind, name, container)

    def to_dict(self) -> dict:
        return {
            "namespace": self.namespace,
            "kind": self.kind,
            "name": self.name,
            "container": self.container,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(str(d["namespace"]), str(d["kind"]), str(d["name"]), str(d["container"]))

    def __str__(self) -> str:
        return self.key
