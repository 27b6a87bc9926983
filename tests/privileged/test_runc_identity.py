"""A real runc busybox container with a kubelet cgroupsPath and CRI annotations resolves, by
the cgroup id read while it runs, to its namespace, Deployment and container; real cgroups are
created, populated, killed and removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sensor.cgroup import CgroupFS, cgroup_id, cgroup_id_from_handle, parse_container_ref
from sensor.identity import Resolver
from sensor.workload import Workload
from tests.privileged.runc_bundle import RuncContainer, cgroup_mounts


@pytest.fixture
def cgfs():
    return CgroupFS()


@pytest.mark.runc
def test_runc_container_resolves_to_namespace_deployment_and_container(tmp_path, cgfs):
    with RuncContainer.deployment("agents", "research-agent", "agent",
                                  ["/bin/sh", "-c", "echo started; exec sleep 300"], tmp_path) as c:
        c.run()
        pid = c.wait_running()
        # the cgroup runc made is exactly the kubelet path, in the v2 hierarchy
        rel, cid = cgfs.pid_cgroup(pid)
        assert rel == c.cgroups_path
        assert cid == cgroup_id(cgfs.abspath(c.cgroups_path))
        assert cid == cgroup_id_from_handle(cgfs.abspath(c.cgroups_path))  # the kernel's id
        assert (c.state_dir / "state.json").exists()

        resolver = Resolver(cgfs)
        ident = resolver.resolve(cid, pid)
        assert ident.source == "oci"
        assert ident.workload == Workload("agents", "Deployment", "research-agent", "agent")
        assert (ident.namespace, ident.pod_name, ident.container_name, ident.pod_uid) == (
            "agents", c.pod_name, "agent", c.pod_uid)
        assert ident.container.container_id == c.id
        assert ident.container.qos == "besteffort"
        assert ident.container.runtime == "runc"  # bare cgroupfs id, named by /run/runc state
        assert ident.cgroup_path == c.cgroups_path

        # without a pid, the id is found by walking the hierarchy
        walked = Resolver(CgroupFS(cgfs.root)).resolve(cid)
        assert walked.workload == ident.workload and walked.cgroup_path == c.cgroups_path

        c.kill()
        assert c.wait() == 137  # runc passes the container's exit (SIGKILL) through
        c.delete()
        # runc removed the container cgroup (and the helper its parents)...
        assert not cgfs.abspath(c.cgroups_path).exists()
        assert not cgfs.abspath(f"/kubepods/besteffort/pod{c.pod_uid}").exists()
        assert c.cgroup_dirs() == []
        assert not c.state_dir.exists()
        # ...but the identity resolved at first sight stays
        assert resolver.resolve(cid) == ident


@pytest.mark.runc
def test_short_lived_container_resolved_at_first_sight(tmp_path, cgfs):
    """A container that exits on its own: resolve while it lives, look up after it is gone."""
    with RuncContainer.deployment("batch", "indexer", "worker",
                                  ["/bin/sh", "-c", "read x; exit 3"], tmp_path,
                                  qos="guaranteed") as c:
        # create: the cgroup exists before the first instruction, as a sensor would see it
        c.create()
        pid = c.wait_running()
        rel, cid = cgfs.pid_cgroup(pid)
        assert rel == f"/kubepods/pod{c.pod_uid}/{c.id}"
        assert parse_container_ref(rel).qos == "guaranteed"
        resolver = Resolver(cgfs)
        first = resolver.resolve(cid, pid)
        c.start()  # stdin is /dev/null: `read` fails at once and the shell exits 3
        assert c.wait() is None
        c.delete()
        assert not cgfs.abspath(rel).exists()
        assert resolver.resolve(cid) == first
        assert first.workload == Workload("batch", "Deployment", "indexer", "worker")


@pytest.mark.runc
def test_a_container_first_seen_after_runc_deleted_it_keeps_its_identity(tmp_path, cgfs):
    """``runc run`` deletes its state as the container exits: a resolver that first looks after
    that still finds the Deployment, from what the runtime watch read at ``create``."""
    from sensor.runtime_watch import RememberingRuntimeState
    root = tmp_path / "runc-root"  # a runc root of its own: only this container in it
    root.mkdir()
    runtime = RememberingRuntimeState(runc_roots=(str(root),), bundle_dirs=(), crio_userdata=())
    assert runtime.watch.start()
    try:
        with RuncContainer.deployment("batch", "indexer", "worker", ["/bin/sh", "-c", "read x; exit 3"],
                                      tmp_path, runc_root=str(root)) as c:
            c.create()
            pid = c.wait_running()
            rel, cid = cgfs.pid_cgroup(pid)
            deadline = time.monotonic() + 30
            while runtime.watch.remembered(c.id) is None and time.monotonic() < deadline:
                time.sleep(0.01)  # the watch reads the state in its own thread
            assert runtime.watch.remembered(c.id) is not None, runtime.watch.counts
            c.start()
            assert c.wait() is None
            c.delete()
            assert not c.state_dir.exists() and not cgfs.abspath(rel).exists()
            late = Resolver(cgfs, runtime=runtime).resolve(cid)  # first sight: everything is gone
            assert late.workload == Workload("batch", "Deployment", "indexer", "worker")
            assert late.source == "oci" and late.container.container_id == c.id
            assert Resolver(cgfs).resolve(cid).source == "unresolved"  # without the watch: nothing
    finally:
        runtime.watch.close()


def test_real_cgroup_create_move_kill_remove(cgfs):
    top = f"/envelope-identity-{os.getpid()}"
    rel = f"{top}/app"
    path, cid = cgfs.make(rel)
    try:
        assert cid == cgroup_id_from_handle(path)
        # a parent that forks a child once it is in the cgroup: both belong to it, the child
        # by inheritance
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "import os,sys,time\nsys.stdin.readline()\npid=os.fork()\n"
             "if pid==0: time.sleep(300)\nelse:\n print(pid, flush=True); time.sleep(300)"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cgfs.move(rel, proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        child = int(proc.stdout.readline())
        assert sorted(cgfs.procs(rel)) == sorted([proc.pid, child])
        assert cgfs.pid_cgroup(proc.pid) == (rel, cid) == cgfs.pid_cgroup(child)
        resolved = Resolver(cgfs).resolve(cid, child)
        assert resolved.workload == Workload.host(f"envelope-identity-{os.getpid()}_app")
        cgfs.remove(rel)  # kills both, then rmdir (which only succeeds once no task is left)
        assert proc.wait(30) == -9
        assert not path.exists()
    finally:
        cgfs.remove(top)
    assert not cgfs.abspath(top).exists()


def test_cgroup2_is_the_mount_runc_uses(cgfs):
    assert cgfs.root in cgroup_mounts()
    assert (cgfs.root / "cgroup.controllers").exists()


@pytest.mark.runc
def test_bundle_applies_an_oci_seccomp_profile(tmp_path):
    deny_mkdir = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }
    script = ["/bin/sh", "-c", "mkdir /dev/shm/probe && echo made"]
    with RuncContainer.deployment("agents", "tool-runner", "runner", script, tmp_path,
                                  seccomp=deny_mkdir) as c:
        assert c.config["linux"]["seccomp"] == deny_mkdir
        c.run()
        assert c.wait() == 1
        assert "Operation not permitted" in c.read_stderr() and "made" not in c.read_stdout()
    with RuncContainer.deployment("agents", "tool-runner", "runner", script, tmp_path) as c:
        c.run()
        assert c.wait() == 0 and c.read_stdout().strip() == "made"
