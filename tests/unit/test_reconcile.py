"""Reconciliation of declared policies with observed behaviour, with real documents: the
container default seccomp profile, a NetworkPolicy, a CiliumNetworkPolicy, an Envelope policy,
a landlockconfig ruleset and an IAM policy document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from enforcer.declared import DeclaredError, load_declared, read_declared
from enforcer.policy import EgressRule, Policy, dump_policy
from enforcer.reconcile import reconcile
from envelope.cli import main
from sensor.profile import Profile
from sensor.store import ProfileStore
from sensor.workload import Workload

W = Workload("agents", "Deployment", "research-agent", "agent")
T0 = 1_767_225_600.0
DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")


def profile(keys: dict[str, int]) -> Profile:
    p = Profile(W)
    c = p.node("n1")
    for s in range(3):
        sid = f"s{s}"
        c.open_session(sid, T0 + s * 3600)
        for k, n in keys.items():
            c.observe(sid, k, n, T0 + s * 3600 + 60)
        c.close_session(sid, T0 + s * 3600 + 600)
    return p


PROFILE = profile({"syscall:read": 10, "syscall:kexec_load": 1, "syscall:openat": 4,
                   "connect:tcp:10.0.3.7:443": 2, "connect:tcp:192.0.2.9:5432": 1,
                   "send:udp:10.96.0.10:53": 3, "exec:/usr/bin/git": 1,
                   "file:read:/etc/ssl/certs/ca.pem": 2, "file:read:/root/.aws/credentials": 1})


def by_sub(r, sub):
    return r["substrates"][sub]


def test_the_container_default_profile_is_mostly_unused_and_denies_kexec():
    if not DEFAULT_PROFILE.exists():
        pytest.skip("golang-github-containers-common not installed")
    [d] = load_declared(DEFAULT_PROFILE)
    r = reconcile(PROFILE, [d])
    s = by_sub(r, "syscall")
    assert [x["key"] for x in s["wouldDeny"]] == ["syscall:kexec_load"]  # denied to every container
    assert s["wouldDeny"][0]["count"] == 3 and s["wouldDeny"][0]["sessions"] == 3
    unused = {u["grant"] for u in s["unused"]}
    assert "syscall:read" not in unused and "syscall:openat" not in unused
    assert len(unused) > 250 and "syscall:ptrace" in unused  # granted to every container, never used
    assert r["window"]["hours"] > 2 and all(u["windowHours"] == r["window"]["hours"] for u in s["unused"])


def test_networkpolicy_and_cilium_together():
    netpol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "agent", "namespace": "agents"},
              "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                  {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.9.0/24"]}}],
                   "ports": [{"protocol": "TCP", "port": 443}]},
                  {"to": [{"namespaceSelector": {"matchLabels": {"team": "db"}}}]},
                  {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}}
    cilium = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "dns", "namespace": "agents"},
              "spec": {"endpointSelector": {}, "egress": [
                  {"toCIDR": ["10.96.0.10/32"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}],
                  "egressDeny": [{"toCIDR": ["10.0.3.7/32"]}]}}
    r = reconcile(PROFILE, [read_declared(netpol, "netpol"), read_declared(cilium, "cnp")])
    e = by_sub(r, "egress")
    deny = {x["key"]: x for x in e["wouldDeny"]}
    assert set(deny) == {"connect:tcp:10.0.3.7:443"}  # the explicit egressDeny wins over the allow
    assert deny["connect:tcp:10.0.3.7:443"]["explicitDeny"] == ["egressDeny[0]: 10.0.3.7/32"]
    assert [u["key"] for u in e["undetermined"]] == ["connect:tcp:192.0.2.9:5432"]  # only a selector could
    assert [u["grant"] for u in e["unused"]] == ["egress[2].to[0]: 203.0.113.0/24"]
    assert e["notJudged"][0]["grant"].startswith("egress[1].to[0]:")


def test_an_envelope_policy_a_landlock_ruleset_and_blind_spots():
    policy = Policy(W, mode="enforce", substrates=("syscall", "exec", "file"),
                    syscalls=("read", "openat", "write"), execs=("/usr/bin/*",),
                    files=("file:read:/etc/ssl/certs/*",))
    landlock = {"abi": 5, "ruleset": [{"handledAccessFs": ["execute", "read_file", "write_file"]}],
                "pathBeneath": [{"allowedAccess": ["execute", "read_file"], "parent": ["/usr/bin"]},
                                {"allowedAccess": ["read_file"], "parent": ["/etc/ssl"]}]}
    p = profile({"syscall:read": 1, "exec:/usr/bin/git": 1, "file:read:/etc/ssl/certs/ca.pem": 1,
                 "file:read:/root/.aws/credentials": 1})
    p.node("n1").add_loss("ringbuf_full_exec", 4)
    r = reconcile(p, [read_declared(policy.to_dict(), "policy"), read_declared(landlock, "ll")])
    assert {x["key"] for x in by_sub(r, "file")["wouldDeny"]} == {"file:read:/root/.aws/credentials"}
    assert by_sub(r, "exec")["wouldDeny"] == []
    assert {u["grant"] for u in by_sub(r, "syscall")["unused"]} == {"syscall:openat", "syscall:write"}
    assert {b["kind"] for b in r["blindSpots"]} == {"loss"}


def test_iam_documents_are_judged_by_the_actions_operations_need():
    p = profile({"aws:s3:GetObject arn:aws:s3:::research-corpus-v2/papers/7.pdf": 4,
                 "aws:s3:HeadObject arn:aws:s3:::research-corpus-v2/papers/8.pdf": 1,
                 "aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/x.json": 1})
    doc = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Read", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::research-corpus-*/*"]},
        {"Sid": "Tag", "Effect": "Allow", "Action": ["s3:PutObjectTagging"], "Resource": ["*"]}]}
    r = reconcile(p, [read_declared(doc, "boundary.json")])
    iam = by_sub(r, "iam")
    assert [x["key"] for x in iam["wouldDeny"]] == ["aws:s3:PutObject arn:aws:s3:::research-corpus-v2/out/x.json"]
    # HeadObject needs s3:GetObject: the Read statement covers it
    assert [u["grant"] for u in iam["unused"]] == ["Statement[1] Tag: s3:PutObjectTagging on *"]


def test_cli_exit_status_and_formats(tmp_path, capsys):
    ProfileStore(tmp_path / "state").save(PROFILE)
    pol = tmp_path / "policy.yaml"
    pol.write_text(dump_policy(Policy(W, substrates=("egress",), egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),))))
    args = ["--state-dir", str(tmp_path / "state"), "reconcile", "research-agent", "--declared", str(pol)]
    assert main(args + ["-o", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {x["key"] for x in doc["substrates"]["egress"]["wouldDeny"]} == {
        "connect:tcp:192.0.2.9:5432", "send:udp:10.96.0.10:53"}
    assert main(args) == 1 and "would deny 2" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "Pod"}))
    assert main(args[:-1] + [str(bad)]) == 2
    assert "not a declared policy" in capsys.readouterr().err


def test_malformed_declarations_are_one_line():
    with pytest.raises(DeclaredError, match="malformed networkpolicy"):
        read_declared({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "spec": {"policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]}},
                      "x")
    with pytest.raises(DeclaredError, match="needs a Statement list"):
        read_declared({"Statement": "everything"}, "x")
