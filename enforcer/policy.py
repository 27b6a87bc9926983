"""The policy: a versioned, deterministic least-privilege artefact derived from a profile.

Document layout (YAML or JSON; ``spec`` is also the body of the Kubernetes custom resource)::

    apiVersion: envelope.dev/v1alpha1
    kind: LeastPrivilegePolicy
    metadata:
      name: research-agent-main
    spec:
      workload: {namespace, kind, name, container}
      mode: observe | alert | enforce
      decisions:
        granularity: {substrates: [syscall, egress, exec]}
        closure:     {mode: literal | structural | probabilistic, rules: {...}, syscallGroups: [...]}
        confidence:  {minCount: {substrate: N}, minSessions: {substrate: M}, sessionRule, lowConfidence,
                      reviewActions: {substrate: deny | alert}, coverage: {...coverage-stop numbers...}}
        validity:    {fingerprint: {key: [values]}, triggers: [...], derivedAt, expiresAt}
      allow:
        syscalls: [name, ...]                                   # sorted
        egress:   [{proto, cidr, ports: [p, ...]} | {proto, cidr, portRange: {min, max}}, ...]
        execs:    [/exact/path | /directory/*, ...]             # sorted
        files:    [file:KIND:PATTERN, ...]                      # sorted (enforcer.file_patterns)
        names:    [{name, maxLabels?, proto?, ports | portRange}, ...]  # egress by DNS name
        mcp:      {methods, tools, prompts, resources, catalog} # enforcer.mcp_envelope
        iam:      [{action, resource, accessLevel, rule}, ...]  # IAM statements (enforcer.iamstatement)
        http:     [http:METHOD host/path-template, ...]         # sorted (enforcer.http_patterns)
        capabilities: [NET_BIND_SERVICE, ...]                   # sorted (sensor.capabilities names)
      detection:  [{key, mean, std, k, sessions}, ...]          # probabilistic soft rules
      provenance: [{entry, substrate, rule, admitted, evidence, ...}, ...]
      review:     [{key, substrate, rule, evidence, action, entries, ...}, ...]
      watch:      [behaviour key, ...]

Entry identifiers (used by provenance, review, ``explain``, ``diff`` and ``--admit``) are
``syscall:NAME``, ``exec:PATH`` (or ``exec:/dir/*``), ``egress:PROTO:CIDR:PORTS`` where
PORTS is one port (``443``) or an inclusive range (``8000-8100``), ``name:PATTERN``
(resolve only) or ``name:PROTO:PATTERN:PORTS`` for names (:mod:`enforcer.names`),
``file:KIND:PATTERN``, ``http:METHOD host/path`` (path segments may be ``{id}`` or
``*``), ``iam:ACTION RESOURCE`` (``iam:s3:GetObject arn:aws:s3:::research-corpus-*/papers/*``),
``capability:NAME`` (``capability:NET_BIND_SERVICE``, the same as the behaviour key), and the
MCP entries of :mod:`enforcer.mcp_envelope` (``mcp:tools/call:git_log``,
``mcp:tools/call:git_log#repo_path:path-prefix:/srv/repo/**``, ...).

An ``aws:`` behaviour is inside the ``iam`` statements when every IAM grant it needs is allowed by
them (:mod:`enforcer.iamstatement`); judging one needs the IAM action mapper, which whoever judges
binds as ``Policy.iam_actions`` (derivation does; the CLI binds it for ``replay`` and ``diff``).

An exec pattern ``/dir/*`` matches any file directly inside ``/dir`` (one path component, not
recursive). A substrate that the policy does not include is not constrained by it.

Review actions. What happens when a behaviour in review (below the confidence threshold)
recurs is stated per substrate in ``decisions.confidence.reviewActions``:

* ``deny``: the item stays outside the allowed set: the kernel denies it where the substrate is
  enforced, and detection reports the recurrence (it is on the watch list);
* ``alert``: the item's observed behaviours (its ``entries``, literal: no widening) are let
  through by the enforcer and every recurrence is reported (watch list). Only substrates whose
  enforcers can admit an entry take it (:data:`ALERTABLE`). A dangerous syscall
  (:data:`enforcer.syscall_groups.DANGEROUS`) is denied whatever its substrate's action.

A policy that does not state its review actions denies every review item (what policies before
review actions meant). :data:`DEFAULT_REVIEW_ACTIONS` is what derivation chooses.

Loading checks the whole schema; any problem is a :class:`PolicyError` whose one-line message
names the field, e.g. ``spec.allow.egress[2].cidr: '10.0.0.0/33' is not a CIDR``. Dumping is
deterministic: equal policies give byte-identical text.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sensor.safeyaml import YamlError, dump_yaml, load_yaml
from sensor.timestamps import TimeFormatError, iso_time, parse_datetime
from sensor.workload import (
    DEFAULT_SUBSTRATES, SUBSTRATES, BehaviourKeyError, Workload, parse_name_key, parse_net_key,
    substrate_of,
)

from sensor import capabilities as capability_names

from . import file_patterns, http_patterns, iamstatement, syscall_groups
from . import ports as port_set
from .iamstatement import IamStatement, IamStatementError
from .mcp_envelope import EnvelopeError, McpAllow
from .mcp_envelope import parse_entry as parse_mcp_entry
from .names import NameRule, NameRuleError, NameTable, parse_name_entry
from .modes import MODES

API_VERSION = "envelope.dev/v1alpha1"
KIND = "LeastPrivilegePolicy"
CLOSURES = ("literal", "structural", "probabilistic")
PROTOS = ("tcp", "udp")

_SYSCALL_RE = re.compile(r"^[a-z_][a-z0-9_]*$")

REVIEW_ACTIONS = ("deny", "alert")
#: Substrates whose enforcers can let a review item's entries through (seccomp, egress rules,
#: exec entries); the others only deny.
ALERTABLE = ("syscall", "egress", "exec")
#: Derivation's default. A syscall in review is nearly always a rare, ordinary code path (an error
#: path, a reaper that ran once, a first-run cache): denying it fails the program in ways it does
#: not expect (a denied poll spins, a denied wait4 leaves zombies), while what an attacker needs
#: from the syscall surface is on the dangerous list, which stays denied. So syscall review items
#: are let through and reported. A destination or a program seen once or twice is where an attack
#: shows (exfiltration, a spawned shell); denying them fails as an ordinary, handled error
#: (EPERM from connect or exec), and every denial is reported. So egress and exec review items
#: are denied.
DEFAULT_REVIEW_ACTIONS = MappingProxyType(
    {s: ("alert" if s == "syscall" else "deny") for s in SUBSTRATES})
_NAME_RE = re.compile(r"[^a-z0-9.-]+")
_SPEC_FIELDS = ("workload", "mode", "decisions", "allow", "detection", "provenance", "review", "watch")
_ALLOW_FIELDS = ("syscalls", "egress", "execs", "files", "names", "http", "mcp", "iam", "capabilities")
_DECISION_FIELDS = ("granularity", "closure", "confidence", "validity")


class PolicyError(ValueError):
    """A policy that does not match the schema; the message names the offending field."""


class IamJudgeMissing(PolicyError):
    """An ``aws:`` behaviour was judged by a policy with no IAM action mapper bound."""


# ---- egress rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressRule:
    """Allow ``proto`` traffic to ``cidr`` on an exact port set, or on an inclusive range."""

    proto: str
    cidr: str
    ports: tuple[int, ...] = ()
    port_range: tuple[int, int] | None = None
    _net: Any = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise PolicyError(f"proto: {self.proto!r} is not one of {', '.join(PROTOS)}")
        try:
            net = ipaddress.ip_network(self.cidr, strict=True)
        except ValueError:
            raise PolicyError(f"cidr: {self.cidr!r} is not a CIDR") from None
        object.__setattr__(self, "cidr", net.compressed)
        object.__setattr__(self, "_net", net)
        try:
            ports, port_range = port_set.checked(self.ports, self.port_range)
        except port_set.PortsError as e:
            raise PolicyError(str(e)) from None
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "port_range", port_range)

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return self._net

    def matches(self, proto: str, addr, port: int) -> bool:
        if proto != self.proto:
            return False
        if self.port_range is not None:
            if not self.port_range[0] <= port <= self.port_range[1]:
                return False
        elif port not in self.ports:
            return False
        ip = addr if not isinstance(addr, str) else ipaddress.ip_address(addr.strip("[]"))
        return ip.version == self._net.version and ip in self._net

    @property
    def port_text(self) -> str:
        return port_set.text(self.ports, self.port_range)

    @property
    def id(self) -> str:
        """``egress:tcp:10.0.3.0/24:443,8443`` or ``egress:tcp:10.0.3.0/24:8000-8100``."""
        return f"egress:{self.proto}:{self.cidr}:{self.port_text}"

    def sort_key(self) -> tuple:
        return (self.proto, self._net.version, int(self._net.network_address), self._net.prefixlen,
                self.port_range or (0, 0), self.ports)

    def to_dict(self) -> dict:
        return {"proto": self.proto, "cidr": self.cidr, **port_set.fields(self.ports, self.port_range)}

    @classmethod
    def from_dict(cls, d: Any, path: str = "egress") -> "EgressRule":
        _mapping(d, path)
        _known(d, ("proto", "cidr", "ports", "portRange"), path)
        proto = _str(d.get("proto"), f"{path}.proto")
        if proto not in PROTOS:
            raise PolicyError(f"{path}.proto: {proto!r} is not one of {', '.join(PROTOS)}")
        cidr = _str(d.get("cidr"), f"{path}.cidr")
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            raise PolicyError(f"{path}.cidr: {cidr!r} is not a CIDR") from None
        ports: tuple[int, ...] = ()
        port_range = None
        if "ports" in d and d["ports"] is not None:
            ports = tuple(_port(p, f"{path}.ports[{i}]") for i, p in enumerate(_list(d["ports"], f"{path}.ports")))
        if "portRange" in d and d["portRange"] is not None:
            pr = d["portRange"]
            _mapping(pr, f"{path}.portRange")
            _known(pr, ("min", "max"), f"{path}.portRange")
            lo = _port(pr.get("min"), f"{path}.portRange.min")
            hi = _port(pr.get("max"), f"{path}.portRange.max")
            if lo > hi:
                raise PolicyError(f"{path}.portRange: min {lo} is above max {hi}")
            port_range = (lo, hi)
        if ports and port_range:
            raise PolicyError(f"{path}: give either ports or portRange, not both")
        if not ports and not port_range:
            raise PolicyError(f"{path}.ports: missing (give ports or portRange)")
        return cls(proto, cidr, ports, port_range)


def parse_entry(entry: str) -> tuple[str, Any]:
    """Split an entry identifier into its substrate and value (an :class:`EgressRule` for egress)."""
    kind, _, rest = entry.partition(":")
    if kind == "syscall" and rest:
        return "syscall", rest
    if kind == "exec" and rest:
        return "exec", rest
    if kind == "file":
        try:
            file_patterns.parse_entry(entry)
        except file_patterns.FilePatternError as e:
            raise PolicyError(str(e)) from None
        return "file", entry
    if kind == "name":
        try:
            return "egress", parse_name_entry(entry)
        except NameRuleError as e:
            raise PolicyError(str(e)) from None
    if kind == "http":
        try:
            return "http", http_patterns.parse_entry(entry)
        except http_patterns.HttpPatternError as e:
            raise PolicyError(str(e)) from None
    if kind == "mcp":
        try:
            return "mcp", parse_mcp_entry(entry)
        except EnvelopeError as e:
            raise PolicyError(str(e)) from None
    if kind == "iam":
        try:
            return "iam", iamstatement.parse_entry(entry)
        except IamStatementError as e:
            raise PolicyError(str(e)) from None
    if kind == "capability":
        try:
            capability_names.number(rest)
        except capability_names.CapabilityError as e:
            raise PolicyError(f"bad capability entry {entry!r}: {e}") from None
        return "capability", rest
    if kind == "egress":
        try:
            proto, body = rest.split(":", 1)
            cidr, ports = body.rsplit(":", 1)
            if "-" in ports:
                lo, hi = ports.split("-", 1)
                return "egress", EgressRule(proto, cidr, (), (int(lo), int(hi)))
            return "egress", EgressRule(proto, cidr, tuple(int(p) for p in ports.split(",")))
        except (ValueError, PolicyError) as e:
            raise PolicyError(f"bad egress entry {entry!r}: {e}") from None
    raise PolicyError(f"bad entry {entry!r} (want syscall:NAME, exec:PATH, egress:PROTO:CIDR:PORTS, "
                      f"name:PROTO:PATTERN:PORTS, file:KIND:PATTERN, http:METHOD HOST/PATH, iam:ACTION RESOURCE, "
                      f"capability:NAME or an mcp: entry)")


def exec_matches(pattern: str, path: str) -> bool:
    """``/dir/*`` matches a file directly inside ``/dir``; anything else matches exactly."""
    if pattern.endswith("/*"):
        parent = pattern[:-2] or "/"
        return posixpath.dirname(path) == parent and posixpath.basename(path) != ""
    return pattern == path


# ---- the policy -----------------------------------------------------------------------------


@dataclass
class Policy:
    workload: Workload
    mode: str = "alert"
    substrates: tuple[str, ...] = DEFAULT_SUBSTRATES
    closure: str = "structural"
    syscalls: tuple[str, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    execs: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # file:KIND:PATTERN entries (enforcer.file_patterns)
    names: tuple[NameRule, ...] = ()  # egress by DNS name (enforcer.names)
    http: tuple[str, ...] = ()  # http:METHOD host/path entries (enforcer.http_patterns)
    mcp: McpAllow | None = None  # the MCP envelope (enforcer.mcp_envelope)
    iam: tuple[IamStatement, ...] = ()  # IAM statements (enforcer.iamstatement)
    capabilities: tuple[str, ...] = ()  # capability names without CAP_ (sensor.capabilities)
    watch: tuple[str, ...] = ()
    detection: tuple[dict, ...] = ()
    decisions: dict = field(default_factory=dict)
    provenance: tuple[dict, ...] = ()
    review: tuple[dict, ...] = ()
    validity: dict = field(default_factory=dict)
    low_confidence: bool = False
    name: str = ""  # metadata.name; derived from the workload when empty
    review_actions: dict = field(default_factory=dict)  # substrate -> deny | alert (absent: deny)
    # The IAM action mapper (enforcer.iamactions.ActionMapper) that judging aws: behaviours needs;
    # bound by whoever judges, never serialised.
    iam_actions: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"spec.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.closure not in CLOSURES:
            raise PolicyError(f"spec.decisions.closure.mode: {self.closure!r} is not one of {', '.join(CLOSURES)}")
        subs = tuple(s for s in SUBSTRATES if s in set(self.substrates))
        unknown = sorted(set(self.substrates) - set(SUBSTRATES))
        if unknown:
            raise PolicyError(f"spec.decisions.granularity.substrates: unknown substrate {unknown[0]!r}")
        self.substrates = subs
        for i, s in enumerate(self.syscalls):
            if not isinstance(s, str) or not _SYSCALL_RE.match(s):
                raise PolicyError(f"spec.allow.syscalls[{i}]: {s!r} is not a syscall name")
        self.syscalls = tuple(sorted(set(self.syscalls)))
        for i, e in enumerate(self.execs):
            _check_exec(e, f"spec.allow.execs[{i}]")
        self.execs = tuple(sorted(set(self.execs)))
        for i, e in enumerate(self.files):
            _check_file(e, f"spec.allow.files[{i}]")
        self.files = tuple(sorted(set(self.files)))
        self._files_by_kind: dict[str, tuple] = {}
        for e in self.files:
            kind, pattern = file_patterns.parse_entry(e)
            self._files_by_kind[kind] = self._files_by_kind.get(kind, ()) + (pattern,)
        patterns = []
        for i, e in enumerate(self.http):
            patterns.append(_check_http(e, f"spec.allow.http[{i}]"))
        self._http = tuple(sorted(set(patterns)))
        self.http = tuple(p.entry for p in self._http)
        self.egress = tuple(sorted(set(self.egress), key=EgressRule.sort_key))
        self.names = tuple(sorted(set(self.names), key=NameRule.sort_key))
        self._name_table = NameTable(self.names)
        seen: set[str] = set()
        for i, st in enumerate(self.iam):
            if not isinstance(st, IamStatement):
                raise PolicyError(f"spec.allow.iam[{i}]: {st!r} is not an IAM statement")
            if st.id in seen:
                raise PolicyError(f"spec.allow.iam[{i}]: {st.id} is listed twice")
            seen.add(st.id)
        self.iam = tuple(sorted(self.iam, key=IamStatement.sort_key))
        for i, c in enumerate(self.capabilities):
            _check_capability(c, f"spec.allow.capabilities[{i}]")
        self.capabilities = tuple(sorted(set(self.capabilities)))
        self._capability_set = frozenset(self.capabilities)
        self._iam_document = iamstatement.judging_document(self.iam)
        self.watch = tuple(sorted(set(self.watch)))
        self.detection = tuple(self.detection)
        self.provenance = tuple(self.provenance)
        self.review = tuple(self.review)
        self.review_actions = check_review_actions(self.review_actions, "spec.decisions.confidence.reviewActions")
        self._admitted_for: tuple | None = None
        self._admitted: "Policy | None" = None
        self._exec_exact = frozenset(e for e in self.execs if not e.endswith("/*"))
        self._exec_dirs = frozenset((e[:-2] or "/") for e in self.execs if e.endswith("/*"))
        self._syscall_set = frozenset(self.syscalls)

    # ---- queries -------------------------------------------------------------------------

    @property
    def metadata_name(self) -> str:
        return self.name or policy_name(self.workload)

    def entries(self) -> list[str]:
        """Every allowed entry identifier, in document order."""
        return ([f"syscall:{s}" for s in self.syscalls] + [r.id for r in self.egress]
                + [r.id for r in self.names] + [f"exec:{e}" for e in self.execs] + list(self.files)
                + list(self.http) + [st.id for st in self.iam] + (self.mcp.entries() if self.mcp else [])
                + [f"capability:{c}" for c in self.capabilities])

    @property
    def name_table(self) -> NameTable:
        """The allowed names as the egress programs judge them (:class:`enforcer.names.NameTable`)."""
        return self._name_table

    @property
    def iam_identity(self) -> str | None:
        """The role the IAM statements were derived for (validity fingerprint
        ``cloud_identity:aws``), when the policy names exactly one."""
        values = (self.validity.get("fingerprint") or {}).get(iamstatement.IDENTITY_FINGERPRINT) or []
        return values[0] if len(values) == 1 else None

    @property
    def http_patterns(self) -> tuple:
        """The allowed request patterns (:class:`enforcer.http_patterns.HttpPattern`), sorted."""
        return self._http

    def allows(self, key: str) -> bool:
        """Is behaviour ``key`` inside the allowed set? Substrates the policy leaves out, and
        behaviour kinds no substrate encodes, are not constrained by it."""
        try:
            substrate = substrate_of(key)
        except BehaviourKeyError:
            return True
        if substrate not in self.substrates:
            return True
        if substrate == "syscall":
            return key.split(":", 1)[1] in self._syscall_set
        if substrate == "exec":
            path = key.split(":", 1)[1]
            if path in self._exec_exact:
                return True
            return posixpath.dirname(path) in self._exec_dirs and posixpath.basename(path) != ""
        if substrate == "file":
            try:
                kind, path = file_patterns.parse_key(key)
            except file_patterns.FilePatternError:
                return False
            return any(p.matches(path) for p in self._files_by_kind.get(kind, ()))
        if substrate == "http":
            from sensor.httpkeys import HttpKeyError, parse_key
            try:
                b = parse_key(key)
            except HttpKeyError:
                return False
            return any(p.matches(b.method, b.host, b.path) for p in self._http)
        if substrate == "mcp":
            return self.mcp is not None and self.mcp.allows(key)
        if substrate == "capability":
            return key.split(":", 1)[1] in self._capability_set
        if substrate == "iam":
            if self.iam_actions is None:
                raise IamJudgeMissing("judging aws behaviours needs the IAM action database; bind "
                                      "Policy.iam_actions (envelope.wiring.iam_actions)")
            return iamstatement.allows(self._iam_document, self.iam_actions,
                                       iamstatement.identity_account(self.iam_identity), key)
        if substrate != "egress":
            return True  # a substrate with no allow section here yet is not constrained
        if key.startswith("dns:"):
            return self._name_table.allows_resolve(key[4:])
        try:
            net = parse_net_key(key)
        except BehaviourKeyError:
            try:
                n = parse_name_key(key)
            except BehaviourKeyError:
                return False
            return self._name_table.allows_connect(n.name, n.proto, n.port)
        return any(r.matches(net.proto, net.addr, net.port) for r in self.egress)

    def review_action(self, substrate: str) -> str:
        """What happens when a review item of ``substrate`` recurs: ``deny`` or ``alert``."""
        return self.review_actions.get(substrate, "deny")

    def _review_admitted(self) -> "Policy | None":
        entries = sorted({e for item in self.review for e in review_entries(item)
                          if self.review_action(item.get("substrate", "")) == "alert"})
        if not entries:
            return None
        syscalls, egress, execs = [], [], []
        for e in entries:
            sub, value = parse_entry(e)
            if sub == "syscall":
                syscalls.append(value)
            elif sub == "egress":
                egress.append(value)
            elif sub == "exec":
                execs.append(value)
        return Policy(workload=self.workload, substrates=self.substrates, syscalls=tuple(syscalls),
                      egress=tuple(egress), execs=tuple(execs))

    def review_admitted(self) -> "Policy | None":
        """The review items that the enforcers let through (review action ``alert``), as the
        allow section of a policy (literal entries, dangerous syscalls left out); None when none.
        Computed when the review list or the actions change (derivation fills them in last)."""
        sig = (id(self.review), len(self.review), tuple(sorted(self.review_actions.items())))
        if sig != self._admitted_for:
            self._admitted_for, self._admitted = sig, self._review_admitted()
        return self._admitted

    def admits(self, key: str) -> bool:
        """Does enforcement let behaviour ``key`` through: allowed, or a review item whose
        substrate's review action is ``alert`` (it is then reported from the watch list)?"""
        if self.allows(key):
            return True
        a = self.review_admitted()
        try:
            sub = substrate_of(key)
        except BehaviourKeyError:
            return True
        return a is not None and sub in a.substrates and sub in ALERTABLE and a.allows(key)

    def expires_at(self) -> _dt.datetime | None:
        v = self.validity.get("expiresAt")
        return parse_time(v, "spec.decisions.validity.expiresAt") if v else None

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        decisions = {k: v for k, v in _plain(self.decisions).items()}
        gran = dict(decisions.get("granularity") or {})
        gran["substrates"] = list(self.substrates)
        clos = dict(decisions.get("closure") or {})
        clos["mode"] = self.closure
        conf = dict(decisions.get("confidence") or {})
        conf["lowConfidence"] = bool(self.low_confidence)
        conf["reviewActions"] = {s: self.review_action(s) for s in self.substrates}
        decisions.update(granularity=gran, closure=clos, confidence=conf, validity=_plain(self.validity))
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.metadata_name},
            "spec": {
                "workload": self.workload.to_dict(),
                "mode": self.mode,
                "decisions": decisions,
                "allow": self._allow_dict(),
                "detection": [_plain(d) for d in self.detection],
                "provenance": [_plain(p) for p in self.provenance],
                "review": [_plain(r) for r in self.review],
                "watch": list(self.watch),
            },
        }

    def _allow_dict(self) -> dict:
        allow: dict[str, Any] = {
            "syscalls": list(self.syscalls),
            "egress": [r.to_dict() for r in self.egress],
            "execs": list(self.execs),
        }
        if "file" in self.substrates or self.files:
            allow["files"] = list(self.files)
        if self.names:
            allow["names"] = [r.to_dict() for r in self.names]
        if "http" in self.substrates or self.http:
            allow["http"] = list(self.http)
        if "mcp" in self.substrates or self.mcp is not None:
            allow["mcp"] = (self.mcp or McpAllow()).to_dict()
        if "iam" in self.substrates or self.iam:
            allow["iam"] = [st.to_dict() for st in self.iam]
        if "capability" in self.substrates or self.capabilities:
            allow["capabilities"] = list(self.capabilities)
        return allow

    @classmethod
    def from_dict(cls, d: Any) -> "Policy":
        _mapping(d, "document")
        api = d.get("apiVersion")
        if api != API_VERSION:
            raise PolicyError(f"apiVersion: {api!r} is not supported (this build reads {API_VERSION})")
        if d.get("kind") != KIND:
            raise PolicyError(f"kind: {d.get('kind')!r} is not {KIND}")
        _known(d, ("apiVersion", "kind", "metadata", "spec", "status"), "")
        meta = d.get("metadata") or {}
        _mapping(meta, "metadata")
        name = meta.get("name", "")
        if name is not None and not isinstance(name, str):
            raise PolicyError(f"metadata.name: {name!r} is not a string")
        spec = d.get("spec")
        _mapping(spec, "spec")
        _known(spec, _SPEC_FIELDS, "spec")

        w = spec.get("workload")
        _mapping(w, "spec.workload")
        for k in ("namespace", "kind", "name", "container"):
            if not isinstance(w.get(k), str) or not w.get(k):
                raise PolicyError(f"spec.workload.{k}: missing or not a non-empty string")
        workload = Workload.from_dict(w)

        mode = spec.get("mode", "alert")
        if mode not in MODES:
            raise PolicyError(f"spec.mode: {mode!r} is not one of {', '.join(MODES)}")

        dec = spec.get("decisions") or {}
        _mapping(dec, "spec.decisions")
        _known(dec, _DECISION_FIELDS, "spec.decisions")
        gran = dec.get("granularity") or {}
        _mapping(gran, "spec.decisions.granularity")
        subs = _list(gran.get("substrates", list(DEFAULT_SUBSTRATES)), "spec.decisions.granularity.substrates")
        for i, s in enumerate(subs):
            if s not in SUBSTRATES:
                raise PolicyError(f"spec.decisions.granularity.substrates[{i}]: {s!r} is not one of "
                                  f"{', '.join(SUBSTRATES)}")
        clos = dec.get("closure") or {}
        _mapping(clos, "spec.decisions.closure")
        closure = clos.get("mode", "structural")
        if closure not in CLOSURES:
            raise PolicyError(f"spec.decisions.closure.mode: {closure!r} is not one of {', '.join(CLOSURES)}")
        conf = dec.get("confidence") or {}
        _mapping(conf, "spec.decisions.confidence")
        for fld in ("minCount", "minSessions"):
            if fld in conf:
                v = conf[fld]
                _mapping(v, f"spec.decisions.confidence.{fld}")
                for s, n in v.items():
                    if s not in SUBSTRATES:
                        raise PolicyError(f"spec.decisions.confidence.{fld}.{s}: unknown substrate")
                    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                        raise PolicyError(f"spec.decisions.confidence.{fld}.{s}: {n!r} is not a "
                                          f"non-negative integer")
        review_actions = check_review_actions(conf.get("reviewActions") or {},
                                              "spec.decisions.confidence.reviewActions")
        low = conf.get("lowConfidence", False)
        if not isinstance(low, bool):
            raise PolicyError(f"spec.decisions.confidence.lowConfidence: {low!r} is not a boolean")
        validity = _validity(dec.get("validity") or {}, "spec.decisions.validity")

        allow = spec.get("allow") or {}
        _mapping(allow, "spec.allow")
        _known(allow, _ALLOW_FIELDS, "spec.allow")
        syscalls = _list(allow.get("syscalls") or [], "spec.allow.syscalls")
        for i, s in enumerate(syscalls):
            if not isinstance(s, str) or not _SYSCALL_RE.match(s):
                raise PolicyError(f"spec.allow.syscalls[{i}]: {s!r} is not a syscall name")
        egress = tuple(EgressRule.from_dict(r, f"spec.allow.egress[{i}]")
                       for i, r in enumerate(_list(allow.get("egress") or [], "spec.allow.egress")))
        execs = _list(allow.get("execs") or [], "spec.allow.execs")
        for i, e in enumerate(execs):
            _check_exec(e, f"spec.allow.execs[{i}]")
        files = _list(allow.get("files") or [], "spec.allow.files")
        for i, e in enumerate(files):
            _check_file(e, f"spec.allow.files[{i}]")
        names = []
        for i, r in enumerate(_list(allow.get("names") or [], "spec.allow.names")):
            try:
                names.append(NameRule.from_dict(r, f"spec.allow.names[{i}]"))
            except NameRuleError as e:
                raise PolicyError(str(e)) from None
        http = _list(allow.get("http") or [], "spec.allow.http")
        for i, e in enumerate(http):
            _check_http(e, f"spec.allow.http[{i}]")
        mcp = None
        if allow.get("mcp") is not None:
            try:
                mcp = McpAllow.from_dict(allow["mcp"], "spec.allow.mcp")
            except EnvelopeError as e:
                raise PolicyError(str(e)) from None
        caps = _list(allow.get("capabilities") or [], "spec.allow.capabilities")
        for i, c in enumerate(caps):
            _check_capability(c, f"spec.allow.capabilities[{i}]")
        iam = []
        for i, st in enumerate(_list(allow.get("iam") or [], "spec.allow.iam")):
            try:
                iam.append(IamStatement.from_dict(st, f"spec.allow.iam[{i}]"))
            except IamStatementError as e:
                raise PolicyError(str(e)) from None

        detection = _list(spec.get("detection") or [], "spec.detection")
        for i, r in enumerate(detection):
            p = f"spec.detection[{i}]"
            _mapping(r, p)
            _str(r.get("key"), f"{p}.key")
            for k in ("mean", "std", "k"):
                v = r.get(k)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise PolicyError(f"{p}.{k}: {v!r} is not a non-negative number")
            s = r.get("sessions")
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise PolicyError(f"{p}.sessions: {s!r} is not a non-negative integer")
        provenance = _list(spec.get("provenance") or [], "spec.provenance")
        for i, r in enumerate(provenance):
            _mapping(r, f"spec.provenance[{i}]")
            _str(r.get("entry"), f"spec.provenance[{i}].entry")
            _str(r.get("rule"), f"spec.provenance[{i}].rule")
        review = _list(spec.get("review") or [], "spec.review")
        for i, r in enumerate(review):
            _mapping(r, f"spec.review[{i}]")
            _str(r.get("key"), f"spec.review[{i}].key")
            if r.get("action") is not None and r["action"] not in REVIEW_ACTIONS:
                raise PolicyError(f"spec.review[{i}].action: {r['action']!r} is not one of "
                                  f"{', '.join(REVIEW_ACTIONS)}")
            for j, e in enumerate(_list(r.get("entries") or [], f"spec.review[{i}].entries")):
                try:
                    parse_entry(_str(e, f"spec.review[{i}].entries[{j}]"))
                except PolicyError as err:
                    raise PolicyError(f"spec.review[{i}].entries[{j}]: {err}") from None
        watch = _list(spec.get("watch") or [], "spec.watch")
        for i, k in enumerate(watch):
            _str(k, f"spec.watch[{i}]")
            try:
                substrate_of(k)
            except BehaviourKeyError:
                raise PolicyError(f"spec.watch[{i}]: {k!r} is not a behaviour key") from None

        return cls(
            workload=workload, mode=mode, substrates=tuple(subs), closure=closure,
            syscalls=tuple(syscalls), egress=egress, execs=tuple(execs), files=tuple(files),
            names=tuple(names), http=tuple(http), mcp=mcp, iam=tuple(iam), capabilities=tuple(caps),
            watch=tuple(watch),
            detection=tuple(dict(r) for r in detection), decisions=_plain(dec),
            provenance=tuple(_plain(r) for r in provenance), review=tuple(_plain(r) for r in review),
            validity=validity, low_confidence=low, name=name or "", review_actions=review_actions,
        )


def check_review_actions(actions: Any, path: str) -> dict:
    """Validated review actions (substrate -> deny | alert); alert only where :data:`ALERTABLE`."""
    _mapping(actions, path)
    out = {}
    for sub, action in actions.items():
        if sub not in SUBSTRATES:
            raise PolicyError(f"{path}.{sub}: unknown substrate (want one of {', '.join(SUBSTRATES)})")
        if action not in REVIEW_ACTIONS:
            raise PolicyError(f"{path}.{sub}: {action!r} is not one of {', '.join(REVIEW_ACTIONS)}")
        if action == "alert" and sub not in ALERTABLE:
            raise PolicyError(f"{path}.{sub}: alert is not supported for {sub} (its enforcer cannot "
                              f"let a review item through; alert works for {', '.join(ALERTABLE)})")
        out[sub] = action
    return dict(sorted(out.items()))


def review_entries(item: dict) -> list[str]:
    """The literal entries a review item's behaviours are let through as, when its substrate's
    review action is ``alert``: dangerous syscalls never (they are denied whatever the action)."""
    if item.get("action") == "deny":
        return []
    out = []
    for e in item.get("entries") or ():
        if not isinstance(e, str):
            continue
        if e.startswith("syscall:") and syscall_groups.dangerous(e.split(":", 1)[1]):
            continue
        out.append(e)
    return out


def policy_name(workload: Workload) -> str:
    """A DNS-1123 name for the policy of ``workload`` (at most 63 characters)."""
    raw = f"{workload.name}-{workload.container}"
    if workload.kind not in ("Deployment", "Unit"):
        raw = f"{workload.kind}-{raw}"
    name = _NAME_RE.sub("-", raw.lower()).strip("-.") or "workload"
    if len(name) > 63:
        digest = hashlib.sha256(workload.key.encode()).hexdigest()[:8]
        name = name[:54].rstrip("-.") + "-" + digest
    return name


# ---- files ----------------------------------------------------------------------------------


def dump_policy(policy: Policy, fmt: str = "yaml") -> str:
    """Deterministic text: equal policies give byte-identical output."""
    data = policy.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return dump_yaml(data, default_flow_style=False, allow_unicode=True, width=4096)
    raise PolicyError(f"unknown policy format {fmt!r} (want yaml or json)")


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse YAML or JSON text; :class:`PolicyError` names ``source`` and the field."""
    try:
        data = load_yaml(text, source)
    except YamlError as e:
        raise PolicyError(str(e)) from None
    if data is None:
        raise PolicyError(f"{source}: empty document")
    try:
        return Policy.from_dict(data)
    except PolicyError as e:
        raise PolicyError(f"{source}: {e}") from None


def load_policy(path) -> Policy:
    """Load a policy file (YAML or JSON). Every problem is one :class:`PolicyError` line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{p}: not a text file") from None
    return parse_policy(text, str(p))


# ---- times ----------------------------------------------------------------------------------


def parse_time(v: Any, path: str) -> _dt.datetime:
    """A time field of a policy document (an aware datetime); a bad one is a PolicyError."""
    try:
        return parse_datetime(v, path)
    except TimeFormatError as e:
        raise PolicyError(str(e)) from None


# ---- schema helpers -------------------------------------------------------------------------


def _mapping(v: Any, path: str) -> None:
    if not isinstance(v, dict):
        what = "missing" if v is None else f"a {type(v).__name__}"
        raise PolicyError(f"{path}: expected a mapping, got {what}")


def _list(v: Any, path: str) -> list:
    if not isinstance(v, list):
        raise PolicyError(f"{path}: expected a list, got a {type(v).__name__}")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise PolicyError(f"{path}: missing or not a non-empty string")
    return v


def _port(v: Any, path: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise PolicyError(f"{path}: {v!r} is not a port (1-65535)")
    return v


def _known(d: dict, fields: tuple[str, ...], path: str) -> None:
    for k in d:
        if k not in fields:
            where = f"{path}.{k}" if path else str(k)
            raise PolicyError(f"{where}: unknown field (expected one of {', '.join(fields)})")


def _check_file(e: Any, path: str) -> None:
    if not isinstance(e, str):
        raise PolicyError(f"{path}: {e!r} is not a file entry")
    try:
        file_patterns.parse_entry(e)
    except file_patterns.FilePatternError as err:
        raise PolicyError(f"{path}: {err}") from None


def _check_capability(c: Any, path: str) -> None:
    try:
        capability_names.number(c)
    except capability_names.CapabilityError as err:
        raise PolicyError(f"{path}: {err}") from None


def _check_http(e: Any, path: str):
    if not isinstance(e, str):
        raise PolicyError(f"{path}: {e!r} is not an http entry")
    try:
        return http_patterns.parse_entry(e)
    except http_patterns.HttpPatternError as err:
        raise PolicyError(f"{path}: {err}") from None


def _check_exec(e: Any, path: str) -> None:
    if not isinstance(e, str) or not e.startswith("/"):
        raise PolicyError(f"{path}: {e!r} is not an absolute path or /directory/* pattern")
    if "*" in e[:-1] or (e.endswith("*") and not e.endswith("/*")):
        raise PolicyError(f"{path}: {e!r}: '*' is only allowed as a whole last component (/dir/*)")


def _validity(v: Any, path: str) -> dict:
    _mapping(v, path)
    out = _plain(v)
    fp = out.get("fingerprint", {}) or {}
    _mapping(fp, f"{path}.fingerprint")
    for k, vals in fp.items():
        if isinstance(vals, str):
            fp[k] = [vals]
        elif not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
            raise PolicyError(f"{path}.fingerprint.{k}: expected a string or a list of strings")
    if fp:
        out["fingerprint"] = fp
    trig = out.get("triggers", []) or []
    for i, t in enumerate(_list(trig, f"{path}.triggers")):
        _mapping(t, f"{path}.triggers[{i}]")
        _str(t.get("name"), f"{path}.triggers[{i}].name")
    for k in ("derivedAt", "expiresAt"):
        if out.get(k) is not None:
            out[k] = iso_time(parse_time(out[k], f"{path}.{k}").timestamp())
    return out


def _plain(v: Any) -> Any:
    """A deep copy made of dict/list/str/int/float/bool/None, with timestamps as ISO strings."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, _dt.datetime):
        return iso_time((v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp())
    return v


def policy_hash(policy: Policy) -> bytes:
    """sha256 of the policy's canonical JSON: the identity recorded in pinned maps and audits."""
    return hashlib.sha256(dump_policy(policy, "json").encode()).digest()
