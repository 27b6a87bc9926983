"""Seccomp compilation: a policy's allowed syscalls as OCI JSON, an SPO SeccompProfile, or a
libseccomp filter loaded in a child before ``execve``.

The OCI and SPO compilers are pure and deterministic: the same policy, mode and options give
byte-identical output, and nothing here reads the host (the target architecture is a parameter,
not detected). Only :func:`build_filter`, :func:`filter_from_oci` and :func:`load_filter` touch
libseccomp (Debian's ``python3-seccomp``); they import it lazily.

Actions by mode:

* ``enforce``: default ``SCMP_ACT_ERRNO`` returning :data:`DENY_ERRNO` (``EPERM``). EPERM is the
  errno every runtime applies when a profile names none, so the SPO profile, which has no
  ``defaultErrnoRet`` field, denies exactly like the OCI profile. The denial detector watches the
  raw ``sys_exit`` tracepoint for ``-DENY_ERRNO`` on a syscall that never reached ``sys_enter``,
  so the value is exported here and nowhere else.
* ``alert``: default ``SCMP_ACT_LOG``: every syscall outside the policy is allowed and logged.
* ``observe``: default ``SCMP_ACT_ALLOW`` with no rules: the filter changes nothing.

Allowed syscalls carry no argument checks, so the kernel's seccomp action cache (5.11+) answers
them without running the filter. Filters with many rules are built as a binary tree
(``CTL_OPTIMIZE=2``, libseccomp 2.5+).

Deliberate additions, each reported with its rule name in :attr:`CompiledSeccomp.report`:

* ``runtime-completeness:<runtime>``: what the container runtime needs between loading the
  filter and ``execve`` (see :mod:`enforcer.runtime`).
* ``compat-fallback:enosys``: in enforce mode, ``clone3`` is answered with ``ENOSYS`` when the
  policy allows ``clone`` but not ``clone3``. glibc 2.34+ tries ``clone3`` first and falls back to
  ``clone`` only on ENOSYS; EPERM would make every thread creation fail for a workload recorded
  under an older libc. This is a compatibility answer, not a denial the detector reports.
* ``exception:<id>``: a syscall allowed by an active exception (:mod:`enforcer.exceptions`).
* ``baseline:process-end``: ``exit``, ``exit_group``, ``rt_sigreturn`` and ``restart_syscall``,
  always. Denying them grants nothing and breaks in the worst way: a server stopped by a signal in
  every recorded session never called ``exit_group``, and denying it when the process finally
  exits on its own leaves its other threads running (glibc falls back to ``exit``, which ends
  one thread).
* ``review:alert``: a syscall in the policy's review list whose substrate's review action is
  ``alert`` (:meth:`enforcer.policy.Policy.review_admitted`): it runs, and its recurrence is
  reported from the watch list. Dangerous syscalls never get here.
* ``egress-mediated``: when the policy constrains egress, the calls that name a destination
  (``connect``, ``sendto``, ``sendmsg``, ``sendmmsg``) and, for a policy that never created a
  socket, TCP and UDP sockets over IPv4 and IPv6 (``socket`` with its domain, type and protocol
  checked, :data:`INET_SOCKETS`) are left to the egress programs: the cgroup ``connect4/6`` and ``sendmsg4/6`` hooks see the destination before the
  socket carries a byte, deny it unless the policy allows it, and report it. Denying ``socket``
  in seccomp instead would report an attempted connection as a bare ``socket`` denial, without
  the destination it wanted. Sockets of other families (netlink, packet, unix) are not admitted.
* ``runtime-completeness:envelope-exec``: for ``envelope exec``'s filter (target ``exec``),
  ``execve``. With exec entries in the policy (allowed, or let through from review) the
  command's programs exec under the filter, so ``execve`` is allowed. Without any, only the
  launch's own ``execve`` is: the rule checks that its path argument is the address of the
  launch's path buffer, a page mapped at a random address before the filter is built
  (:mod:`enforcer.launch_path`); an ``execve`` from the confined program passes another pointer
  and is denied.

One deliberate restriction, :data:`SOCKET_RULE`: when the policy encodes egress and its
capabilities do not include ``NET_RAW``, ``socket`` is allowed only with argument checks, for
unix and netlink sockets and TCP and UDP over IPv4 and IPv6 (:data:`SOCKET_ALLOWED`). Raw and
packet sockets, ICMP, SCTP, vsock and every other family carry traffic the cgroup sock_addr
hooks never see, so they would walk around egress enforcement. ``bpf/denials.c`` applies the
same table in alert mode (see :func:`socket_allowed`).

No ``SECCOMP_FILTER_FLAG_*`` flags are emitted: runc 1.1 accepts them, but none is needed and
older runtimes reject unknown flags.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import structlog

from .modes import MODES
from .runtime import RuntimeSet, default_runtime, runtime_set

log = structlog.get_logger(__name__)


#: errno returned by a denied syscall in enforce mode (the denial detector watches for it).
DENY_ERRNO = errno.EPERM
#: errno of the compatibility answers in :data:`ENOSYS_FALLBACKS`.
COMPAT_ERRNO = errno.ENOSYS
#: syscall -> the older syscall libc falls back to when it gets ENOSYS.
ENOSYS_FALLBACKS = {"clone3": "clone"}

POLICY_RULE = "policy"
#: ``socket`` restricted to the families, types and protocols egress enforcement sees.
SOCKET_RULE = "egress-completeness:sockets"
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_DGRAM, SOCK_TYPE_MASK = 1, 2, 0xF  # the type's low bits; the rest are flags
IPPROTO_TCP, IPPROTO_UDP = 6, 17
#: (domain, type, protocols): the sockets a restricted ``socket`` allows; ``None`` for any type or
#: protocol. Protocol 0 is the family's default for the type (TCP for stream, UDP for datagram).
SOCKET_ALLOWED = (
    (AF_UNIX, None, None),
    (AF_NETLINK, None, None),
    *((af, SOCK_STREAM, (0, IPPROTO_TCP)) for af in (AF_INET, AF_INET6)),
    *((af, SOCK_DGRAM, (0, IPPROTO_UDP)) for af in (AF_INET, AF_INET6)),
)
SOCKET_REASON = ("raw, packet, ICMP, SCTP and other sockets bypass the egress hooks; "
                 "allowed only when the policy's capabilities include NET_RAW")
#: The TCP and UDP sockets of :data:`SOCKET_ALLOWED`: what a policy that never created a socket
#: gets for the egress programs to judge (``egress-mediated``).
INET_SOCKETS = tuple(e for e in SOCKET_ALLOWED if e[0] in (AF_INET, AF_INET6))
COMPAT_RULE = "compat-fallback:enosys"
#: ``envelope exec`` loads the filter in its child and then execs the command: execve runs
#: under the filter even when the command itself never execs.
EXEC_RULE = "runtime-completeness:envelope-exec"
REVIEW_RULE = "review:alert"
BASELINE_RULE = "baseline:process-end"
#: Allowed in every constrained profile (see the module docstring).
BASELINE = {"exit": "ends a thread", "exit_group": "ends the process (all its threads)",
            "rt_sigreturn": "returns from a signal handler", "restart_syscall": "resumes a call a "
            "signal interrupted"}
EGRESS_MEDIATED_RULE = "egress-mediated"
EGRESS_DESTINATION_CALLS = ("connect", "sendmmsg", "sendmsg", "sendto")
EGRESS_MEDIATED_REASON = ("TCP and UDP sockets over IPv4 and IPv6: every destination is judged and "
                          "reported by the egress programs")
#: Where a compiled profile is loaded (see :func:`profile_for`).
TARGETS = ("workload", "exec")

#: OCI architecture lists per target machine: the native ABI first, then the compat ABIs the
#: kernel can run on it (a process can switch ABI, so each must be named or it falls to the
#: filter's bad-architecture action).
ARCHITECTURES = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}

#: The Security Profiles Operator serves ``SeccompProfile`` as ``v1`` (storage) and ``v1beta1``
#: since v1.0.0; it is cluster scoped since v0.9.0 and ``errnoRet`` is an integer since v0.8.1.
SPO_API_VERSION = "security-profiles-operator.x-k8s.io/v1"
SPO_KIND = "SeccompProfile"

_SYSCALL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_DNS_LABEL = re.compile(r"[^a-z0-9.-]+")


class SeccompCompileError(ValueError):
    """A policy that cannot be compiled to a seccomp profile."""


@dataclass(frozen=True)
class Conditional:
    """One syscall allowed only when its arguments match: ``args`` are OCI argument conditions
    (``{"index", "value", "valueTwo", "op"}``), all of which must hold."""

    syscall: str
    args: tuple[tuple[tuple[str, object], ...], ...]  # each condition as sorted (key, value) pairs
    rule: str
    reason: str

    def oci_args(self) -> list[dict]:
        return [dict(a) for a in self.args]


def condition(index: int, op: str, value: int, value_two: int = 0) -> tuple[tuple[str, object], ...]:
    return tuple(sorted({"index": index, "op": op, "value": value, "valueTwo": value_two}.items()))


@dataclass(frozen=True)
class ReportEntry:
    syscall: str
    action: str  # allow | allow-if | withheld | errno:<n>
    rule: str  # policy | runtime-completeness:runc | exception:<id> | compat-fallback:enosys
    reason: str = ""

    def to_dict(self) -> dict:
        return {"syscall": self.syscall, "action": self.action, "rule": self.rule,
                "reason": self.reason}


@dataclass(frozen=True)
class CompiledSeccomp:
    """An OCI ``linux.seccomp`` object plus a report of where each rule came from."""

    workload: str
    mode: str
    arch: str
    runtime: str | None
    profile: dict
    report: tuple[ReportEntry, ...] = field(default_factory=tuple)
    constrained: bool = True  # False when the policy leaves the syscall substrate out

    def to_json(self) -> str:
        return json.dumps(self.profile, indent=2, sort_keys=True) + "\n"

    def report_dict(self) -> dict:
        return {"workload": self.workload, "mode": self.mode, "arch": self.arch,
                "runtime": self.runtime, "denyErrno": DENY_ERRNO,
                "constrained": self.constrained,
                "rules": [e.to_dict() for e in self.report]}

    def allowed(self) -> tuple[str, ...]:
        """Syscalls the profile allows, conditional ones (``allow-if``) included."""
        return tuple(sorted({e.syscall for e in self.report if e.action in ("allow", "allow-if")}))

    def restricts_sockets(self) -> bool:
        """Whether ``socket`` is allowed only for :data:`SOCKET_ALLOWED`."""
        return any(e.rule == SOCKET_RULE for e in self.report)


def socket_allowed(domain: int, type_: int, protocol: int) -> bool:
    """Whether a restricted ``socket`` filter allows these arguments (pure; the same table as the
    filter's rules and ``bpf/denials.c``)."""
    for af, t, protos in SOCKET_ALLOWED:
        if domain == af and (t is None or type_ & SOCK_TYPE_MASK == t) \
                and (protos is None or protocol in protos):
            return True
    return False


def restricts_sockets(policy, mode: str) -> bool:
    """:data:`SOCKET_RULE` applies: the policy enforces or alerts on egress and does not admit
    ``NET_RAW``."""
    return (mode != "observe" and "egress" in getattr(policy, "substrates", ())
            and "NET_RAW" not in (getattr(policy, "capabilities", ()) or ()))


def _socket_rules(table=SOCKET_ALLOWED, rule: str = SOCKET_RULE) -> list[dict]:
    """OCI rules allowing ``socket`` for ``table`` only (one rule per allowed combination:
    libseccomp ANDs the conditions of a rule and ORs rules)."""
    rules = []
    for af, t, protos in table:
        args = [{"index": 0, "value": af, "op": "SCMP_CMP_EQ"}]
        if t is not None:
            args.append({"index": 1, "value": SOCK_TYPE_MASK, "valueTwo": t,
                         "op": "SCMP_CMP_MASKED_EQ"})
        for proto in protos if protos is not None else (None,):
            cond = list(args)
            if proto is not None:
                cond.append({"index": 2, "value": proto, "op": "SCMP_CMP_EQ"})
            rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": cond,
                          "comment": rule})
    return rules


def policy_syscalls(policy) -> tuple[str, ...]:
    """The policy's allowed syscall names, validated and sorted."""
    names = set()
    for name in policy.syscalls:
        if not isinstance(name, str) or not _SYSCALL_NAME.match(name):
            raise SeccompCompileError(f"policy {policy.workload}: bad syscall name {name!r}")
        names.add(name)
    return tuple(sorted(names))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SeccompCompileError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    return mode


def compile_oci(policy, mode: str | None = None, *, runtime: str | None = None,
                arch: str = "x86_64", extra_allow: Mapping[str, str] | None = None,
                conditional: Iterable[Conditional] = (),
                withhold: Mapping[str, tuple[str, str]] | None = None) -> CompiledSeccomp:
    """Compile ``policy`` to an OCI seccomp profile.

    ``mode`` defaults to the policy's mode. ``runtime`` names a container runtime whose
    completeness set is added (``None``: none). ``extra_allow`` maps syscall names to the rule
    that admits them (``exception:<id>``), for exceptions applied at compile time;
    ``conditional`` adds syscalls allowed only with matching arguments (a name allowed outright
    makes its conditions moot and they are left out). ``withhold`` maps syscall names to (rule,
    reason) for names the policy lists but the target must not allow outright (they may still
    come back as conditional rules); each is reported.
    """
    mode = _check_mode(mode or policy.mode)
    try:
        arches = ARCHITECTURES[arch]
    except KeyError:
        raise SeccompCompileError(
            f"unknown target architecture {arch!r} (one of {', '.join(sorted(ARCHITECTURES))})"
        ) from None
    rset: RuntimeSet | None = None
    if runtime:
        try:
            rset = runtime_set(runtime)
        except ValueError as e:
            raise SeccompCompileError(str(e)) from None

    constrained = "syscall" in getattr(policy, "substrates", ("syscall",))
    if not constrained:
        # A substrate the policy leaves out is not constrained by it: allow everything.
        mode = "observe"
    held = dict(withhold or {})
    extra_allow = dict(extra_allow or {})
    conditional = list(conditional)
    admitted = policy.review_admitted() if hasattr(policy, "review_admitted") else None
    for name in (admitted.syscalls if admitted is not None else ()):
        if name not in held:
            extra_allow.setdefault(name, REVIEW_RULE)
    for name in BASELINE:
        extra_allow.setdefault(name, BASELINE_RULE)
    egress = mode != "observe" and "egress" in getattr(policy, "substrates", ())
    if egress:
        for name in EGRESS_DESTINATION_CALLS:
            extra_allow.setdefault(name, EGRESS_MEDIATED_RULE)
    own = tuple(n for n in policy_syscalls(policy) if n not in held)
    own_set = set(own)
    report: list[ReportEntry] = [ReportEntry(n, "allow", _policy_rule(policy, n)) for n in own]
    extra_groups: list[tuple[str, list[str]]] = []
    added = set(own_set)
    for name, (rule, reason) in sorted(held.items()):
        report.append(ReportEntry(name, "withheld", rule, reason))
    for name, rule in sorted(extra_allow.items()):
        if not _SYSCALL_NAME.match(name):
            raise SeccompCompileError(f"exception: bad syscall name {name!r}")
        if name in added:
            continue
        added.add(name)
        report.append(ReportEntry(name, "allow", rule))
        _group(extra_groups, rule).append(name)
    if rset is not None:
        for name in rset.names():
            if name in added:
                continue
            added.add(name)
            report.append(ReportEntry(name, "allow", rset.rule, rset.syscalls[name]))
            _group(extra_groups, rset.rule).append(name)
    conds = [c for c in conditional if c.syscall not in added]
    for c in sorted({(c.syscall, c.rule, c.reason) for c in conds}):
        report.append(ReportEntry(c[0], "allow-if", c[1], c[2]))
    compat: list[str] = []
    if mode == "enforce":
        for name, older in sorted(ENOSYS_FALLBACKS.items()):
            if name not in added and older in added:
                compat.append(name)
                report.append(ReportEntry(
                    name, f"errno:{COMPAT_ERRNO}", COMPAT_RULE,
                    f"libc falls back to {older} only on ENOSYS"))

    sockets = "socket" in added and restricts_sockets(policy, mode)
    if sockets:
        report = [e for e in report if e.syscall != "socket"]
        report.append(ReportEntry("socket", "allow", SOCKET_RULE, SOCKET_REASON))
        own = tuple(n for n in own if n != "socket")
        extra_groups = [(r, [n for n in names if n != "socket"]) for r, names in extra_groups]
    mediated = egress and "socket" not in added
    if mediated:
        report.append(ReportEntry("socket", "allow-if", EGRESS_MEDIATED_RULE, EGRESS_MEDIATED_REASON))

    profile: dict = {"architectures": list(arches)}
    if mode == "observe":
        profile["defaultAction"] = "SCMP_ACT_ALLOW"
        profile["syscalls"] = []
    else:
        if mode == "enforce":
            profile["defaultAction"] = "SCMP_ACT_ERRNO"
            profile["defaultErrnoRet"] = DENY_ERRNO
        else:
            profile["defaultAction"] = "SCMP_ACT_LOG"
        rules = []
        if own:
            rules.append({"names": list(own), "action": "SCMP_ACT_ALLOW",
                          "comment": f"{POLICY_RULE}:{policy.workload}"})
        for rule, names in extra_groups:
            if names:
                rules.append({"names": sorted(names), "action": "SCMP_ACT_ALLOW", "comment": rule})
        if sockets:
            rules += _socket_rules()
        if mediated:
            rules += _socket_rules(INET_SOCKETS, EGRESS_MEDIATED_RULE)
        for c in sorted(conds, key=lambda c: (c.syscall, c.args)):
            rules.append({"names": [c.syscall], "action": "SCMP_ACT_ALLOW", "args": c.oci_args(),
                          "comment": c.rule})
        if compat:
            rules.append({"names": compat, "action": "SCMP_ACT_ERRNO",
                          "errnoRet": COMPAT_ERRNO, "comment": COMPAT_RULE})
        profile["syscalls"] = rules
    report.sort(key=lambda e: (e.syscall, e.rule))
    return CompiledSeccomp(str(policy.workload), mode, arch, rset.runtime if rset else None,
                           profile, tuple(report), constrained)


def profile_for(policy, mode: str | None = None, *, target: str = "workload",
                runtime: str | None = None, exceptions: Mapping[str, str] | None = None,
                arch: str = "x86_64", launch_pointer: int = 0,
                launched: Iterable[str] = ()) -> CompiledSeccomp:
    """The seccomp profile of ``policy`` for where it is loaded: the one builder that the kubelet
    profile, ``envelope exec``'s filter, ``envelope compile``, the SPO export and the denial
    probe's allowed set all come from, so runtime completeness, exceptions, review items let
    through, egress mediation and modes are handled in one place.

    ``target``:

    * ``"workload"``: what a container runtime loads for the policy's workload (the kubelet's
      Localhost profile, ``compile --format oci-seccomp``): with the completeness set of the
      workload's runtime (:func:`enforcer.runtime.default_runtime`; ``runtime`` overrides it,
      ``"none"`` for none);
    * ``"exec"``: what ``envelope exec`` loads in its child just before ``execve``: no runtime
      set; ``execve`` allowed when the policy has exec entries other than the command being
      launched (``launched``: its path as given and as resolved; a recorded session's first exec
      is the launch itself), otherwise only the launch's own (its path argument must be
      ``launch_pointer``, see :mod:`enforcer.launch_path`; the default 0 admits no real
      ``execve``), rule :data:`EXEC_RULE` either way.

    ``exceptions`` maps syscall names to the rule of the exception that admits them
    (:func:`enforcer.exceptions.syscall_allowances`).
    """
    if target not in TARGETS:
        raise SeccompCompileError(f"unknown seccomp target {target!r} (one of {', '.join(TARGETS)})")
    extra = dict(exceptions or {})
    conditional: list[Conditional] = []
    withhold: dict[str, tuple[str, str]] = {}
    if target == "exec":
        rt = None
        if needs_exec(policy, launched):
            extra.setdefault("execve", EXEC_RULE)
        else:
            # No program may be exec'd: whatever the syscall list says (an execve that passed its
            # threshold while every exec'd path stayed in review, one let through from review),
            # execve and execveat are the exec substrate's, and it allows none.
            why = "the policy allows no program to be exec'd (no exec entries)"
            withhold = {"execve": (EXEC_RULE, why), "execveat": (EXEC_RULE, why)}
            conditional.append(Conditional(
                "execve", (condition(0, "SCMP_CMP_EQ", int(launch_pointer)),), EXEC_RULE,
                "the launch's own execve only: the policy has no exec entries"))
    elif runtime == "none":
        rt = None
    elif runtime is not None:
        rt = runtime
    else:
        rt = default_runtime(policy.workload.kind, policy.workload.namespace)
    return compile_oci(policy, mode, runtime=rt, arch=arch, extra_allow=extra, conditional=conditional,
                       withhold=withhold)


def needs_exec(policy, launched: Iterable[str] = ()) -> bool:
    """Does the command's own code exec under the filter: the policy leaves exec unconstrained,
    or has exec entries (allowed, or let through from review) other than the command being
    launched? The launch's own entry (a path in ``launched``) counts only when its evidence
    shows the program exec'ing itself again (more execs than sessions: git re-running itself,
    a runtime re-exec'ing its interpreter); every recorded session exec'd it once, at the start.
    A ``/dir/*`` pattern, and an entry without evidence, always count."""
    if "exec" not in getattr(policy, "substrates", ("exec",)):
        return True
    admitted = policy.review_admitted() if hasattr(policy, "review_admitted") else None
    entries = list(policy.execs) + (list(admitted.execs) if admitted is not None else [])
    own = set(launched)
    evidence = {p.get("entry"): p.get("evidence") or {} for p in getattr(policy, "provenance", ()) or ()
                if isinstance(p, Mapping)}
    for e in entries:
        if e.endswith("/*") or e not in own:
            return True
        ev = evidence.get(f"exec:{e}")
        if not ev or ev.get("count", 0) > ev.get("sessions", 0):
            return True
    return False


def _group(groups: list[tuple[str, list[str]]], rule: str) -> list[str]:
    for r, names in groups:
        if r == rule:
            return names
    groups.append((rule, []))
    return groups[-1][1]


def _policy_rule(policy, name: str) -> str:
    """``policy:<rule>`` with the closure rule the policy's provenance names for the syscall."""
    entry = f"syscall:{name}"
    for p in getattr(policy, "provenance", ()) or ():
        if isinstance(p, Mapping) and p.get("entry") == entry and p.get("rule"):
            return f"{POLICY_RULE}:{p['rule']}"
    return POLICY_RULE


def k8s_name(*parts: str) -> str:
    """A DNS-1123 subdomain made from ``parts`` (lower case, ``-`` for anything else)."""
    raw = "-".join(p for p in parts if p).lower()
    name = _DNS_LABEL.sub("-", raw).strip("-.")[:253].strip("-.")
    if not name:
        raise SeccompCompileError(f"cannot make a Kubernetes name from {parts!r}")
    return name


def compile_spo(policy, mode: str | None = None, *, runtime: str | None = None,
                arch: str = "x86_64", extra_allow: Mapping[str, str] | None = None) -> dict:
    """The policy as a Security Profiles Operator ``SeccompProfile`` (``v1``, cluster scoped).

    The object has no namespace: SPO's ``SeccompProfile`` is cluster scoped, so its name carries
    the workload's namespace, name and container. ``errnoRet`` is an integer, as the CRD types
    it. The CRD has no ``defaultErrnoRet`` (runtimes then use EPERM, which is
    :data:`DENY_ERRNO`) and no rule comment, so where each rule came from goes in annotations.
    """
    compiled = compile_oci(policy, mode, runtime=runtime, arch=arch, extra_allow=extra_allow)
    oci = compiled.profile
    w = policy.workload
    spec: dict = {"defaultAction": oci["defaultAction"], "architectures": list(oci["architectures"])}
    rules = []
    for r in oci["syscalls"]:
        rule = {"action": r["action"], "names": list(r["names"])}
        if r.get("args"):
            rule["args"] = [dict(a) for a in r["args"]]
        if "errnoRet" in r:
            rule["errnoRet"] = int(r["errnoRet"])
        if r.get("args"):
            rule["args"] = [dict(a) for a in r["args"]]
        rules.append(rule)
    if rules:
        spec["syscalls"] = rules
    added = {}
    for e in compiled.report:
        if e.rule != POLICY_RULE and not e.rule.startswith(POLICY_RULE + ":"):
            added.setdefault(e.rule, []).append(e.syscall)
    annotations = {
        "envelope.dev/workload": str(w),
        "envelope.dev/mode": compiled.mode,
        "envelope.dev/deny-errno": str(DENY_ERRNO),
    }
    for rule, names in sorted(added.items()):
        annotations[f"envelope.dev/{_DNS_LABEL.sub('-', rule.replace(':', '.')).strip('-.')}"] = \
            ",".join(sorted(names))
    return {
        "apiVersion": SPO_API_VERSION,
        "kind": SPO_KIND,
        "metadata": {
            "name": k8s_name(w.namespace, w.name, w.container),
            "labels": {"app.kubernetes.io/managed-by": "envelope"},
            "annotations": annotations,
        },
        "spec": spec,
    }


# ---- libseccomp (in-process filters) ----------------------------------------------------------

_ARCH_ATTR = {
    "SCMP_ARCH_X86_64": "X86_64", "SCMP_ARCH_X86": "X86", "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_AARCH64": "AARCH64", "SCMP_ARCH_ARM": "ARM",
    "SCMP_ARCH_MIPS": "MIPS", "SCMP_ARCH_MIPS64": "MIPS64", "SCMP_ARCH_MIPS64N32": "MIPS64N32",
    "SCMP_ARCH_MIPSEL": "MIPSEL", "SCMP_ARCH_MIPSEL64": "MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32": "MIPSEL64N32", "SCMP_ARCH_PPC": "PPC", "SCMP_ARCH_PPC64": "PPC64",
    "SCMP_ARCH_PPC64LE": "PPC64LE", "SCMP_ARCH_S390": "S390", "SCMP_ARCH_S390X": "S390X",
    "SCMP_ARCH_PARISC": "PARISC", "SCMP_ARCH_PARISC64": "PARISC64", "SCMP_ARCH_RISCV64": "RISCV64",
}
# Go architecture names used by the containers-common profile's ``includes.arches``.
_GO_ARCH = {"amd64": "SCMP_ARCH_X86_64", "x86": "SCMP_ARCH_X86", "x32": "SCMP_ARCH_X32",
            "386": "SCMP_ARCH_X86", "arm64": "SCMP_ARCH_AARCH64", "arm": "SCMP_ARCH_ARM"}
_OPS = {"SCMP_CMP_NE": "NE", "SCMP_CMP_LT": "LT", "SCMP_CMP_LE": "LE", "SCMP_CMP_EQ": "EQ",
        "SCMP_CMP_GE": "GE", "SCMP_CMP_GT": "GT", "SCMP_CMP_MASKED_EQ": "MASKED_EQ"}
#: Capabilities of a default (non-privileged) container, for ``includes.caps`` in the
#: containers-common profile (the set runc and podman grant by default).
DEFAULT_CONTAINER_CAPS = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"})
#: Rules above this many syscalls make libseccomp build a binary tree instead of a list.
OPTIMIZE_THRESHOLD = 16


def _action(sc, action: str, errno_ret: int | None, default_errno: int):
    if action == "SCMP_ACT_ALLOW":
        return sc.ALLOW
    if action == "SCMP_ACT_ERRNO":
        return sc.ERRNO(default_errno if errno_ret is None else int(errno_ret))
    if action == "SCMP_ACT_LOG":
        return sc.LOG
    if action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return sc.KILL
    if action == "SCMP_ACT_KILL_PROCESS":
        return sc.KILL_PROCESS
    if action == "SCMP_ACT_TRAP":
        return sc.TRAP
    if action == "SCMP_ACT_TRACE":
        return sc.TRACE(0 if errno_ret is None else int(errno_ret))
    raise SeccompCompileError(f"seccomp action {action!r} is not supported in-process")


def _rule_applies(rule: Mapping, arches: set[str], caps: frozenset[str],
                  kernel: tuple[int, ...]) -> bool:
    inc = rule.get("includes") or {}
    exc = rule.get("excludes") or {}
    if inc.get("arches") and not {_GO_ARCH.get(a, a) for a in inc["arches"]} & arches:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in re.findall(r"\d+", inc["minKernel"])[:2])
        if kernel < want:
            return False
    if exc.get("arches") and {_GO_ARCH.get(a, a) for a in exc["arches"]} & arches:
        return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return True


def filter_from_oci(profile: Mapping, *, caps: Iterable[str] = DEFAULT_CONTAINER_CAPS,
                    kernel: tuple[int, ...] = (99, 0), skipped: list | None = None):
    """Build a libseccomp ``SyscallFilter`` from an OCI seccomp profile.

    Reads our own profiles and the containers-common format (``archMap``, ``includes`` /
    ``excludes`` by arch, capability and kernel, argument conditions). Names libseccomp does not
    know are skipped, as runc does, and appended to ``skipped`` as ``(name, reason)``; rules with
    the default action are no-ops and are left out.
    """
    import seccomp as sc

    default_errno = int(profile.get("defaultErrnoRet", DENY_ERRNO))
    default = _action(sc, profile["defaultAction"], profile.get("defaultErrnoRet"), DENY_ERRNO)
    f = sc.SyscallFilter(default)
    arch_names = list(profile.get("architectures") or [])
    native = {v: k for k, v in _ARCH_ATTR.items()}
    for m in profile.get("archMap") or []:
        # containers-common lists every machine; take the entry of the native one.
        if _ARCH_ATTR.get(m["architecture"]) and \
                int(getattr(sc.Arch, _ARCH_ATTR[m["architecture"]])) & 0xFFFFFFFF == \
                sc.system_arch() & 0xFFFFFFFF:
            arch_names = [m["architecture"], *m.get("subArchitectures", [])]
    active = set(arch_names) | {_native_arch_name(sc, native)}
    for a in arch_names:
        attr = _ARCH_ATTR.get(a)
        if attr is None:
            raise SeccompCompileError(f"unknown seccomp architecture {a!r}")
        arch = getattr(sc.Arch, attr)
        if not f.exist_arch(arch):
            f.add_arch(arch)
    caps = frozenset(caps)
    rules = 0
    for rule in profile.get("syscalls") or []:
        if not _rule_applies(rule, active, caps, kernel):
            continue
        action = _action(sc, rule["action"], rule.get("errnoRet"), default_errno)
        if action == default:
            continue
        args = [_arg(sc, a) for a in rule.get("args") or []]
        for name in rule["names"]:
            try:
                f.add_rule(action, name, *args)
                rules += 1
            except RuntimeError as e:
                why = "unknown to libseccomp" if "-22" in str(e) else str(e)
                if skipped is not None:
                    skipped.append((name, why))
                log.warning("seccomp.rule_skipped", syscall=name, reason=why)
    if rules > OPTIMIZE_THRESHOLD:
        # binary tree of syscall numbers (libseccomp 2.5+); older ones keep the linear list
        try:
            f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
        except (AttributeError, RuntimeError, ValueError) as e:
            log.warning("seccomp.no_binary_tree", reason=str(e), rules=rules)
    return f


def _native_arch_name(sc, table: Mapping[str, str]) -> str:
    sysarch = sc.system_arch() & 0xFFFFFFFF
    for attr, name in table.items():
        if int(getattr(sc.Arch, attr)) & 0xFFFFFFFF == sysarch:
            return name
    return "SCMP_ARCH_NATIVE"


def _arg(sc, a: Mapping):
    op = _OPS.get(a["op"])
    if op is None:
        raise SeccompCompileError(f"unknown seccomp operator {a['op']!r}")
    return sc.Arg(int(a["index"]), getattr(sc, op), int(a.get("value", 0)), int(a.get("valueTwo", 0)))


def build_filter(compiled: CompiledSeccomp, skipped: list | None = None):
    """A compiled profile (:func:`profile_for`) as a libseccomp ``SyscallFilter``, for loading in a
    child before ``execve``. Syscall names libseccomp does not know are skipped, logged and
    appended to ``skipped``."""
    return filter_from_oci(compiled.profile, skipped=skipped)


def load_filter(f) -> None:
    """Load ``f`` into the calling thread; call it in the child, just before ``execve``.

    libseccomp sets ``no_new_privs`` first (its default), so this works without CAP_SYS_ADMIN.
    """
    f.load()


def preexec(f):
    """A ``preexec_fn`` for :class:`subprocess.Popen` that loads ``f`` in the child."""
    def _load() -> None:
        f.load()
    return _load
