"""Every path that makes a seccomp profile agrees: the kubelet's Localhost profile (cluster),
``envelope compile --format oci-seccomp --with-exceptions``, the set the denial probe compares
against, and ``envelope exec``'s in-process filter, for the same policy and exceptions. They all
come from :func:`enforcer.seccomp.profile_for`; what differs between them is only what the
target adds, and each addition is named."""

from __future__ import annotations

import json
import re
import tempfile

import seccomp as sc

from enforcer import exceptions
from enforcer.policy import Policy, dump_policy
from enforcer.policy_actions import kubelet_seccomp
from enforcer.runtime import RUNC
from enforcer.seccomp import EXEC_RULE, build_filter, profile_for
from enforcer.session import EnforcementSession
from envelope.cli import main
from sensor.workload import Workload
from tests.fakes.kernel import FakeKernel

W = Workload("agents", "Deployment", "research-agent", "agent")
POLICY = Policy(W, mode="enforce", substrates=("syscall",),
                syscalls=("read", "write", "close", "exit_group", "futex", "mmap"))


def _allowed(profile: dict) -> dict[str, str]:
    """syscall -> the rule comment of the ALLOW rule that names it."""
    return {n: r.get("comment", "") for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
            for n in r["names"]}


def test_kubelet_compile_denials_and_exec_agree(tmp_path, capsys):
    state = tmp_path / "state"
    exc = exceptions.add(state, W, "syscall:ptrace", "1h", reason="debugging a hang")
    allowances = exceptions.syscall_allowances(state, W)
    assert allowances == {"ptrace": f"exception:{exc.id}"}

    kubelet = kubelet_seccomp(POLICY, "enforce", allowances)

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(dump_policy(POLICY))
    capsys.readouterr()
    assert main(["--state-dir", str(state), "compile", str(policy_file), "--format", "oci-seccomp",
                 "--with-exceptions"]) == 0
    compiled_cli = json.loads(capsys.readouterr().out)
    assert compiled_cli == kubelet.profile  # byte for byte the same object

    cg = tmp_path / "cg"
    cg.mkdir()
    bpffs = tmp_path / "bpffs"
    bpffs.mkdir()
    kernel = FakeKernel()
    session = EnforcementSession(state, bpffs=bpffs, backend=kernel, denials=True)
    session.apply(POLICY, "enforce", [str(cg)])
    [(_, _, probe_allowed)] = kernel.probes[0].watched.values()
    assert set(probe_allowed) == set(kubelet.allowed())

    exec_profile = profile_for(POLICY, "enforce", target="exec", exceptions=allowances)
    k, e = _allowed(kubelet.profile), _allowed(exec_profile.profile)
    own_and_exceptions = {n: r for n, r in k.items() if not r.startswith("runtime-completeness:")}
    assert {n: r for n, r in e.items() if r != EXEC_RULE} == own_and_exceptions
    assert set(k) - set(own_and_exceptions) == set(RUNC.names()) - set(own_and_exceptions)
    assert e.get("execve") == EXEC_RULE
    assert k["ptrace"] == e["ptrace"] == f"exception:{exc.id}"

    # the filter exec loads allows exactly the exec profile's syscalls on the native ABI
    flt = build_filter(exec_profile)
    with tempfile.TemporaryFile("w+") as t:
        flt.export_pfc(t)
        t.seek(0)
        text = t.read()
    native = text.split("# filter for arch x86_64", 1)[1].split("# filter for arch", 1)[0]
    numbers = {int(n) for n in re.findall(r"\$syscall == (\d+)", native)}
    want = {int(sc.resolve_syscall(sc.Arch.X86_64, n)) for n in e}
    assert numbers == want
