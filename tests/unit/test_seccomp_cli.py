"""``envelope compile``: options, the provenance report, and that a bad policy writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enforcer import exceptions, state
from enforcer.runtime import RUNC
from envelope.cli import main
from sensor.workload import Workload

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "compiled"
AGENT = GOLDEN / "policies" / "research-agent.yaml"


pytestmark = pytest.mark.usefixtures("structlog_warnings_to_stderr")


def compile_(tmp_path, *args) -> int:
    return main(["--state-dir", str(tmp_path / "state"), "compile", *args])


def test_report_names_runtime_completeness(tmp_path, capsys):
    out, rep = tmp_path / "p.json", tmp_path / "r.json"
    assert compile_(tmp_path, str(AGENT), "--format", "oci-seccomp", "--out", str(out),
                    "--report", str(rep)) == 0
    err = capsys.readouterr().err
    assert "runtime-completeness:runc" in err and "compat-fallback:enosys" in err
    report = json.loads(rep.read_text())
    assert report["runtime"] == "runc" and report["denyErrno"] == 1
    added = {r["syscall"] for r in report["rules"] if r["rule"] == "runtime-completeness:runc"}
    assert added and added <= set(RUNC.syscalls)
    assert all(r["reason"] for r in report["rules"] if r["rule"] == "runtime-completeness:runc")
    profile = json.loads(out.read_text())
    assert {n for r in profile["syscalls"] if r["comment"] == "runtime-completeness:runc"
            for n in r["names"]} == added


def test_runtime_none_and_mode_override(tmp_path, capsys):
    assert compile_(tmp_path, str(AGENT), "--format", "oci-seccomp", "--runtime", "none",
                    "--mode", "alert") == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["defaultAction"] == "SCMP_ACT_LOG"
    # no runtime set: the policy's own rule, plus the socket calls left to the egress programs
    assert sorted({r["comment"] for r in profile["syscalls"]}) == [
        "baseline:process-end", "egress-completeness:sockets", "egress-mediated",
        "policy:agents/Deployment/research-agent/main"]


def test_host_unit_gets_no_runtime_set_by_default(tmp_path, capsys):
    p = tmp_path / "host.yaml"
    p.write_text(AGENT.read_text().replace(
        "{namespace: agents, kind: Deployment, name: research-agent, container: main}",
        "{namespace: host, kind: Unit, name: backup, container: main}"))
    assert compile_(tmp_path, str(p), "--format", "oci-seccomp") == 0
    profile = json.loads(capsys.readouterr().out)
    assert not any(r["comment"].startswith("runtime-completeness") for r in profile["syscalls"])
    assert compile_(tmp_path, str(p), "--format", "networkpolicy") == 2
    assert "host unit" in capsys.readouterr().err


@pytest.mark.parametrize("mutate,msg", [
    (lambda t: t.replace("mode: enforce", "mode: strict"), "spec.mode"),
    (lambda t: t.replace("cidr: 10.0.3.0/24", "cidr: 10.0.3.0/33"), "is not a CIDR"),
    (lambda t: t.replace("arch_prctl,", "Arch-Prctl,"), "is not a syscall name"),
    (lambda t: t.replace("apiVersion: envelope.dev/v1alpha1", "apiVersion: v9"), "apiVersion"),
    (lambda t: t + "\n  : : :\n", "not valid YAML"),
])
@pytest.mark.parametrize("fmt", ["oci-seccomp", "spo", "networkpolicy", "cilium"])
def test_malformed_policy_clear_error_writes_nothing(tmp_path, capsys, mutate, msg, fmt):
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutate(AGENT.read_text()))
    out = tmp_path / "out"
    out.write_text("previous artefact\n")
    rep = tmp_path / "report.json"
    assert compile_(tmp_path, str(bad), "--format", fmt, "--out", str(out), "--report", str(rep)) == 2
    err = capsys.readouterr().err
    assert err.startswith("envelope: error:") and err.count("\n") == 1 and msg in err
    assert out.read_text() == "previous artefact\n"
    assert not rep.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "out"]  # no temp files left


def test_missing_policy_file(tmp_path, capsys):
    assert compile_(tmp_path, str(tmp_path / "nope.yaml"), "--format", "spo") == 2
    assert "cannot read" in capsys.readouterr().err


def test_with_exceptions_adds_active_syscall_exceptions(tmp_path, capsys):
    sd = tmp_path / "state"
    w = Workload("agents", "Deployment", "research-agent", "main")
    state.set_mode(sd, w, "enforce", reason="go")
    e = exceptions.add(sd, w, "syscall:ptrace", "1h", reason="debug")
    assert compile_(tmp_path, str(AGENT), "--format", "oci-seccomp", "--with-exceptions") == 0
    profile = json.loads(capsys.readouterr().out)
    assert {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "comment": f"exception:{e.id}"} \
        in profile["syscalls"]
    assert compile_(tmp_path, str(AGENT), "--format", "oci-seccomp") == 0
    assert "ptrace" not in capsys.readouterr().out  # pure by default


def test_network_export_mode_note_and_pod_label(tmp_path, capsys):
    p = tmp_path / "alert.yaml"
    p.write_text(AGENT.read_text().replace("mode: enforce", "mode: alert"))
    assert compile_(tmp_path, str(p), "--format", "networkpolicy", "--pod-label",
                    "app.kubernetes.io/name=research") == 0
    captured = capsys.readouterr()
    assert "always enforces" in captured.err
    assert "app.kubernetes.io/name: research" in captured.out
    assert compile_(tmp_path, str(p), "--format", "cilium", "--pod-label", "bad") == 2
