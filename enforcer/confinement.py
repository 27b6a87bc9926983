"""What keeps a command that ``envelope exec`` enforces inside its enforcement.

The enforcement of a command is its cgroup (the egress programs, the sensor's attribution, the
denial probe key on it) and its pinned maps (the rules and the mode word under the bpffs). A
confined root process could leave the first by writing its pid into another cgroup's
``cgroup.procs`` and disarm the second by opening a pin and rewriting it. In enforce mode the
child closes both ways before it ``execve``\\ s the command:

* **A mount namespace** (mounts made private first, so nothing propagates back to the host) in
  which every cgroup filesystem is read-only, so no ``cgroup.procs`` can be written (``EROFS``):
  the command and its children cannot write themselves into the root or a sibling cgroup, nor
  create, remove or reconfigure cgroups; and in which every bpffs is covered by an empty,
  read-only tmpfs, so pins cannot be opened by path. Reading cgroup files (memory and CPU
  limits, which runtimes size themselves by) keeps working.
* **A cgroup namespace** rooted at the command's cgroup (``unshare(CLONE_NEWCGROUP)`` after
  joining it): ``/proc/self/cgroup`` says ``/``, and on hosts whose cgroup2 is mounted with
  ``nsdelegate`` (systemd's default) the kernel itself refuses a move outside the namespace
  (``ENOENT``). Without ``nsdelegate`` (this project's reference machine) the namespace alone
  would not stop a root process; the read-only mount does.
* **Capabilities dropped** from the bounding, effective, permitted, inheritable and ambient
  sets, so that neither namespace can be undone: leaving the cgroup namespace (``setns``) and
  unmounting the tmpfs take ``CAP_SYS_ADMIN``, reaching the host's mounts through
  ``/proc/<pid>/root`` of a process outside takes ``CAP_SYS_PTRACE`` (or a permitted set no
  larger than the target's). When the policy encodes the capability substrate the child keeps
  exactly what it allows (:func:`enforcer.capabilities.exec_capability_sets`); otherwise it
  keeps every capability but :data:`BREAKERS`, the ones that open a way out.

Alert and observe modes prevent nothing: there a migration is detected by the denial probe's
``cgroup_attach_task`` watch, moved back and reported (:mod:`enforcer.session`).

:meth:`Confinement.apply` runs in the forked child; everything it needs is computed before the
fork (:func:`for_exec`), and each step raises OSError naming the call that failed.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from sensor import capabilities as names
from sensor.libc import LIBC, checked

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
BPF_FS_MAGIC = 0xCAFE4A11

# Capabilities that open a way out of the cgroup, the mount namespace or the pinned maps, by
# number (from the one capability table), with the way each opens.
BREAKERS: dict[int, tuple[str, str]] = {names.number(name): (name, why) for name, why in (
    ("DAC_READ_SEARCH", "open_by_handle_at opens files by handle, past the mount namespace"),
    ("NET_ADMIN", "detaches cgroup BPF programs and rewrites netfilter"),
    ("SYS_MODULE", "loads kernel code"),
    ("SYS_RAWIO", "raw memory and port access"),
    ("SYS_PTRACE", "reaches the host's mounts through /proc/<pid>/root of a process outside"),
    ("SYS_ADMIN", "setns back to the host's cgroup namespace, unmounts what hides the pins"),
    ("PERFMON", "attaches perf and kprobe programs that read other processes"),
    ("BPF", "loads BPF programs and walks every map by id"),
)}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_capability() -> int:
    """The highest capability number this kernel knows (``/proc/sys/kernel/cap_last_cap``)."""
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def mounts(fstypes: tuple[str, ...], mountinfo: str | None = None) -> tuple[tuple[str, str], ...]:
    """(mount point, per-mount options) of every mount of one of ``fstypes`` the calling process
    sees, from ``/proc/self/mountinfo`` (field 5 the mount point, field 6 its options, the type
    after the ``-``), in mount order, each point once."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    found: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if sep >= 6 and sep + 1 < len(fields) and fields[sep + 1] in fstypes:
            found.setdefault(fields[4].replace("\\040", " "), fields[5])
    return tuple(found.items())


def bpffs_mounts(mountinfo: str | None = None) -> tuple[str, ...]:
    """Mount points of every bpf filesystem the calling process sees."""
    return tuple(point for point, _ in mounts(("bpf",), mountinfo))


_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1 << 10,
                "nodiratime": 1 << 11, "relatime": 1 << 21, "strictatime": 1 << 24}


def readonly_remount_flags(options: str) -> int:
    """Flags of a read-only bind remount that keeps a mount's other per-mount options."""
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for opt in options.split(","):
        flags |= _MOUNT_FLAGS.get(opt, 0)
    return flags


@dataclass(frozen=True)
class Confinement:
    """The steps the child takes, in order, after joining its cgroup and before Landlock,
    seccomp and ``execve``."""

    cgroup_namespace: bool = True
    hide: tuple[str, ...] = ()          # mount points covered by an empty read-only tmpfs
    readonly: tuple[tuple[str, str], ...] = ()   # (mount point, options) remounted read-only
    keep: frozenset[int] | None = None  # capabilities kept; None keeps every one
    last_cap: int = 40

    def dropped(self) -> list[int]:
        if self.keep is None:
            return []
        return [c for c in range(self.last_cap + 1) if c not in self.keep]

    def apply(self) -> None:
        if self.cgroup_namespace:
            checked("unshare(CLONE_NEWCGROUP)", LIBC.unshare(CLONE_NEWCGROUP))
        if self.hide or self.readonly:
            checked("unshare(CLONE_NEWNS)", LIBC.unshare(CLONE_NEWNS))
            checked("mount --make-rprivate /", LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
            for point, options in self.readonly:
                checked(f"mount -o remount,bind,ro {point}",
                        LIBC.mount(None, os.fsencode(point), None, readonly_remount_flags(options), None))
            for point in self.hide:
                flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
                checked(f"mount tmpfs over {point}",
                        LIBC.mount(b"none", os.fsencode(point), b"tmpfs", flags, b"size=4k,mode=000"))
        if self.keep is not None:
            self._drop_capabilities()

    def _drop_capabilities(self) -> None:
        for cap in self.dropped():
            checked(f"prctl(PR_CAPBSET_DROP, {cap})", LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0))
        checked("prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
                LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        checked("capget", LIBC.capget(ctypes.byref(header), data))
        for word in range(2):
            mask = 0
            for cap in self.keep:
                if cap // 32 == word:
                    mask |= 1 << (cap % 32)
            data[word].effective &= mask
            data[word].permitted &= mask
            data[word].inheritable = 0
        checked("capset", LIBC.capset(ctypes.byref(header), data))

    def describe(self) -> dict:
        return {"cgroupNamespace": self.cgroup_namespace, "hidden": list(self.hide),
                "readOnly": [point for point, _ in self.readonly],
                "capabilitiesKept": None if self.keep is None else sorted(names.name(c) for c in self.keep),
                "capabilitiesDropped": sorted(names.name(c) for c in self.dropped())}


def kept_capabilities(policy_keep: frozenset[int] | None, last_cap: int) -> frozenset[int]:
    """The capabilities an enforced child keeps: the policy's set where it encodes the substrate
    (``policy_keep``, possibly admitting a breaker on purpose), else all but :data:`BREAKERS`."""
    if policy_keep is not None:
        return frozenset(policy_keep)
    return frozenset(c for c in range(last_cap + 1) if c not in BREAKERS)


def admitted_breakers(keep: frozenset[int]) -> list[str]:
    """The :data:`BREAKERS` a kept set admits, as ``NAME (way out)``, for exec's warning."""
    return [f"{BREAKERS[c][0]} ({BREAKERS[c][1]})" for c in sorted(keep) if c in BREAKERS]


def for_exec(mode: str, policy_keep: frozenset[int] | None = None) -> Confinement | None:
    """The confinement ``envelope exec`` applies in ``mode``: None outside enforce mode."""
    if mode != "enforce":
        return None
    last = last_capability()
    return Confinement(cgroup_namespace=True, hide=bpffs_mounts(), readonly=mounts(("cgroup2", "cgroup")),
                       keep=kept_capabilities(policy_keep, last), last_cap=last)
