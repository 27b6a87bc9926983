"""Expiring exceptions: a behaviour allowed for one workload until a deadline.

All exceptions live in one file, ``<state-dir>/enforce/exceptions.json``, which the enforcer
reads; adding one rewrites it atomically under the state lock, so it takes effect as soon as the
enforcer next reads the file (the egress side re-syncs its maps when the file changes or when
:func:`next_expiry` passes). An exception lapses on its own: whether it is active is decided
against the clock at read time (``now``), never by a cleanup job. Lapsed entries stay in the file
for ``exception list`` until they are :data:`KEEP_EXPIRED` seconds old.

Keys. ``--allow`` takes a behaviour key (``syscall:ptrace``, ``exec:/usr/bin/curl``,
``connect:tcp:10.0.0.1:443``, ``send:udp:[fd00::1]:53``, ``mcp:tools/call:git_commit``,
``http:GET api.example.com/v1/x``), a policy egress entry (``egress:tcp:10.0.0.0/24:443`` or
``egress:tcp:10.0.0.0/24:8000-8100``), an MCP argument path (``mcp:tools/call:git_log#repo_path``:
any value there), or an http entry (``http:GET api.example.com/v1/docs/{id}``). An ``mcp:``
exception reaches running MCP gateways at their next message (:mod:`enforcer.mcp_controls`); an
``http:`` one reaches running cgroups through the request capture's rule graph.

A seccomp filter cannot be widened once loaded, so a syscall exception applies to processes and
containers started after it is added; egress exceptions reach running cgroups through the maps.

Every add and revoke is audited; the file is written first and put back if the audit fails.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sensor.state_dir import StateDir, atomic_write
from sensor.timestamps import TimeFormatError, iso_time, parse_duration
from sensor.workload import (
    BehaviourKeyError, Workload, parse_name_key, parse_net_key, substrate_of, valid_name,
)

from . import audit
from .state import StateError, _check_reason, locked

MAX_TTL = 30 * 86400.0  # longer than this is a policy change, not an exception
KEEP_EXPIRED = 7 * 86400.0
_SYSCALL = re.compile(r"^[a-z_][a-z0-9_]*$")


class ExceptionError(StateError):
    """Bad exception input."""


@dataclass(frozen=True)
class PolicyException:
    id: str
    workload: str
    allow: str
    created: float
    expires: float
    reason: str
    actor: str

    def active(self, now: float) -> bool:
        return self.created <= now < self.expires

    @property
    def substrate(self) -> str:
        return "egress" if self.allow.startswith(("egress:", "name:")) else substrate_of(self.allow)

    def allows(self, key: str) -> bool:
        """Does this exception cover behaviour ``key``?"""
        if key == self.allow:
            return True
        if self.allow.startswith("name:"):
            from .names import NameTable
            from .policy import parse_entry
            table = NameTable([parse_entry(self.allow)[1]])
            if key.startswith("dns:"):
                return table.allows_resolve(key[4:])
            try:
                n = parse_name_key(key)
            except BehaviourKeyError:
                return False
            return table.allows_connect(n.name, n.proto, n.port)
        if self.allow.startswith("egress:") and substrate_of(key) == "egress":
            from .policy import parse_entry

            rule = parse_entry(self.allow)[1]
            try:
                net = parse_net_key(key)
            except BehaviourKeyError:
                return False
            return rule.matches(net.proto, net.addr, net.port)
        if self.allow.startswith("http:") and key.startswith("http:"):
            from .http_patterns import HttpPatternError, parse_entry as http_entry
            from sensor.httpkeys import HttpKeyError, parse_key
            try:
                b = parse_key(key)
                return http_entry(self.allow).matches(b.method, b.host, b.path)
            except (HttpKeyError, HttpPatternError):
                return False
        if self.allow.startswith(("connect:", "send:")) and key.startswith(("connect:", "send:")):
            # connect and send to the same proto/address/port are one egress permission
            try:
                a, b = parse_net_key(self.allow), parse_net_key(key)
            except BehaviourKeyError:
                try:
                    a, b = parse_name_key(self.allow), parse_name_key(key)
                except BehaviourKeyError:
                    return False
                return (a.proto, a.name, a.port) == (b.proto, b.name, b.port)
            return (a.proto, a.addr, a.port) == (b.proto, b.addr, b.port)
        return False

    def to_dict(self) -> dict:
        return asdict(self)


def parse_ttl(text: str) -> float:
    """A ``--ttl`` in the one duration grammar (:func:`sensor.timestamps.parse_duration`), at most
    :data:`MAX_TTL`."""
    try:
        secs = parse_duration(text, "--ttl")
    except TimeFormatError as e:
        raise ExceptionError(str(e)) from None
    if secs > MAX_TTL:
        raise ExceptionError(f"--ttl {text!r}: longer than {int(MAX_TTL // 86400)}d; "
                             f"change the policy instead")
    return secs


def normalise_key(key: str) -> str:
    """Check an ``--allow`` key and return its canonical form."""
    key = (key or "").strip()
    if key.startswith(("egress:", "name:")):
        from .policy import PolicyError, parse_entry

        try:
            return parse_entry(key)[1].id
        except PolicyError as e:
            raise ExceptionError(f"--allow {key!r}: {e}") from None
    if key.startswith("http:"):
        from .http_patterns import HttpPatternError, parse_entry as http_entry
        from sensor.httpkeys import HttpKeyError, parse_key

        try:
            b = parse_key(key)  # a behaviour key (its status, if any, is evidence: dropped)
            return http_entry(f"http:{b.request}").entry
        except (HttpKeyError, HttpPatternError) as e:
            raise ExceptionError(f"--allow {key!r}: {e}") from None
    try:
        substrate = substrate_of(key)
    except BehaviourKeyError:
        raise ExceptionError(f"--allow {key!r}: not a behaviour key (syscall:NAME, exec:/PATH, "
                             f"connect:tcp:ADDR:PORT, send:udp:ADDR:PORT, connect:tcp:NAME:PORT, dns:NAME, "
                             f"egress:PROTO:CIDR:PORTS, name:PROTO:NAME:PORTS, capability:NAME or mcp:tools/call:NAME)") from None
    kind, _, rest = key.partition(":")
    if substrate == "mcp":
        return _mcp_key(key)
    if substrate == "syscall":
        if not _SYSCALL.match(rest):
            raise ExceptionError(f"--allow {key!r}: {rest!r} is not a syscall name")
        return key
    if substrate == "exec":
        if not rest.startswith("/"):
            raise ExceptionError(f"--allow {key!r}: exec path must be absolute")
        return key
    if kind == "dns":
        if not valid_name(rest):
            raise ExceptionError(f"--allow {key!r}: {rest!r} is not a lower-case host name")
        return key
    if substrate == "capability":
        from sensor import capabilities

        try:
            capabilities.number(rest)
        except capabilities.CapabilityError as e:
            raise ExceptionError(f"--allow {key!r}: {e}") from None
        return key
    try:
        net = parse_net_key(key)
    except BehaviourKeyError as e:
        try:
            n = parse_name_key(key)
        except BehaviourKeyError:
            raise ExceptionError(f"--allow {key!r}: {e}") from None
        if not 0 < n.port < 65536:
            raise ExceptionError(f"--allow {key!r}: port {n.port} out of range")
        return key
    if not 0 < net.port < 65536:
        raise ExceptionError(f"--allow {key!r}: port {net.port} out of range")
    host = f"[{net.addr.compressed}]" if isinstance(net.addr, ipaddress.IPv6Address) else net.addr.compressed
    return f"{net.kind}:{net.proto}:{host}:{net.port}"


def _mcp_key(key: str) -> str:
    """``mcp:tools/list``, ``mcp:tools/call:NAME``, ``mcp:prompts/get:NAME``,
    ``mcp:resources/read:URI``, or a call's argument path ``mcp:tools/call:NAME#PATH``."""
    from sensor.mcp_evidence import split_key

    base, sep, path = key.partition("#")
    try:
        method, _ = split_key(base)
    except ValueError as e:
        raise ExceptionError(f"--allow {key!r}: {e} (want mcp:tools/call:NAME, mcp:prompts/get:NAME, "
                             f"mcp:resources/read:URI, mcp:tools/list or mcp:tools/call:NAME#ARGUMENT)") from None
    if sep:
        if method not in ("tools/call", "prompts/get"):
            raise ExceptionError(f"--allow {key!r}: only tools/call and prompts/get have argument paths")
        if not path or ":" in path:
            raise ExceptionError(f"--allow {key!r}: give an argument path after '#' (e.g. #repo_path), "
                                 f"not an envelope element")
    return key


def file_path(state_dir) -> Path:
    return StateDir(state_dir).exceptions


def load_all(state_dir) -> list[PolicyException]:
    """Every stored exception, active or lapsed, oldest first."""
    p = file_path(state_dir)
    try:
        # widens what is enforced: read only when nobody but root could have written it
        data = json.loads(StateDir(state_dir).read(p))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ExceptionError(f"{p}: unreadable exceptions file ({e})") from e
    if not isinstance(data, dict):
        raise ExceptionError(f"{p}: not an exceptions file")
    try:
        out = [PolicyException(**{k: d[k] for k in PolicyException.__dataclass_fields__})
               for d in data.get("exceptions", [])]
    except (KeyError, TypeError, AttributeError) as e:
        raise ExceptionError(f"{p}: malformed exception entry ({e})") from e
    return sorted(out, key=lambda e: (e.created, e.id))


def _save(state_dir, items: list[PolicyException]) -> None:
    body = {"exceptions": [e.to_dict() for e in sorted(items, key=lambda e: (e.created, e.id))]}
    atomic_write(file_path(state_dir), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def active_exceptions(state_dir, workload: Workload | str | None, now: float | None = None
                      ) -> list[PolicyException]:
    """Exceptions in force at ``now`` for ``workload`` (all workloads when ``None``)."""
    now = time.time() if now is None else now
    key = workload.key if isinstance(workload, Workload) else workload
    return [e for e in load_all(state_dir)
            if e.active(now) and (key is None or e.workload == key)]


def next_expiry(state_dir, workload: Workload | str | None = None, now: float | None = None
                ) -> float | None:
    """When the next active exception lapses (the time to re-sync enforcement), or ``None``."""
    times = [e.expires for e in active_exceptions(state_dir, workload, now)]
    return min(times) if times else None


def allowed_keys(state_dir, workload: Workload | str, now: float | None = None) -> dict[str, str]:
    """``{key: "exception:<id>"}`` for the workload's active exceptions (for the compilers)."""
    return {e.allow: f"exception:{e.id}" for e in active_exceptions(state_dir, workload, now)}


def syscall_allowances(state_dir, workload: Workload | str, now: float | None = None
                       ) -> dict[str, str]:
    """``{syscall name: "exception:<id>"}``: the ``extra_allow`` for the seccomp compilers."""
    return {k.split(":", 1)[1]: r for k, r in allowed_keys(state_dir, workload, now).items()
            if k.startswith("syscall:")}


def capability_allowances(state_dir, workload: Workload | str, now: float | None = None) -> tuple[str, ...]:
    """Capability names of the workload's active exceptions (``exceptions`` of
    :func:`enforcer.capabilities.exec_capability_sets`); a running process cannot regain a dropped
    capability, so they reach processes started after the exception."""
    return tuple(sorted(k.split(":", 1)[1] for k in allowed_keys(state_dir, workload, now)
                        if k.startswith("capability:")))


def add(state_dir, workload: Workload, allow: str, ttl: str | float, *, reason: str,
        actor: str | None = None, now: float | None = None) -> PolicyException:
    """Add an exception (audited as ``exception.add``); it is in force from ``now``."""
    allow = normalise_key(allow)
    secs = parse_ttl(ttl) if isinstance(ttl, str) else float(ttl)
    if not 0 < secs <= MAX_TTL:
        raise ExceptionError(f"ttl {secs}s out of range (0, {MAX_TTL:.0f}]")
    reason = _check_reason(reason)
    now = time.time() if now is None else now
    actor = actor or audit.default_actor()
    ident = hashlib.sha256(f"{workload.key}\0{allow}\0{now!r}".encode()).hexdigest()[:12]
    exc = PolicyException(ident, workload.key, allow, now, now + secs, reason, actor)
    with locked(state_dir):
        old = load_all(state_dir)
        kept = [e for e in old if e.expires > now - KEEP_EXPIRED]
        _save(state_dir, kept + [exc])
        try:
            audit.append(state_dir, "exception.add", workload=workload.key, reason=reason,
                         details={"id": ident, "allow": allow, "ttl_seconds": secs,
                                  "expires": iso_time(exc.expires, precise=True)},
                         actor=actor, now=now)
        except BaseException:
            _save(state_dir, old)
            raise
    return exc


def revoke(state_dir, ident: str, *, reason: str, actor: str | None = None,
           now: float | None = None) -> PolicyException:
    """End an exception now (audited as ``exception.revoke``)."""
    reason = _check_reason(reason)
    now = time.time() if now is None else now
    actor = actor or audit.default_actor()
    with locked(state_dir):
        old = load_all(state_dir)
        match = [e for e in old if e.id == ident]
        if not match:
            raise ExceptionError(f"no exception with id {ident!r} (see 'envelope exception list')")
        target = match[0]
        if not target.active(now):
            raise ExceptionError(f"exception {ident} is not active")
        ended = PolicyException(target.id, target.workload, target.allow, target.created, now,
                                target.reason, target.actor)
        _save(state_dir, [ended if e.id == ident else e for e in old])
        try:
            audit.append(state_dir, "exception.revoke", workload=target.workload, reason=reason,
                         details={"id": ident, "allow": target.allow}, actor=actor, now=now)
        except BaseException:
            _save(state_dir, old)
            raise
    return ended
