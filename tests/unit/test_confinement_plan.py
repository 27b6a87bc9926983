"""The confinement's plan, computed before the fork: which mounts it covers or makes read-only
(from mountinfo text), the remount flags that keep a mount's own options, and the capabilities
an enforced child keeps."""

from __future__ import annotations

from enforcer.confinement import (BREAKERS, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT,
                                  Confinement, admitted_breakers, bpffs_mounts, kept_capabilities, mounts,
                                  readonly_remount_flags)

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:3 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
42 31 0:39 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:5 - cgroup cgroup rw,memory
50 25 0:40 / /sys/fs/bpf rw,relatime shared:6 - bpf bpf rw
51 22 0:40 / /run/pins\\040dir rw,relatime - bpf bpf rw
52 25 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
"""


def test_mounts_by_type_each_point_once():
    assert bpffs_mounts(MOUNTINFO) == ("/sys/fs/bpf", "/run/pins dir")
    cg = mounts(("cgroup2", "cgroup"), MOUNTINFO)
    assert cg == (("/sys/fs/cgroup/unified", "rw,nosuid,nodev,noexec,relatime"),
                  ("/sys/fs/cgroup/memory", "rw,nosuid,nodev,noexec,relatime"))
    assert mounts(("nfs",), MOUNTINFO) == ()


def test_readonly_remount_keeps_the_mounts_own_flags():
    flags = readonly_remount_flags("rw,nosuid,nodev,noexec,relatime")
    assert flags & MS_RDONLY and flags & MS_REMOUNT and flags & MS_BIND
    assert flags & MS_NOSUID and flags & MS_NODEV and flags & MS_NOEXEC
    assert not readonly_remount_flags("rw,relatime") & MS_NOSUID


def test_kept_capabilities():
    everything_else = kept_capabilities(None, 40)
    assert not everything_else & set(BREAKERS)
    assert everything_else | set(BREAKERS) == set(range(41))
    assert kept_capabilities(frozenset({0, 21}), 40) == {0, 21}   # the policy's set, exactly
    assert admitted_breakers(frozenset({0, 21})) == [f"SYS_ADMIN ({BREAKERS[21][1]})"]
    assert admitted_breakers(everything_else) == []


def test_dropped_is_the_complement_of_kept():
    c = Confinement(keep=frozenset({0, 10}), last_cap=40)
    assert c.dropped() == [n for n in range(41) if n not in (0, 10)]
    assert Confinement(keep=None).dropped() == []
