"""Compiled seccomp profiles on real runc containers and real processes.

A busybox container is recorded with a logging filter (``SCMP_ACT_LOG``, no rules: the kernel
logs every syscall after the filter load with its ``comm``), which splits what runc's init makes
from what the container command makes. A policy built from the command's syscalls alone is
compiled to OCI JSON with the runc completeness set and put in ``config.json``: the container
starts, and a forbidden syscall inside it fails with EPERM. Without the completeness set the same
profile cannot start the container, which is the failure the set exists to prevent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from enforcer import seccomp
from enforcer.policy import Policy
from enforcer.runtime import RUNC, KernelLog, logged_syscalls
from sensor.workload import Workload

pytestmark = pytest.mark.runc

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "true", "unshare", "chroot", "cat")
EXTRA_CAPS = ("CAP_SYS_ADMIN", "CAP_SYS_CHROOT")
W = Workload("default", "Deployment", "busybox", "sh")
LEGIT = "echo started; /bin/true; /bin/echo done"
FORBIDDEN = "echo started; unshare -n true; echo unshare=$?; chroot / true; echo chroot=$?"


def make_bundle(root: Path, args: list[str], seccomp_profile: dict | None,
                no_new_privileges: bool) -> Path:
    """A minimal runc bundle: a busybox-static rootfs and ``runc spec``'s config, adjusted."""
    bundle = root / "bundle"
    if not (bundle / "rootfs").exists():
        (bundle / "rootfs" / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, bundle / "rootfs" / "bin" / "busybox")
        for a in APPLETS:
            (bundle / "rootfs" / "bin" / a).symlink_to("busybox")
        (bundle / "rootfs" / "proc").mkdir()
        (bundle / "rootfs" / "dev").mkdir()
        (bundle / "rootfs" / "tmp").mkdir()
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    cfg["process"]["noNewPrivileges"] = no_new_privileges
    cfg["root"]["readonly"] = True
    cfg["hostname"] = "envelope-test"
    # unshare(CLONE_NEWNET) and chroot need these capabilities, so without the seccomp profile
    # both succeed and any EPERM under the profile is the profile's doing.
    for kind in ("bounding", "effective", "permitted"):
        caps = cfg["process"]["capabilities"].setdefault(kind, [])
        caps += [c for c in EXTRA_CAPS if c not in caps]
    if seccomp_profile is None:
        cfg["linux"].pop("seccomp", None)
    else:
        cfg["linux"]["seccomp"] = seccomp_profile
    (bundle / "config.json").write_text(json.dumps(cfg, indent=2))
    return bundle


class Containers:
    def __init__(self):
        self.ids: list[str] = []

    def run(self, bundle: Path) -> subprocess.CompletedProcess:
        cid = f"envelope-seccomp-{os.getpid()}-{len(self.ids)}"
        self.ids.append(cid)
        try:
            return subprocess.run(["runc", "run", cid], cwd=bundle, capture_output=True, text=True,
                                  timeout=60)
        finally:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)

    def cleanup(self) -> None:
        for cid in self.ids:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)


@pytest.fixture
def containers():
    c = Containers()
    yield c
    c.cleanup()


def record(tmp_path, containers, script: str, nnp: bool, runs: int = 3) -> dict[str, set[str]]:
    """The syscalls runc's init and the command make under the filter, from the kernel log."""
    log_all = {"defaultAction": "SCMP_ACT_LOG",
               "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
               "syscalls": []}
    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", script], log_all, nnp)
    seen: dict[str, set[str]] = {"runtime": set(), "command": set()}
    with KernelLog() as klog:
        for _ in range(runs):
            klog.read()
            r = containers.run(bundle)
            assert r.returncode == 0, r.stderr
            got = logged_syscalls(klog.read())
            for k in seen:
                seen[k] |= got[k]
    assert seen["command"], "no seccomp log lines: is an audit daemon taking them?"
    return seen


@pytest.mark.parametrize("nnp", [False, True], ids=["k8s-default-nnp-false", "nnp-true"])
def test_runtime_set_covers_what_runc_init_makes(tmp_path, containers, nnp):
    seen = record(tmp_path, containers, LEGIT, nnp)
    missing = seen["runtime"] - set(RUNC.syscalls)
    assert not missing, f"runc init made syscalls the completeness set lacks: {sorted(missing)}"
    assert "execve" in seen["runtime"]


@pytest.mark.parametrize("nnp", [False, True], ids=["k8s-default-nnp-false", "nnp-true"])
def test_container_starts_and_forbidden_syscalls_fail(tmp_path, containers, nnp):
    seen = record(tmp_path, containers, LEGIT, nnp)
    # The policy holds only what the command did: runc's own needs come from the completeness set.
    policy = Policy(workload=W, mode="enforce", syscalls=tuple(sorted(seen["command"])))
    assert "unshare" not in policy.syscalls and "chroot" not in policy.syscalls
    compiled = seccomp.compile_oci(policy, runtime="runc")
    assert any(e.rule == "runtime-completeness:runc" for e in compiled.report)

    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", LEGIT], compiled.profile, nnp)
    r = containers.run(bundle)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["started", "done"]

    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", FORBIDDEN], compiled.profile, nnp)
    r = containers.run(bundle)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "started"
    assert "unshare=1" in out and "chroot=1" in out, r.stdout + r.stderr
    assert r.stderr.count("Operation not permitted") >= 2, r.stderr  # EPERM, our DENY_ERRNO

    # The same commands run in a container without the filter: the denials were the profile's.
    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", FORBIDDEN], None, nnp)
    r = containers.run(bundle)
    assert "unshare=0" in r.stdout.splitlines() and "chroot=0" in r.stdout.splitlines(), \
        r.stdout + r.stderr


def test_without_completeness_set_the_container_cannot_start(tmp_path, containers):
    seen = record(tmp_path, containers, LEGIT, nnp=False)
    policy = Policy(workload=W, mode="enforce", syscalls=tuple(sorted(seen["command"])))
    bare = seccomp.compile_oci(policy, runtime=None)
    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", LEGIT], bare.profile, False)
    r = containers.run(bundle)
    assert r.returncode != 0
    assert "started" not in r.stdout


def test_alert_profile_allows_and_logs(tmp_path, containers):
    seen = record(tmp_path, containers, LEGIT, nnp=False)
    policy = Policy(workload=W, mode="alert", syscalls=tuple(sorted(seen["command"])))
    compiled = seccomp.compile_oci(policy, runtime="runc")
    assert compiled.profile["defaultAction"] == "SCMP_ACT_LOG"
    bundle = make_bundle(tmp_path, ["/bin/sh", "-c", FORBIDDEN], compiled.profile, False)
    with KernelLog() as klog:
        r = containers.run(bundle)
        logged = logged_syscalls(klog.read())
    assert r.returncode == 0, r.stderr
    assert "unshare=0" in r.stdout.splitlines()  # allowed...
    assert "unshare" in logged["command"] and "chroot" in logged["command"]  # ...and reported
    assert not (logged["command"] & set(compiled.allowed()))  # only what is outside the profile


# ---- in-process filter (libseccomp), loaded in the child before execve -------------------------


def run_filtered(policy: Policy, argv: list[str], mode: str | None = None):
    flt = seccomp.build_filter(seccomp.compile_oci(policy, mode))
    return subprocess.run(argv, capture_output=True, text=True, preexec_fn=seccomp.preexec(flt),
                          timeout=30)


def test_in_process_filter_denies_with_eperm(tmp_path):
    # what busybox's unshare applet needs to start and report, minus unshare itself
    base = ("arch_prctl", "brk", "execve", "exit_group", "getpid", "getuid", "mprotect", "prctl",
            "prlimit64", "readlink", "rseq", "set_robust_list", "set_tid_address", "getrandom",
            "write", "writev", "ioctl", "fcntl")
    policy = Policy(workload=W, mode="enforce", syscalls=base)
    r = run_filtered(policy, [str(BUSYBOX), "unshare", "-n", "true"])
    assert r.returncode != 0
    assert "Operation not permitted" in r.stderr, r.stderr
    # allowing unshare (and what the applet then does) makes it pass
    ok = Policy(workload=W, mode="enforce", syscalls=base + ("unshare", "wait4", "clone", "fork",
                                                             "vfork", "rt_sigaction",
                                                             "rt_sigprocmask", "getppid",
                                                             "exit"))
    r = run_filtered(ok, [str(BUSYBOX), "unshare", "-n", str(BUSYBOX), "true"])
    assert r.returncode == 0, r.stderr
    # alert mode allows everything outside the policy
    r = run_filtered(policy, [str(BUSYBOX), "unshare", "-n", "true"], mode="alert")
    assert r.returncode == 0, r.stderr


def test_in_process_filter_status_shows_filter():
    policy = Policy(workload=W, mode="enforce",
                    syscalls=("arch_prctl", "brk", "execve", "exit_group", "getuid", "mprotect",
                              "prctl", "prlimit64", "readlink", "rseq", "set_robust_list",
                              "set_tid_address", "getrandom", "write", "openat", "read", "close",
                              "fstat", "newfstatat", "lseek", "ioctl", "sendfile", "getpid"))
    r = run_filtered(policy, [str(BUSYBOX), "cat", "/proc/self/status"])
    assert r.returncode == 0, r.stderr
    status = dict(line.split(":\t", 1) for line in r.stdout.splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
