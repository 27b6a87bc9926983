"""Syscall companion groups: alternative entry points to one kernel operation.

Structural closure keeps syscalls as an exact set, except that every member of a named group
below stands for the whole group. A group qualifies only when its members do the same thing and
the choice between them is made by the C library or language runtime (by its version, the
architecture or an argument), not by the workload's intent. Seeing ``stat`` today and
``newfstatat`` after a base-image update is the same behaviour; a policy that tells them apart
breaks on the update and protects nothing.

Groups are disjoint, so every syscall belongs to at most one. Each derived policy lists the groups
it used, with their members and the reason they are equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompanionGroup:
    name: str
    members: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "members": list(self.members), "reason": self.reason}


GROUPS: tuple[CompanionGroup, ...] = (
    CompanionGroup("stat-family", ("fstat", "lstat", "newfstatat", "stat", "statx"),
                   "file status; glibc >= 2.33 routes stat/lstat/fstat through newfstatat, and "
                   "newer libcs and runtimes use statx"),
    CompanionGroup("open-family", ("open", "openat", "openat2"),
                   "open a file; libcs implement open() with openat, and openat2 is openat with "
                   "extra resolve flags"),
    CompanionGroup("access-family", ("access", "faccessat", "faccessat2"),
                   "permission check; glibc implements access() with faccessat/faccessat2"),
    CompanionGroup("readlink-family", ("readlink", "readlinkat"),
                   "read a symlink; readlink() is readlinkat(AT_FDCWD, ...)"),
    CompanionGroup("unlink-family", ("rmdir", "unlink", "unlinkat"),
                   "remove a name; unlinkat covers unlink and rmdir (AT_REMOVEDIR)"),
    CompanionGroup("rename-family", ("rename", "renameat", "renameat2"),
                   "rename; libcs implement rename() with renameat/renameat2"),
    CompanionGroup("mkdir-family", ("mkdir", "mkdirat"), "create a directory; mkdir() is mkdirat(AT_FDCWD, ...)"),
    CompanionGroup("link-family", ("link", "linkat"), "hard link; link() is linkat(AT_FDCWD, ...)"),
    CompanionGroup("symlink-family", ("symlink", "symlinkat"), "symlink; symlink() is symlinkat(..., AT_FDCWD, ...)"),
    CompanionGroup("chmod-family", ("chmod", "fchmod", "fchmodat", "fchmodat2"),
                   "change mode; libcs route chmod through fchmodat (fchmodat2 on newer glibc)"),
    CompanionGroup("chown-family", ("chown", "fchown", "fchownat", "lchown"),
                   "change owner; libcs route chown/lchown through fchownat"),
    CompanionGroup("utime-family", ("futimesat", "utime", "utimensat", "utimes"),
                   "set file times; libcs implement utime/utimes with utimensat"),
    CompanionGroup("getdents-family", ("getdents", "getdents64"),
                   "read directory entries; the libc picks the 64-bit variant"),
    CompanionGroup("poll-family", ("poll", "ppoll", "pselect6", "select"),
                   "wait for file descriptors; libcs implement poll/select with ppoll/pselect6 "
                   "(always on architectures without the legacy calls)"),
    CompanionGroup("epoll-wait-family", ("epoll_pwait", "epoll_pwait2", "epoll_wait"),
                   "wait on an epoll set; runtimes pick the variant by signal-mask and timeout needs"),
    CompanionGroup("epoll-create-family", ("epoll_create", "epoll_create1"),
                   "create an epoll set; epoll_create1 is epoll_create with flags"),
    CompanionGroup("dup-family", ("dup", "dup2", "dup3"), "duplicate a descriptor; dup2 is dup3 without flags"),
    CompanionGroup("pipe-family", ("pipe", "pipe2"), "create a pipe; pipe() is pipe2(fds, 0)"),
    CompanionGroup("eventfd-family", ("eventfd", "eventfd2"), "eventfd; glibc calls eventfd2"),
    CompanionGroup("signalfd-family", ("signalfd", "signalfd4"), "signalfd; glibc calls signalfd4"),
    CompanionGroup("inotify-init-family", ("inotify_init", "inotify_init1"),
                   "inotify instance; inotify_init1 is inotify_init with flags"),
    CompanionGroup("accept-family", ("accept", "accept4"), "accept a connection; accept() is accept4(..., 0)"),
    CompanionGroup("process-creation", ("clone", "clone3", "fork", "vfork"),
                   "create a task; glibc >= 2.34 uses clone3 for threads and posix_spawn and falls "
                   "back to clone, fork() is clone(SIGCHLD)"),
    CompanionGroup("wait-family", ("wait4", "waitid"), "wait for a child; libcs and runtimes pick either"),
    CompanionGroup("sleep-family", ("clock_nanosleep", "nanosleep"),
                   "sleep; glibc >= 2.31 implements nanosleep with clock_nanosleep"),
    CompanionGroup("clock-read", ("clock_gettime", "gettimeofday", "time"),
                   "read the clock; served by the vDSO and falling back to whichever syscall the "
                   "libc wraps when the vDSO is unavailable"),
    CompanionGroup("rlimit-family", ("getrlimit", "prlimit64", "setrlimit"),
                   "resource limits; glibc implements getrlimit/setrlimit with prlimit64"),
)

GROUP_OF: dict[str, CompanionGroup] = {m: g for g in GROUPS for m in g.members}
BY_NAME: dict[str, CompanionGroup] = {g.name: g for g in GROUPS}


def group_of(syscall: str) -> CompanionGroup | None:
    return GROUP_OF.get(syscall)
