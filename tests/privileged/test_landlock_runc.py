"""The static launcher in real runc containers: the OCI rewrite puts it in front of the command,
it enforces the compiled ruleset, the container's legitimate work passes, and a spawned /bin/sh
and a read of a credentials file are refused and reported. Under the container's seccomp filter
(which runc loads before it execs the launcher) the launcher needs its completeness set, measured
here the way runc's is."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from enforcer import kernel_audit, seccomp
from enforcer.exec_needs import resolve
from enforcer.landlock_denials import DenialAssembler
from enforcer.landlock_formats import ruleset_file
from enforcer.landlock_rules import compile_ruleset
from enforcer.launcher import LAUNCHER, launcher_binary, oci_with_launcher, seccomp_allowances
from enforcer.policy import Policy
from enforcer.runtime import RUNC, KernelLog, parse_seccomp_log
from sensor import syscalls
from sensor.workload import Workload

from tests.privileged.runc_bundle import BUSYBOX, RuncContainer

pytestmark = pytest.mark.runc

W = Workload("agents", "Deployment", "llm-tool", "tool")
# /app/busybox is a copy of busybox (its own inode) and the only allowed exec; every applet
# symlink in /bin points at /bin/busybox, which is not allowed. busybox's shell runs applets by
# exec'ing /proc/self/exe, i.e. /app/busybox.
LEGIT = "cat /data/in.txt; /app/busybox echo done > /out/result; cat /out/result"
INJECTED = LEGIT + "; /bin/sh -c 'echo shell'; echo sh=$?; cat /secrets/credentials; echo cred=$?"
LAUNCH_COMM = "envelope-launch"  # comm of the launcher process (its file name, 15 characters)


def launcher():
    try:
        return launcher_binary()
    except ValueError as e:
        pytest.fail(str(e))


EXECS = ["/app/busybox"]
FILES = ["file:read:/data/*", "file:create:/out/result", "file:write:/out/result",
         "file:truncate:/out/result", "file:read:/out/result"]


def make_container(tmp_path, script: str, *, seccomp_profile: dict | None = None,
                   with_launcher: bool = True) -> RuncContainer:
    c = RuncContainer.deployment("agents", "llm-tool", "tool", ["/app/busybox", "sh", "-c", script], tmp_path)
    try:
        _prepare(c, seccomp_profile, with_launcher)
    except BaseException:
        c.close()
        raise
    return c


def _prepare(c: RuncContainer, seccomp_profile: dict | None, with_launcher: bool) -> None:
    rootfs = c.bundle / "rootfs"
    for d in ("app", "data", "secrets", "out"):
        (rootfs / d).mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "app/busybox")
    (rootfs / "data/in.txt").write_text("input\n")
    (rootfs / "secrets/credentials").write_text("token=not-a-real-token\n")
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["mounts"].append({"destination": "/out", "type": "tmpfs", "source": "tmpfs",
                          "options": ["nosuid", "nodev", "mode=1777", "size=1m"]})
    if seccomp_profile is not None:
        cfg["linux"]["seccomp"] = seccomp_profile
    if with_launcher:
        compiled = compile_ruleset(str(W), execs=EXECS, files=FILES, exec_needs=resolve(EXECS, root=str(rootfs)))
        (c.bundle / "ruleset").write_text(ruleset_file(compiled))
        cfg = oci_with_launcher(cfg, launcher_source=str(launcher()), ruleset_source=str(c.bundle / "ruleset"))
    (c.bundle / "config.json").write_text(json.dumps(cfg, indent=2))


def run(c: RuncContainer) -> tuple[int | None, str, str]:
    c.run()
    code = c.wait(60)
    return code, c.read_stdout(), c.read_stderr()


def test_legitimate_container_work_passes_under_the_launcher(tmp_path):
    with make_container(tmp_path, LEGIT) as c:
        code, out, err = run(c)
    assert code == 0, err
    assert out.splitlines() == ["input", "done"]


def test_injected_shell_and_credentials_are_refused_and_reported_through_audit(tmp_path):
    """The explicit alternative: Landlock's own audit records (enabling audit is node-wide)."""
    with kernel_audit.AuditLease(), kernel_audit.AuditReader() as reader:
        with make_container(tmp_path, INJECTED) as c:
            code, out, err = run(c)
        assembler, denials = DenialAssembler(), []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for t, text in reader.read():
                denials += assembler.feed(t, text)
            if {d.path for d in denials} >= {"/bin/busybox", "/secrets/credentials"}:
                break
            time.sleep(0.05)
        denials += assembler.flush()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["input", "done"] and "shell" not in lines
    assert "sh=126" in lines and "cred=1" in lines, out + err
    assert "Permission denied" in err
    # the container's domain: created by the launcher, inside the container
    mine = [d for d in denials if d.creator.get("exe") == "/.envelope/envelope-launch"
            or d.domain in {x.domain for x in denials if x.creator.get("exe") == "/.envelope/envelope-launch"}]
    by_path = {d.path: d for d in mine}
    assert by_path["/bin/busybox"].behaviours() == ("exec:/bin/busybox",)
    assert by_path["/secrets/credentials"].blockers == ("fs.read_file",)
    assert by_path["/secrets/credentials"].exe == "/app/busybox"  # the cat applet, run by exec
    assert by_path["/secrets/credentials"].pid and by_path["/secrets/credentials"].pid != os.getpid()


def test_injected_shell_and_credentials_are_reported_from_the_syscall_exit(tmp_path):
    """The product's default: no audit. The container's cgroup is watched by the enforcement
    session (as the daemon watches an enforced workload's pods); Landlock's -EACCES at the exits
    of execve and openat become denied violations, judged against the policy."""
    from enforcer.session import EnforcementSession
    from sensor.cgroup import CgroupFS
    policy = Policy(workload=W, mode="enforce", substrates=("exec", "file"), execs=tuple(EXECS), files=tuple(FILES))
    session = EnforcementSession(tmp_path / "state", pinned=False, file_denials=True)
    try:
        with make_container(tmp_path, INJECTED) as c:
            c.create()
            v2 = str(CgroupFS().root)
            [cg] = [str(d) for d in c.cgroup_dirs() if str(d).startswith(v2)]
            session.apply(policy, "enforce", [cg])
            c.start()
            c.wait(60)
            out = c.read_stdout()
        found, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and len({v.behaviour for v in found}) < 2:
            found += session.poll_violations(100)
    finally:
        session.close()
    lines = out.splitlines()
    assert lines[:2] == ["input", "done"] and "sh=126" in lines and "cred=1" in lines, out
    got = {(v.substrate, v.behaviour, v.action) for v in found}
    assert got == {("exec", "exec:/bin/sh", "denied"), ("file", "file:read:/secrets/credentials", "denied")}, found
    cred = next(v for v in found if v.substrate == "file")
    assert cred.workload == str(W) and cred.detail["syscall"] == "openat" and cred.detail["pid"] > 0
    assert cred.detail["path"] == "/secrets/credentials"


def seccomp_log_profile() -> dict:
    return {"defaultAction": "SCMP_ACT_LOG", "architectures": list(seccomp.ARCHITECTURES["x86_64"]),
            "syscalls": []}


def measure(tmp_path, script: str) -> dict[str, set[str]]:
    """Syscalls each comm made after runc loaded the logging filter, from the kernel log."""
    seen: dict[str, set[str]] = {}
    with KernelLog() as klog:
        for i in range(3):
            klog.read()
            with make_container(tmp_path / f"m{i}", script, seccomp_profile=seccomp_log_profile()) as c:
                code, _, err = run(c)
            assert code == 0, err
            for comm, arch, nr in parse_seccomp_log(klog.read()):
                if arch == "c000003e":
                    seen.setdefault(comm, set()).add(syscalls.name(nr))
    assert LAUNCH_COMM in seen, f"no seccomp log lines from the launcher: {sorted(seen)}"
    return seen


def test_launcher_set_covers_what_the_launcher_does_under_seccomp(tmp_path):
    seen = measure(tmp_path, LEGIT)
    missing = seen[LAUNCH_COMM] - set(LAUNCHER.syscalls)
    assert not missing, f"the launcher made syscalls its completeness set lacks: {sorted(missing)}"
    assert {"landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "prctl"} <= seen[LAUNCH_COMM]


def test_enforced_seccomp_and_landlock_together(tmp_path):
    seen = measure(tmp_path, LEGIT)
    command = set().union(*(v for k, v in seen.items() if k not in (LAUNCH_COMM, "runc:[2:INIT]")))
    policy = Policy(workload=W, mode="enforce", syscalls=tuple(sorted(command)))
    assert "landlock_add_rule" not in policy.syscalls  # the command itself never needs them
    with_launcher = seccomp.compile_oci(policy, runtime="runc", extra_allow=seccomp_allowances())
    with make_container(tmp_path / "ok", INJECTED, seccomp_profile=with_launcher.profile) as c:
        code, out, err = run(c)
    assert code == 0, err
    assert out.splitlines()[:2] == ["input", "done"] and "cred=1" in out.splitlines()
    # without the launcher's set, the same filter stops the launcher before the command runs
    bare = seccomp.compile_oci(policy, runtime="runc")
    assert set(RUNC.syscalls) & {"landlock_add_rule", "landlock_restrict_self"} == set()
    spec_error = None
    try:
        make_container(tmp_path / "bare", LEGIT, seccomp_profile=bare.profile).close()
    except ValueError as e:
        spec_error = str(e)
    assert spec_error and "extra_allow" in spec_error  # the rewrite refuses it up front
