"""Seccomp compiler: modes, errno, runtime completeness, provenance, determinism, and that the
OCI output loads into real libseccomp and produces a filter that decides as intended."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import seccomp
from enforcer.policy import Policy, PolicyError, load_policy
from enforcer.runtime import RUNC
from sensor.workload import Workload

sc = pytest.importorskip("seccomp")


@pytest.fixture(autouse=True)
def _structlog_defaults():
    # envelope.cli.main() (called by other test modules) binds structlog to the stderr of the
    # moment, which pytest closes after that test; the warnings logged here must not hit it.
    import structlog

    structlog.reset_defaults()
    yield

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "compiled"
W = Workload("default", "Deployment", "agent", "main")


def policy(syscalls, mode="enforce", **kw) -> Policy:
    """A syscall-only policy; egress mediation is tested on its own below."""
    kw.setdefault("substrates", ("syscall",))
    return Policy(workload=W, mode=mode, syscalls=tuple(syscalls), **kw)


def test_enforce_denies_with_eperm_and_allows_without_args():
    c = seccomp.compile_oci(policy(["read", "write", "exit_group"]))
    p = c.profile
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["defaultErrnoRet"] == errno.EPERM == seccomp.DENY_ERRNO
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    rule, baseline = p["syscalls"]
    assert rule["action"] == "SCMP_ACT_ALLOW"
    assert rule["names"] == ["exit_group", "read", "write"]
    assert "args" not in rule  # no argument checks: the kernel action cache serves them
    # what ends a process or returns from a signal handler is always allowed, and named
    assert baseline == {"names": ["exit", "restart_syscall", "rt_sigreturn"], "action": "SCMP_ACT_ALLOW",
                        "comment": seccomp.BASELINE_RULE}


def test_alert_logs_and_observe_allows():
    a = seccomp.compile_oci(policy(["read"]), "alert").profile
    assert a["defaultAction"] == "SCMP_ACT_LOG" and "defaultErrnoRet" not in a
    assert a["syscalls"][0]["names"] == ["read"]
    o = seccomp.compile_oci(policy(["read"]), "observe").profile
    assert o["defaultAction"] == "SCMP_ACT_ALLOW" and o["syscalls"] == []


def test_mode_defaults_to_policy_mode_and_rejects_unknown():
    assert seccomp.compile_oci(policy(["read"], mode="alert")).mode == "alert"
    with pytest.raises(seccomp.SeccompCompileError):
        seccomp.compile_oci(policy(["read"]), "permissive")


def test_runtime_completeness_added_and_reported():
    c = seccomp.compile_oci(policy(["read", "write", "execve"]), runtime="runc")
    groups = {r["comment"]: r["names"] for r in c.profile["syscalls"]}
    runtime_names = groups["runtime-completeness:runc"]
    # what the policy already allows is not repeated; everything else of the set is added
    assert "execve" not in runtime_names and "write" not in runtime_names
    assert set(runtime_names) == set(RUNC.syscalls) - {"read", "write", "execve"} - set(seccomp.BASELINE)
    by_name = {e.syscall: e for e in c.report}
    assert by_name["capset"].rule == "runtime-completeness:runc"
    assert "capabilit" in by_name["capset"].reason or "caps" in by_name["capset"].reason
    assert by_name["execve"].rule == "policy"
    assert set(c.allowed()) == set(RUNC.syscalls) | {"read", "write", "execve"} | set(seccomp.BASELINE)


def test_no_runtime_set_without_runtime():
    c = seccomp.compile_oci(policy(["read"]))
    assert {e.rule for e in c.report} == {"policy", seccomp.BASELINE_RULE}


def test_unknown_runtime_is_an_error():
    with pytest.raises(seccomp.SeccompCompileError, match="unknown container runtime"):
        seccomp.compile_oci(policy(["read"]), runtime="kata")


def test_clone3_gets_enosys_when_only_clone_allowed():
    c = seccomp.compile_oci(policy(["clone", "read"]))
    compat = [r for r in c.profile["syscalls"] if r["comment"] == seccomp.COMPAT_RULE]
    assert compat == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS,
                       "comment": seccomp.COMPAT_RULE}]
    # not when clone3 is allowed, not in alert mode
    assert not any(r["comment"] == seccomp.COMPAT_RULE
                   for r in seccomp.compile_oci(policy(["clone", "clone3"])).profile["syscalls"])
    assert not any(r["comment"] == seccomp.COMPAT_RULE
                   for r in seccomp.compile_oci(policy(["clone"]), "alert").profile["syscalls"])


def test_provenance_rule_from_policy():
    p = policy(["openat", "read"], provenance=({"entry": "syscall:openat", "rule": "literal"},))
    rules = {e.syscall: e.rule for e in seccomp.compile_oci(p).report}
    assert rules == {"openat": "policy:literal", "read": "policy",
                     **{n: seccomp.BASELINE_RULE for n in seccomp.BASELINE}}


def test_exceptions_are_added_with_their_rule():
    c = seccomp.compile_oci(policy(["read"]), extra_allow={"ptrace": "exception:abc123"})
    assert {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "comment": "exception:abc123"} \
        in c.profile["syscalls"]


def test_unconstrained_substrate_allows_everything():
    p = Policy(workload=W, mode="enforce", substrates=("egress",), syscalls=())
    c = seccomp.compile_oci(p)
    assert c.profile["defaultAction"] == "SCMP_ACT_ALLOW" and not c.constrained


def test_aarch64_architectures():
    assert seccomp.compile_oci(policy(["read"]), arch="aarch64").profile["architectures"] == \
        ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    with pytest.raises(seccomp.SeccompCompileError):
        seccomp.compile_oci(policy(["read"]), arch="sparc")


#: SPO's own CRD (v1.0.0), in the shared schemas beside the repository (../shared/schemas).
SPO_CRD = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "spo-v1.0.0-seccompprofile.crd.yaml"


def spo_crd() -> dict:
    if not SPO_CRD.exists():
        pytest.fail(f"SPO CRD schema not found: {SPO_CRD}")
    return yaml.safe_load(SPO_CRD.read_text())


def list_set_problems(node: dict, value, path: str = "") -> list[str]:
    """What the API server checks beyond JSON Schema for the fields emitted here: items of an
    ``x-kubernetes-list-type: set`` list are unique scalars."""
    out = []
    if isinstance(value, list) and node.get("type") == "array":
        if node.get("x-kubernetes-list-type") == "set" and len(set(map(str, value))) != len(value):
            out.append(f"{path}: duplicate items in a set list")
        for i, v in enumerate(value):
            out += list_set_problems(node.get("items") or {}, v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = (node.get("properties") or {}).get(k)
            if sub is not None:
                out += list_set_problems(sub, v, f"{path}.{k}")
    return out


def validate_spo(doc: dict) -> list[str]:
    """Problems of ``doc`` against every served version of SPO's CRD (empty when valid)."""
    crd = spo_crd()
    problems = []
    assert crd["spec"]["scope"] == "Cluster"
    group = crd["spec"]["group"]
    served = [v for v in crd["spec"]["versions"] if v.get("served")]
    assert {v["name"] for v in served} >= {"v1", "v1beta1"}
    for version in served:
        obj = dict(doc, apiVersion=f"{group}/{version['name']}")
        schema = version["schema"]["openAPIV3Schema"]
        problems += [f"{version['name']}: {e.message}" for e in
                     jsonschema.Draft7Validator(schema).iter_errors(obj)]
        problems += [f"{version['name']}: {p}" for p in list_set_problems(schema, obj)]
    if "namespace" in doc.get("metadata", {}):
        problems.append("a cluster-scoped object has no namespace")
    return problems


def test_spo_profile_is_what_current_spo_serves():
    d = seccomp.compile_spo(policy(["clone", "read"]), runtime="runc")
    assert d["apiVersion"] == "security-profiles-operator.x-k8s.io/v1"
    assert d["kind"] == "SeccompProfile"
    assert d["metadata"] == {
        "name": "default-agent-main",  # cluster scoped: the namespace is part of the name
        "labels": {"app.kubernetes.io/managed-by": "envelope"},
        "annotations": d["metadata"]["annotations"]}
    assert validate_spo(d) == []
    spec = d["spec"]
    assert spec["defaultAction"] == "SCMP_ACT_ERRNO" and "defaultErrnoRet" not in spec
    compat = [r for r in spec["syscalls"] if "errnoRet" in r]
    assert compat and all(r["errnoRet"] == errno.ENOSYS and type(r["errnoRet"]) is int for r in compat)
    ann = d["metadata"]["annotations"]
    assert ann["envelope.dev/runtime-completeness.runc"].split(",") == \
        sorted(set(RUNC.syscalls) - {"read", "clone"} - set(seccomp.BASELINE))


@pytest.mark.parametrize("mode", seccomp.MODES)
def test_spo_profile_validates_in_every_mode(mode):
    assert validate_spo(seccomp.compile_spo(policy(["clone", "read", "openat"]), mode, runtime="runc")) == []


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "golden" / "compiled")
                                         .glob("*.spo.yaml")), ids=lambda p: p.stem)
def test_golden_spo_profiles_validate(path):
    assert validate_spo(yaml.safe_load(path.read_text())) == []


def test_spo_schema_check_is_real():
    d = seccomp.compile_spo(policy(["clone", "read"]), runtime="runc")
    old = json.loads(json.dumps(d))
    old["spec"]["syscalls"][-1]["errnoRet"] = "38"  # the pre-v0.8.1 string form
    assert any("not of type 'integer'" in p for p in validate_spo(old))
    dup = json.loads(json.dumps(d))
    dup["spec"]["syscalls"][0]["names"].append(dup["spec"]["syscalls"][0]["names"][0])
    assert any("duplicate items" in p for p in validate_spo(dup))
    namespaced = json.loads(json.dumps(d))
    namespaced["metadata"]["namespace"] = "default"
    assert "a cluster-scoped object has no namespace" in validate_spo(namespaced)


# ---- libseccomp -------------------------------------------------------------------------------


def pfc(f) -> str:
    with tempfile.TemporaryFile("w+") as t:
        f.export_pfc(t)
        t.seek(0)
        return t.read()


def bpf_len(f) -> int:
    with tempfile.TemporaryFile("w+b") as t:
        f.export_bpf(t)
        t.seek(0)
        return len(t.read())


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.oci.json")), ids=lambda p: p.stem)
def test_golden_oci_loads_in_libseccomp(golden):
    profile = json.loads(golden.read_text())
    skipped = []
    f = seccomp.filter_from_oci(profile, skipped=skipped)
    assert skipped == []
    text = pfc(f)
    assert bpf_len(f) % 8 == 0 and bpf_len(f) > 0
    for rule in profile["syscalls"]:
        for name in rule["names"]:
            assert f"if ($syscall == {sc.resolve_syscall(sc.Arch.X86_64, name)})" in text
    if profile["defaultAction"] == "SCMP_ACT_ERRNO":
        assert f"action ERRNO({profile['defaultErrnoRet']})" in text


def test_build_filter_skips_unknown_names_and_reports():
    skipped = []
    f = seccomp.build_filter(seccomp.profile_for(policy(["read", "write"]), target="exec",
                                                 exceptions={"not_a_syscall": "exception:x"}),
                             skipped=skipped)
    assert skipped == [("not_a_syscall", "unknown to libseccomp")]
    text = pfc(f)
    assert f"$syscall == {sc.resolve_syscall(sc.Arch.X86_64, 'read')}" in text


def test_build_filter_uses_binary_tree_for_many_rules():
    p = load_policy(GOLDEN / "policies" / "research-agent.yaml")
    f = seccomp.build_filter(seccomp.profile_for(p, runtime="runc"))
    assert f.get_attr(sc.Attr.CTL_OPTIMIZE) == 2
    small = seccomp.build_filter(seccomp.compile_oci(policy(["read"])))
    assert small.get_attr(sc.Attr.CTL_OPTIMIZE) == 1


def test_default_container_profile_translates():
    path = Path("/usr/share/containers/seccomp.json")
    if not path.exists():
        pytest.skip("golang-github-containers-common not installed")
    skipped = []
    f = seccomp.filter_from_oci(json.loads(path.read_text()), skipped=skipped)
    text = pfc(f)
    assert "action ERRNO(38)" in text  # its ENOSYS default
    # a capability-gated rule (chroot needs CAP_SYS_CHROOT, which default containers have)
    assert f"$syscall == {sc.resolve_syscall(sc.Arch.X86_64, 'chroot')}" in text


# ---- determinism --------------------------------------------------------------------------------

NAMES = st.lists(st.sampled_from(sorted(RUNC.syscalls) + ["read", "write", "clone", "clone3",
                                                           "ptrace", "mount", "socket"]),
                 max_size=20)


@settings(max_examples=60, deadline=None)
@given(NAMES, st.sampled_from(seccomp.MODES), st.sampled_from([None, "runc"]))
def test_compile_is_deterministic_and_order_free(names, mode, runtime):
    a = seccomp.compile_oci(policy(names), mode, runtime=runtime)
    b = seccomp.compile_oci(policy(list(reversed(names))), mode, runtime=runtime)
    assert a.to_json() == b.to_json()
    assert a.report == b.report
    allowed = set(a.allowed())
    assert set(names) <= allowed
    if runtime:
        assert set(RUNC.syscalls) <= allowed
    # every allowed name appears exactly once across the unconditional rules; only socket has
    # conditional ones (the egress-completeness restriction)
    rules = a.profile["syscalls"]
    listed = [n for r in rules if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args") for n in r["names"]]
    assert len(listed) == len(set(listed))
    conditional = {n for r in rules if r.get("args") for n in r["names"]}
    assert conditional <= {"socket"} and not conditional & set(listed)
    if mode != "observe":
        assert set(listed) | conditional == allowed


# ---- what the target adds: egress mediation, review items, the launch's execve ------------------

def _in_child(flt, steps) -> dict:
    """Load ``flt`` in a forked child (libseccomp sets no_new_privs: no root needed), run
    ``steps`` (name -> callable) and return name -> "ok" or the errno name."""
    import os
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = {}
        try:
            flt.load()
            for name, fn in steps.items():
                try:
                    fn()
                    out[name] = "ok"
                except OSError as e:
                    out[name] = errno.errorcode.get(e.errno, str(e.errno))
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    return json.loads(data)


def _all_but(*denied: str) -> list[str]:
    from sensor import syscalls
    return sorted(n for n in syscalls.NUMBERS if n not in denied)


def test_egress_constrained_policies_leave_tcp_and_udp_sockets_to_the_egress_programs():
    import socket
    p = Policy(workload=W, mode="enforce", syscalls=tuple(_all_but("socket", "connect", "sendto")))
    c = seccomp.compile_oci(p)
    rules = {e.syscall: (e.action, e.rule) for e in c.report}
    assert rules["socket"] == ("allow-if", "egress-mediated")
    assert rules["connect"] == ("allow", "egress-mediated")
    got = _in_child(seccomp.build_filter(c), {
        "tcp4": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
        "udp6": lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC).close(),
        "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close(),
        "unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
        "raw": lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close(),
        "sctp": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132).close(),
    })
    assert got == {"tcp4": "ok", "udp6": "ok", "netlink": "EPERM", "unix": "EPERM", "raw": "EPERM",
                   "sctp": "EPERM"}
    # a policy that leaves egress out gets no socket rules from it
    off = seccomp.compile_oci(policy(["read"]))
    assert not any(e.rule == "egress-mediated" for e in off.report)
    # the SPO export carries the argument checks (an unconditional socket would open netlink)
    spo = seccomp.compile_spo(p)
    socket_rules = [r for r in spo["spec"]["syscalls"] if r["names"] == ["socket"]]
    assert len(socket_rules) == len(seccomp._socket_rules(seccomp.INET_SOCKETS)) and all(r["args"] for r in socket_rules)
    assert validate_spo(spo) == []


def test_review_items_let_through_are_allowed_with_their_rule_and_dangerous_never():
    review = ({"key": "syscall-group:child-wait", "substrate": "syscall", "action": "alert",
               "entries": ["syscall:wait4"]},
              {"key": "syscall:ptrace", "substrate": "syscall", "action": "deny"},
              {"key": "syscall:bpf", "substrate": "syscall", "entries": ["syscall:bpf"]})
    p = policy(["read"], review=review, review_actions={"syscall": "alert"})
    c = seccomp.compile_oci(p)
    rules = {e.syscall: e.rule for e in c.report}
    assert rules["wait4"] == seccomp.REVIEW_RULE
    assert "ptrace" not in rules and "bpf" not in rules  # bpf: dangerous, even if an edit says alert
    assert "waitid" not in rules  # review is literal
    denied = seccomp.compile_oci(policy(["read"], review=review))  # no stated action: deny
    assert "wait4" not in denied.allowed()


def test_exec_filter_admits_only_the_launch_execve_when_the_policy_has_no_exec_entries(tmp_path):
    from enforcer.launch_path import LaunchPath
    p = policy(_all_but("execve", "execveat"), substrates=("syscall", "exec"))
    launch = LaunchPath("/bin/true", ["/bin/true"])
    try:
        c = seccomp.profile_for(p, "enforce", target="exec", launch_pointer=launch.pointer)
        by = {e.syscall: (e.action, e.rule) for e in c.report}
        assert by["execve"] == ("allow-if", seccomp.EXEC_RULE)
        [rule] = [r for r in c.profile["syscalls"] if r["names"] == ["execve"]]
        assert rule["args"] == [{"index": 0, "op": "SCMP_CMP_EQ", "value": launch.pointer, "valueTwo": 0}]
        flt = seccomp.build_filter(c)
        import os
        got = _in_child(flt, {"exec_other": lambda: os.execv("/bin/true", ["/bin/true"])})
        assert got == {"exec_other": "EPERM"}  # an execve of the confined code is denied
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                flt.load()
                launch.execve()  # the launch itself passes: /bin/true exits 0
            finally:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        launch.close()
    # with exec entries the command's programs exec under the filter
    with_execs = policy(["read"], substrates=("syscall", "exec"), execs=("/usr/bin/git",))
    assert {e.syscall: e.action for e in seccomp.profile_for(with_execs, target="exec").report}["execve"] == "allow"
    # an execve the syscall list admits is withheld when no program may be exec'd
    listed = policy(["read", "execve"], substrates=("syscall", "exec"))
    rep = {(e.syscall, e.action) for e in seccomp.profile_for(listed, target="exec").report}
    assert ("execve", "withheld") in rep and ("execve", "allow") not in rep
    # the container runtime execs the entrypoint after loading the filter: runc keeps execve
    assert "execve" in seccomp.profile_for(listed, target="workload", runtime="runc").allowed()


def test_the_launched_command_is_not_an_exec_entry_that_opens_execve():
    # every recorded session exec'd the command itself: that entry alone keeps execve closed
    prov = ({"entry": "exec:/usr/bin/redis-server", "rule": "exact", "evidence": {"count": 6, "sessions": 6}},)
    p = policy(["read"], substrates=("syscall", "exec"), execs=("/usr/bin/redis-server",), provenance=prov)
    launched = ("/usr/bin/redis-check-rdb", "/usr/bin/redis-server")
    rep = {(e.syscall, e.action) for e in seccomp.profile_for(p, target="exec", launched=launched).report}
    assert ("execve", "allow-if") in rep and ("execve", "allow") not in rep
    # another program, or a pattern, is an exec entry of the command's own
    for execs in (("/usr/bin/redis-server", "/usr/bin/id"), ("/usr/bin/*",)):
        q = policy(["read"], substrates=("syscall", "exec"), execs=execs, provenance=prov)
        assert seccomp.needs_exec(q, launched)
    # a program seen exec'ing itself again (git runs git) needs execve
    again = ({"entry": "exec:/usr/bin/git", "rule": "exact", "evidence": {"count": 8, "sessions": 6}},)
    git = policy(["read"], substrates=("syscall", "exec"), execs=("/usr/bin/git",), provenance=again)
    assert seccomp.needs_exec(git, ("/usr/bin/git",))
    # an entry without evidence (written by hand) is taken at its word
    assert seccomp.needs_exec(policy(["read"], substrates=("syscall", "exec"), execs=("/usr/bin/git",)),
                              ("/usr/bin/git",))
# ---- the socket restriction ----------------------------------------------------------------------

def egress_policy(syscalls=("read", "socket", "connect"), **kw):
    return policy(list(syscalls), substrates=("syscall", "egress"), **kw)


def test_socket_is_restricted_while_egress_is_encoded():
    c = seccomp.compile_oci(egress_policy())
    assert c.restricts_sockets()
    [entry] = [e for e in c.report if e.syscall == "socket"]
    assert (entry.action, entry.rule) == ("allow", seccomp.SOCKET_RULE) and "NET_RAW" in entry.reason
    assert "socket" in c.allowed()
    rules = c.profile["syscalls"]
    assert not any("socket" in r["names"] for r in rules if not r.get("args"))
    conditional = [r for r in rules if r.get("args")]
    assert {r["comment"] for r in conditional} == {seccomp.SOCKET_RULE}
    # one rule per allowed (family, type, protocol): unix, netlink, 2 x (tcp: 0, 6) + 2 x (udp: 0, 17)
    assert len(conditional) == 2 + 4 + 4
    # the rules and the pure table agree on every combination that matters
    allowed = set()
    for r in conditional:
        a = {x["index"]: x for x in r["args"]}
        allowed.add((a[0]["value"], a.get(1, {}).get("valueTwo"), a.get(2, {}).get("value")))
    assert (seccomp.AF_INET, seccomp.SOCK_STREAM, 6) in allowed
    for domain, type_, proto in [(2, 3, 1), (17, 3, 768), (10, 2, 58), (2, 1, 132), (40, 1, 0)]:
        assert not seccomp.socket_allowed(domain, type_, proto)
    for domain, type_, proto in [(1, 1, 0), (16, 3, 0), (2, 1 | 0x80000, 0), (10, 2 | 0x800, 17)]:
        assert seccomp.socket_allowed(domain, type_, proto)
    # libseccomp accepts the rules (one comparison per argument per rule)
    text = pfc(seccomp.build_filter(c))
    assert f"$syscall == {sc.resolve_syscall(sc.Arch.X86_64, 'socket')}" in text


def test_socket_is_not_restricted_without_egress_or_in_observe_mode():
    assert not seccomp.compile_oci(policy(["read", "socket"], substrates=("syscall",))).restricts_sockets()
    assert not seccomp.compile_oci(egress_policy(), "observe").restricts_sockets()
    assert seccomp.compile_oci(egress_policy(), "alert").restricts_sockets()
    # an exception admitting socket admits the call, not raw sockets
    c = seccomp.compile_oci(egress_policy(("read",)), extra_allow={"socket": "exception:abc"})
    assert c.restricts_sockets()


def test_spo_export_keeps_the_argument_conditions():
    d = seccomp.compile_spo(egress_policy(), runtime="runc")
    assert validate_spo(d) == []
    conditional = [r for r in d["spec"]["syscalls"] if r.get("args")]
    assert conditional and all(r["names"] == ["socket"] for r in conditional)


# ---- the socket restriction and the policy's capabilities --------------------------------------

AF_INET, AF_PACKET, SOCK_STREAM, SOCK_RAW, SOCK_DGRAM = 2, 17, 1, 3, 2
IPPROTO_ICMP, IPPROTO_SCTP = 1, 132
CHILD_SYSCALLS = ["socket", "close", "write", "exit_group", "exit", "mmap", "munmap", "brk", "futex",
                  "rt_sigprocmask", "rt_sigaction", "mprotect", "getpid", "gettid", "madvise"]


def socket_errnos(compiled: seccomp.CompiledSeccomp, calls: list[tuple[int, int, int]]) -> list[int]:
    """Run ``socket(domain, type, protocol)`` for each of ``calls`` in a forked child under the
    compiled filter, loaded into the real kernel with libseccomp (no_new_privs; no root needed);
    0 for a call that made a socket, else its errno."""
    import ctypes
    import os
    import struct

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: load the filter, make the calls, report, exit without cleanup
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            seccomp.filter_from_oci(compiled.profile).load()
            out = []
            for args in calls:
                fd = libc.socket(*args)
                out.append(0 if fd >= 0 else ctypes.get_errno())
                if fd >= 0:
                    libc.close(fd)
            os.write(w, struct.pack(f"<{len(out)}i", *out))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4 * len(calls))
    os.close(r)
    os.waitpid(pid, 0)
    assert len(data) == 4 * len(calls), "the child under the filter did not report"
    return list(struct.unpack(f"<{len(calls)}i", data))


@pytest.mark.parametrize("mode", ["enforce", "alert"])
def test_sockets_are_restricted_without_net_raw_and_free_with_it(mode):
    calls = [(AF_INET, SOCK_STREAM, 0), (AF_INET, SOCK_STREAM, IPPROTO_SCTP), (AF_PACKET, SOCK_RAW, 0),
             (AF_INET, SOCK_RAW, IPPROTO_ICMP)]
    without = seccomp.compile_oci(policy(CHILD_SYSCALLS, mode, substrates=("syscall", "egress", "capability"),
                                         capabilities=("NET_BIND_SERVICE",)))
    with_raw = seccomp.compile_oci(policy(CHILD_SYSCALLS, mode, substrates=("syscall", "egress", "capability"),
                                          capabilities=("NET_BIND_SERVICE", "NET_RAW")))
    assert without.restricts_sockets() and not with_raw.restricts_sockets()
    assert [e.rule for e in without.report if e.syscall == "socket"] == [seccomp.SOCKET_RULE]
    assert [e.rule.split(":")[0] for e in with_raw.report if e.syscall == "socket"] == [seccomp.POLICY_RULE]
    unrestricted = [r for r in with_raw.profile["syscalls"] if "socket" in r["names"]]
    assert unrestricted and all(not r.get("args") for r in unrestricted)
    if mode == "enforce":
        got = socket_errnos(without, calls)
        assert got[0] == 0  # TCP is what the egress hooks see
        assert got[1:] == [seccomp.DENY_ERRNO] * 3  # SCTP, packet and raw sockets stopped by the filter
        lifted = socket_errnos(with_raw, calls)
        # the kernel decides now: a socket, or its own answer (no SCTP module: EPROTONOSUPPORT),
        # never the filter's EPERM; raw and packet sockets need the capability itself, which
        # only a root test run holds (without it the kernel's EPERM looks like the filter's)
        assert lifted[0] == 0 and lifted[1] != seccomp.DENY_ERRNO
        import os
        if os.geteuid() == 0:
            assert lifted[2:] == [0, 0]


def test_restricts_sockets_reads_net_raw_from_the_policy_document():
    """The document's ``spec.allow.capabilities`` (names without CAP_) is what lifts the socket
    restriction: a policy admitting NET_RAW keeps raw and packet sockets, one without restricts them."""
    doc = Policy(W, mode="enforce", substrates=("syscall", "egress", "capability"), syscalls=("socket",),
                 capabilities=("NET_RAW",)).to_dict()
    assert doc["spec"]["allow"]["capabilities"] == ["NET_RAW"]
    with_raw = Policy.from_dict(doc)
    doc["spec"]["allow"]["capabilities"] = ["NET_BIND_SERVICE"]
    without = Policy.from_dict(doc)
    for mode in ("enforce", "alert"):
        assert not seccomp.restricts_sockets(with_raw, mode)
        assert seccomp.restricts_sockets(without, mode)
    assert not seccomp.restricts_sockets(without, "observe")
    assert not seccomp.socket_allowed(AF_INET, SOCK_RAW, IPPROTO_ICMP)  # what the restricted filter refuses
    assert not seccomp.socket_allowed(AF_PACKET, SOCK_RAW, 0)
    assert seccomp.compile_oci(without).restricts_sockets()
    lifted = seccomp.compile_oci(with_raw)
    assert not lifted.restricts_sockets()
    assert all(not r.get("args") for r in lifted.profile["syscalls"] if "socket" in r["names"])
    # the CAP_ spelling is refused when the document is read, never taken as "no NET_RAW"
    doc["spec"]["allow"]["capabilities"] = ["CAP_NET_RAW"]
    with pytest.raises(PolicyError, match="CAP_NET_RAW"):
        Policy.from_dict(doc)


def test_net_raw_only_lifts_the_restriction_where_egress_is_encoded():
    no_egress = seccomp.compile_oci(policy(["socket"], substrates=("syscall", "capability")))
    assert not no_egress.restricts_sockets()
    assert seccomp.compile_oci(policy(["socket"], substrates=("syscall", "egress"))).restricts_sockets()
    observe = seccomp.compile_oci(policy(["socket"], "observe", substrates=("syscall", "egress")))
    assert not observe.restricts_sockets()
