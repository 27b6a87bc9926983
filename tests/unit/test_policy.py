"""The policy model: schema, I/O determinism, and what an allowed set allows."""

from __future__ import annotations

import json

import pytest
import yaml

from enforcer import syscall_groups
from enforcer.policy import (
    API_VERSION, KIND, EgressRule, Policy, PolicyError, dump_policy, load_policy, parse_entry, parse_policy,
    policy_name,
)
from sensor.workload import Workload

W = Workload("research", "Deployment", "agent", "main")


def sample() -> Policy:
    return Policy(
        workload=W, mode="enforce", closure="structural",
        syscalls=("read", "openat", "close"),
        egress=(EgressRule("tcp", "10.0.3.0/24", (443, 80)), EgressRule("udp", "fd00::/64", (), (5000, 5010)),
                EgressRule("udp", "10.96.0.10/32", (53,))),
        execs=("/usr/lib/git-core/*", "/usr/bin/git"),
        watch=("exec:/usr/bin/curl",),
        detection=({"key": "syscall:read", "mean": 4.5, "std": 1.0, "k": 3.0, "sessions": 9},),
        provenance=({"entry": "syscall:read", "rule": "exact", "admitted": "threshold",
                     "evidence": {"count": 9, "sessions": 3}},),
        review=({"key": "exec:/usr/bin/curl", "rule": "exact", "evidence": {"count": 1, "sessions": 1}},),
        validity={"fingerprint": {"model": ["m1"]}, "triggers": [{"name": "model-version-change", "key": "model"}],
                  "derivedAt": "2026-01-15T00:00:00Z", "expiresAt": "2026-02-01T00:00:00Z"},
    )


def test_document_layout_and_kind():
    d = sample().to_dict()
    assert d["apiVersion"] == API_VERSION and d["kind"] == KIND
    assert d["metadata"] == {"name": "agent-main"}
    assert set(d["spec"]) == {"workload", "mode", "decisions", "allow", "detection", "provenance", "review", "watch"}
    assert set(d["spec"]["decisions"]) >= {"granularity", "closure", "confidence", "validity"}
    assert d["spec"]["allow"]["syscalls"] == ["close", "openat", "read"]
    assert d["spec"]["allow"]["execs"] == ["/usr/bin/git", "/usr/lib/git-core/*"]
    assert d["spec"]["allow"]["egress"][0] == {"proto": "tcp", "cidr": "10.0.3.0/24", "ports": [80, 443]}
    assert {"proto": "udp", "cidr": "fd00::/64", "portRange": {"min": 5000, "max": 5010}} in d["spec"]["allow"]["egress"]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_is_byte_identical(fmt):
    text = dump_policy(sample(), fmt)
    again = parse_policy(text)
    assert dump_policy(again, fmt) == text
    assert again.egress == sample().egress and again.syscalls == sample().syscalls
    assert dump_policy(sample(), fmt) == text


def test_json_and_yaml_carry_the_same_document():
    assert yaml.safe_load(dump_policy(sample(), "yaml")) == json.loads(dump_policy(sample(), "json"))


def test_load_policy_from_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(dump_policy(sample()))
    assert load_policy(p).to_dict() == sample().to_dict()


def _broken(path: list, value):
    d = sample().to_dict()
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    (["spec", "allow", "egress", 0, "cidr"], "10.0.0.0/33", "spec.allow.egress[0].cidr: '10.0.0.0/33' is not a CIDR"),
    (["spec", "allow", "egress", 0, "cidr"], "10.0.0.1/24", "spec.allow.egress[0].cidr"),
    (["spec", "allow", "egress", 1, "ports"], [0], "spec.allow.egress[1].ports[0]: 0 is not a port"),
    (["spec", "allow", "egress", 1, "proto"], "icmp", "spec.allow.egress[1].proto: 'icmp'"),
    (["spec", "allow", "egress", 1, "portRange"], {"min": 9, "max": 3}, "spec.allow.egress[1].portRange: min 9"),
    (["spec", "allow", "syscalls", 1], "Open At", "spec.allow.syscalls[1]"),
    (["spec", "allow", "execs", 0], "bin/git", "spec.allow.execs[0]"),
    (["spec", "allow", "execs", 0], "/usr/*/git", "spec.allow.execs[0]"),
    (["spec", "allow", "bogus"], [], "spec.allow.bogus: unknown field"),
    (["spec", "mode"], "block", "spec.mode: 'block' is not one of observe, alert, enforce"),
    (["spec", "workload", "name"], KeyError, "spec.workload.name: missing"),
    (["spec", "decisions", "closure", "mode"], "fuzzy", "spec.decisions.closure.mode: 'fuzzy'"),
    (["spec", "decisions", "granularity", "substrates"], ["syscall", "dns"], "substrates[1]: 'dns'"),
    (["spec", "decisions", "confidence", "minCount"], {"syscall": -1}, "spec.decisions.confidence.minCount.syscall"),
    (["spec", "decisions", "validity", "expiresAt"], "next tuesday", "spec.decisions.validity.expiresAt"),
    (["spec", "detection", 0, "std"], -1, "spec.detection[0].std"),
    (["spec", "watch", 0], "smtp:example.com", "spec.watch[0]"),
    (["spec", "provenance", 0, "rule"], KeyError, "spec.provenance[0].rule: missing"),
    (["spec"], "nope", "spec: expected a mapping"),
    (["apiVersion"], "envelope.dev/v2", "apiVersion: 'envelope.dev/v2' is not supported"),
    (["kind"], "NetworkPolicy", "kind: 'NetworkPolicy' is not LeastPrivilegePolicy"),
])
def test_schema_errors_name_the_field(path, value, message):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(_broken(path, value))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: [unclosed\n")
    with pytest.raises(PolicyError) as e:
        load_policy(bad)
    assert str(bad) in str(e.value) and "not valid YAML" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(PolicyError, match="empty document"):
        load_policy(empty)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_broken(["apiVersion"], "v0")))
    with pytest.raises(PolicyError, match=f"{wrong}: apiVersion"):
        load_policy(wrong)


def test_kubernetes_status_and_metadata_are_tolerated():
    d = sample().to_dict()
    d["metadata"].update(namespace="research", resourceVersion="7", labels={"a": "b"})
    d["status"] = {"phase": "Applied"}
    assert Policy.from_dict(d).metadata_name == "agent-main"


def test_allows_each_substrate():
    p = sample()
    assert p.allows("syscall:read") and not p.allows("syscall:ptrace")
    assert p.allows("exec:/usr/bin/git") and not p.allows("exec:/usr/bin/gitk")
    assert p.allows("exec:/usr/lib/git-core/git-fetch")
    assert not p.allows("exec:/usr/lib/git-core/sub/tool"), "a /dir/* pattern is one level only"
    assert not p.allows("exec:/usr/lib/git-core")
    assert p.allows("connect:tcp:10.0.3.77:443") and p.allows("connect:tcp:10.0.3.1:80")
    assert not p.allows("connect:tcp:10.0.3.77:8080") and not p.allows("connect:tcp:10.0.4.1:443")
    assert not p.allows("connect:udp:10.0.3.77:443"), "protocol is part of the rule"
    assert p.allows("send:udp:[fd00::9]:5005") and not p.allows("send:udp:[fd00::9]:5011")
    assert not p.allows("send:udp:[fd01::9]:5005")
    assert p.allows("send:udp:10.96.0.10:53") and p.allows("connect:udp:10.96.0.10:53")
    assert not p.allows("send:udp:10.96.0.11:53")


def test_left_out_substrate_allows_everything():
    p = Policy(W, substrates=("syscall",), syscalls=("read",))
    assert p.allows("exec:/bin/anything") and p.allows("connect:tcp:1.2.3.4:1")
    assert not p.allows("syscall:write")


def test_egress_rule_validation_and_ids():
    r = EgressRule("tcp", "10.0.3.0/24", (443, 80, 443))
    assert r.ports == (80, 443) and r.id == "egress:tcp:10.0.3.0/24:80,443"
    assert r.matches("tcp", "10.0.3.200", 80) and not r.matches("tcp", "10.0.3.200", 81)
    assert not r.matches("tcp", "::ffff:10.0.3.1", 80)
    v6 = EgressRule("udp", "FD00:0::/64", (), (1, 2))
    assert v6.cidr == "fd00::/64" and v6.id == "egress:udp:fd00::/64:1-2"
    assert v6.matches("udp", "[fd00::1]", 2)
    for args in [("tcp", "10.0.3.1/24", (1,)), ("tcp", "x", (1,)), ("tcp", "10.0.0.0/8", ()),
                 ("tcp", "10.0.0.0/8", (1,), (1, 2)), ("sctp", "10.0.0.0/8", (1,)), ("tcp", "10.0.0.0/8", (70000,))]:
        with pytest.raises(PolicyError):
            EgressRule(*args)
    assert parse_entry("egress:tcp:fd00:ab::/64:8443")[1] == EgressRule("tcp", "fd00:ab::/64", (8443,))
    assert parse_entry("egress:udp:10.0.0.0/8:10-20")[1] == EgressRule("udp", "10.0.0.0/8", (), (10, 20))
    assert parse_entry("exec:/usr/lib/*") == ("exec", "/usr/lib/*")
    with pytest.raises(PolicyError):
        parse_entry("smtp:example.com")


def test_policy_constructor_normalises_and_validates():
    p = Policy(W, syscalls=("write", "read", "write"), execs=("/b", "/a"), watch=("syscall:z", "syscall:a"))
    assert p.syscalls == ("read", "write") and p.execs == ("/a", "/b") and p.watch == ("syscall:a", "syscall:z")
    with pytest.raises(PolicyError, match="spec.mode"):
        Policy(W, mode="deny")
    with pytest.raises(PolicyError, match="closure"):
        Policy(W, closure="fuzzy")
    with pytest.raises(PolicyError, match="substrates"):
        Policy(W, substrates=("syscall", "dns"))


def test_policy_name_is_dns_safe():
    assert policy_name(Workload.host("/system.slice/My Job.service")) == "system.slice-my-job.service-main"
    assert policy_name(Workload("a", "StatefulSet", "db", "pg")) == "statefulset-db-pg"
    long = policy_name(Workload("a", "Deployment", "x" * 100, "main"))
    assert len(long) <= 63 and long == policy_name(Workload("a", "Deployment", "x" * 100, "main"))
    assert long != policy_name(Workload("b", "Deployment", "x" * 100, "main"))


def test_equal_policies_dump_identically_regardless_of_input_order():
    a = sample()
    b = Policy(
        workload=W, mode=a.mode, closure=a.closure, syscalls=tuple(reversed(a.syscalls)),
        egress=tuple(reversed(a.egress)), execs=tuple(reversed(a.execs)), watch=a.watch, detection=a.detection,
        provenance=a.provenance, review=a.review, validity=a.validity)
    assert dump_policy(a) == dump_policy(b)


def test_syscall_groups_are_disjoint_named_and_never_hold_a_dangerous_syscall():
    from sensor import syscalls
    seen = {}
    for g in syscall_groups.GROUPS:
        assert g.reason and len(g.members) >= 2 and list(g.members) == sorted(g.members)
        for m in g.members:
            assert m not in seen, f"{m} in both {seen.get(m)} and {g.name}"
            assert syscall_groups.dangerous(m) is None, f"dangerous {m} in group {g.name}"
            assert syscalls.number(m) is not None, f"{m} is not an x86_64 syscall"
            seen[m] = g.name
    for name, why in syscall_groups.DANGEROUS.items():
        assert why and syscalls.number(name) is not None, name
    assert set(syscall_groups.BY_NAME["file-open"].members) == {"creat", "open", "openat", "openat2"}
    assert {"wait4", "waitid"} == set(syscall_groups.BY_NAME["child-wait"].members)
    for name in ("ptrace", "process_vm_readv", "mount", "unshare", "setns", "bpf", "perf_event_open",
                 "init_module", "kexec_load", "keyctl", "io_uring_setup"):
        assert syscall_groups.dangerous(name), name
