"""cgroup path parsing for every kubelet layout (real samples), mount discovery, id index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensor.cgroup import (
    CgroupError,
    CgroupFS,
    ContainerRef,
    find_cgroup2_mount,
    host_unit_name,
    normalize_rel,
    parse_container_ref,
    parse_proc_cgroup,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cgroups"
SAMPLES = json.loads((FIXTURES / "kubelet_paths.json").read_text())["samples"]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["source"][:60] + "|" + s["path"][-16:] for s in SAMPLES])
def test_real_path_samples(sample):
    ref = parse_container_ref(sample["path"])
    if sample["expect"] is None:
        assert ref is None
    else:
        assert ref == ContainerRef(cgroup_path=sample["path"], **sample["expect"])


def test_samples_cover_every_runtime_driver_and_qos():
    seen = set()
    for s in SAMPLES:
        e = s["expect"]
        if e is None:
            continue
        driver = "systemd" if ".slice" in s["path"] else "cgroupfs"
        seen.add((driver, e["runtime"]))
        seen.add(("qos", e["qos"]))
    for needed in [("systemd", "containerd"), ("systemd", "cri-o"), ("systemd", "docker"),
                   ("cgroupfs", ""), ("cgroupfs", "cri-o"),
                   ("qos", "guaranteed"), ("qos", "burstable"), ("qos", "besteffort")]:
        assert needed in seen, needed


CID = "0123456789abcdef" * 4
UID = "3f2e1d0c-9b8a-4765-8432-10fedcba9876"


@pytest.mark.parametrize("path,runtime,qos", [
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope", "containerd", "besteffort"),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope", "cri-o", "guaranteed"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope", "docker", "burstable"),
    (f"/kubepods/besteffort/pod{UID}/{CID}", "", "besteffort"),
    (f"/kubepods/burstable/pod{UID}/{CID}", "", "burstable"),
    (f"/kubepods/pod{UID}/{CID}", "", "guaranteed"),
    (f"/kubepods/pod{UID}/crio-{CID}", "cri-o", "guaranteed"),
])
def test_every_layout(path, runtime, qos):
    ref = parse_container_ref(path)
    assert ref is not None
    assert (ref.runtime, ref.container_id, ref.pod_uid, ref.qos) == (runtime, CID, UID, qos)


@pytest.mark.parametrize("path", [
    f"/kubepods/besteffort/pod{UID}",  # pod level
    f"/kubepods/besteffort/pod{UID}/crio-conmon-{CID}",
    f"/notkube/besteffort/pod{UID}/{CID}",  # no kubepods anchor
    f"/kubepods/besteffort/pod{UID}/not-a-container-id",
    f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID[:12]}.scope",  # short id
    "/system.slice/sshd.service",
])
def test_non_container_cgroups(path):
    assert parse_container_ref(path) is None


def test_nested_below_container_stays_that_container():
    ref = parse_container_ref(f"/kubepods/burstable/pod{UID}/{CID}/worker/threads")
    assert ref is not None and ref.container_id == CID


HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED_MOUNTINFO = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
1200 1100 0:23 /kubepods.slice /host/cg\\040x rw shared:9 - cgroup2 cgroup2 rw
"""


def test_mount_discovery_hybrid_and_unified():
    m = find_cgroup2_mount(HYBRID_MOUNTINFO)
    assert m is not None and m.mount_point == "/sys/fs/cgroup/unified" and m.root == "/"
    m = find_cgroup2_mount(UNIFIED_MOUNTINFO)  # optional "shared:9" fields before the "-"
    assert m is not None and m.mount_point == "/sys/fs/cgroup"
    only_bind = "\n".join(UNIFIED_MOUNTINFO.splitlines()[2:])
    m = find_cgroup2_mount(only_bind)
    assert m is not None and m.mount_point == "/host/cg x" and m.root == "/kubepods.slice"
    assert find_cgroup2_mount(HYBRID_MOUNTINFO.replace("cgroup2", "cgroup")) is None


def test_this_hosts_mountinfo_has_cgroup2():
    m = find_cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    assert m is not None and os.path.isdir(m.mount_point)


def test_proc_cgroup_parse():
    text = "9:name=systemd:/kubepods/x\n4:memory:/kubepods/x\n0::/kubepods/besteffort/pod1/abc\n"
    assert parse_proc_cgroup(text) == "/kubepods/besteffort/pod1/abc"
    assert parse_proc_cgroup("0::/\n") == "/"
    assert parse_proc_cgroup("4:memory:/x\n") is None


def test_normalize_refuses_escape():
    assert normalize_rel("a//b/./c/") == "/a/b/c"
    assert normalize_rel("") == "/"
    with pytest.raises(CgroupError):
        normalize_rel("/a/../../etc")


@pytest.mark.parametrize("path,name", [
    ("/system.slice/ssh.service", "ssh.service"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.scope", "foo.scope"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/system.slice", "system.slice"),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{CID}.scope", "crio-conmon"),
    ("/envelope/record/run-1", "/envelope/record/run-1"),
    ("/", "/"),
])
def test_host_unit_names(path, name):
    assert host_unit_name(path) == name


def test_index_maps_inodes_to_paths(tmp_path):
    # The walker works on any directory tree; on cgroup v2 the inode is the cgroup id.
    (tmp_path / "kubepods/besteffort/podx").mkdir(parents=True)
    (tmp_path / "system.slice").mkdir()
    (tmp_path / "system.slice/cgroup.procs").write_text("")  # files are not cgroups
    fs = CgroupFS(tmp_path)
    n = fs.rebuild_index()
    assert n == 5  # root + 4 dirs
    ino = os.stat(tmp_path / "kubepods/besteffort/podx").st_ino
    assert fs.path_of(ino, rebuild=False) == "/kubepods/besteffort/podx"
    assert fs.path_of(os.stat(tmp_path).st_ino) == "/"
    # a directory created after the walk is found by a rebuild on miss
    (tmp_path / "late").mkdir()
    late = os.stat(tmp_path / "late").st_ino
    assert fs.path_of(late, rebuild=False) is None
    walks = fs.walks
    assert fs.path_of(late) == "/late" and fs.walks == walks + 1
    # a removed directory is not returned from the stale index
    os.rmdir(tmp_path / "late")
    assert fs.path_of(late) is None


def test_make_refuses_root_and_escape(tmp_path):
    fs = CgroupFS(tmp_path)
    with pytest.raises(CgroupError):
        fs.make("/")
    with pytest.raises(CgroupError):
        fs.make("../outside")
    with pytest.raises(CgroupError):
        fs.remove("/")
    path, cid = fs.make("/a/b")
    assert path == tmp_path / "a" / "b" and cid == os.stat(path).st_ino


def test_pid_cgroup_reads_proc(tmp_path):
    proc = tmp_path / "proc"
    root = tmp_path / "cg"
    (root / "kubepods/besteffort/pod1/c1").mkdir(parents=True)
    (proc / "42").mkdir(parents=True)
    (proc / "42/cgroup").write_text("1:cpu:/whatever\n0::/kubepods/besteffort/pod1/c1\n")
    (proc / "43").mkdir()
    (proc / "43/cgroup").write_text("0::/../../outside\n")  # another cgroup namespace
    fs = CgroupFS(root, proc_root=proc)
    rel, cid = fs.pid_cgroup(42)
    assert rel == "/kubepods/besteffort/pod1/c1"
    assert cid == os.stat(root / "kubepods/besteffort/pod1/c1").st_ino
    assert fs.pid_cgroup(43) is None
    assert fs.pid_cgroup(44) is None  # gone


_hex = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_uuid = st.uuids().map(str)


@given(uid=_uuid, cid=_hex, runtime=st.sampled_from(["containerd", "cri-o", "docker"]),
       qos=st.sampled_from(["guaranteed", "burstable", "besteffort"]),
       root=st.sampled_from([("", ""), ("/kubelet.slice", "kubelet-"),  # kubelet --cgroup-root
                             ("/system.slice/docker-0a1b2c.scope/kubelet.slice", "kubelet-")]))  # kind
def test_systemd_layout_roundtrip(uid, cid, runtime, qos, root):
    scope = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}[runtime]
    parent, name_prefix = root
    kp = f"{name_prefix}kubepods"
    q = "" if qos == "guaranteed" else f"-{qos}"
    qos_dir = f"/{kp}{q}.slice" if q else ""
    path = f"{parent}/{kp}.slice{qos_dir}/{kp}{q}-pod{uid.replace('-', '_')}.slice/{scope}-{cid}.scope"
    assert parse_container_ref(path) == ContainerRef(runtime, cid, uid, qos, path)


@given(uid=_uuid, cid=_hex, qos=st.sampled_from(["guaranteed", "burstable", "besteffort"]),
       leaf=st.sampled_from(["", "crio-"]), root=st.sampled_from(["", "/k3s", "/kubelet"]))
def test_cgroupfs_layout_roundtrip(uid, cid, qos, leaf, root):
    qpart = "" if qos == "guaranteed" else f"/{qos}"
    path = f"{root}/kubepods{qpart}/pod{uid}/{leaf}{cid}"
    assert parse_container_ref(path) == ContainerRef("cri-o" if leaf else "", cid, uid, qos, path)
    assert parse_container_ref(f"{root}/kubepods{qpart}/pod{uid}/crio-conmon-{cid}") is None

