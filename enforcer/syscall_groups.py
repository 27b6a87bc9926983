"""Syscall groups: the syscall substrate's structural closure, and the syscalls it never widens to.

Structural closure keeps syscalls an exact set, except that an observed member of a named group
below stands for its whole group. A group collects syscalls that do one kind of thing (read the
clock or sleep, wait for children, inspect the filesystem's names and metadata, resize or flush
files, map and remap memory, wait for descriptors, signal processes, ...) with the same kind of
access, so that which member a program calls is decided by its libc, its language runtime or the
code path of the moment, not by what it is allowed to do. A program that reads directories with
``getdents64`` today and ``stat``\\ s a path tomorrow has not changed what it does; a program that
writes files and one day shrinks one with ``ftruncate`` is still writing its files. A policy that
tells such calls apart breaks on the next input and protects nothing.

What a group never does:

* cross a kind of access: reading never admits writing (``file-read`` and ``file-write`` are
  apart), inspecting names never admits changing them (``filesystem-inspect`` and
  ``filesystem-names-write``), reading ids never admits changing them;
* contain a syscall of :data:`DANGEROUS`: those reach into other processes, the kernel or the
  system as a whole (tracing, cross-process memory, mounts, namespaces, BPF, perf, modules,
  kexec, keyrings, io_uring, the clock, ...). Closure never admits one by association: a
  dangerous syscall is allowed only on its own evidence (and then flagged), and a dangerous
  syscall in review is always denied when it recurs, whatever the policy's review actions say.

Groups are disjoint, so a syscall belongs to at most one. Each derived policy lists the groups
it used, with their members and their reason, and every entry a group admitted names the group
in provenance (``syscall-group:NAME``) with the observed members that earned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class SyscallGroup:
    name: str
    members: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "members": list(self.members), "reason": self.reason}


def _g(name: str, members: str, reason: str) -> SyscallGroup:
    return SyscallGroup(name, tuple(sorted(members.split())), reason)


GROUPS: tuple[SyscallGroup, ...] = (
    # ---- files and the filesystem
    _g("file-open", "creat open openat openat2",
       "open a file; libcs implement open() and creat() with openat, and openat2 is openat with "
       "resolve flags; which files is the file substrate's decision"),
    _g("file-read", "lseek pread64 preadv preadv2 read readv",
       "read from a descriptor: plain, vectored or positioned reads and repositioning; the "
       "runtime picks the form by buffer layout and by whether the file offset is shared"),
    _g("file-write", "fallocate fdatasync fsync ftruncate pwrite64 pwritev pwritev2 "
       "sync_file_range truncate write writev",
       "write to a file: data (plain, vectored, positioned), its size (truncate, preallocate) and "
       "flushing it to storage; each needs a descriptor open for writing or a path the caller may "
       "write, so resizing or flushing grants nothing writing did not"),
    _g("filesystem-inspect", "access faccessat faccessat2 fstat fstatfs getdents getdents64 lstat "
       "newfstatat readlink readlinkat stat statfs statx",
       "inspect the filesystem without reading or changing file contents: status and metadata "
       "(glibc >= 2.33 routes stat/lstat/fstat through newfstatat, newer runtimes use statx), "
       "permission checks, symlink targets and directory listings; which one a program calls "
       "depends on its libc and on the code path (a directory walk, a path check)"),
    _g("filesystem-names-write", "link linkat mkdir mkdirat rename renameat renameat2 rmdir "
       "symlink symlinkat unlink unlinkat",
       "create, remove, rename and link names in directories; each needs write access to the "
       "directory, and libcs route the path forms through the *at forms"),
    _g("file-mode", "chmod fchmod fchmodat fchmodat2",
       "change a file's mode; libcs route chmod through fchmodat (fchmodat2 on newer glibc)"),
    _g("file-owner", "chown fchown fchownat lchown", "change a file's owner; libcs route chown and "
       "lchown through fchownat"),
    _g("file-times", "futimesat utime utimensat utimes",
       "set file times; libcs implement utime and utimes with utimensat"),
    _g("file-advice", "fadvise64 readahead", "advise the kernel how a file will be read"),
    _g("file-copy", "copy_file_range sendfile",
       "copy between descriptors inside the kernel instead of read+write; runtimes (Python's "
       "shutil, nginx) pick either by file type"),
    _g("file-watch", "inotify_add_watch inotify_init inotify_init1 inotify_rm_watch",
       "watch files for changes; inotify_init1 is inotify_init with flags"),
    _g("xattr-read", "fgetxattr flistxattr getxattr getxattrat lgetxattr listxattr listxattrat "
       "llistxattr", "read extended attributes, by path, link or descriptor"),
    _g("xattr-write", "fremovexattr fsetxattr lremovexattr lsetxattr removexattr removexattrat "
       "setxattr setxattrat", "set or remove extended attributes, by path, link or descriptor"),
    _g("working-directory", "chdir fchdir getcwd", "read or change the working directory"),
    # ---- descriptors
    _g("descriptor-management", "close close_range dup dup2 dup3 fcntl",
       "close, duplicate and set flags on the process's own descriptors; dup2 is dup3 without "
       "flags and runtimes close ranges with close_range where the kernel has it"),
    _g("polling", "epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait poll "
       "ppoll pselect6 select",
       "wait for descriptors to become ready: poll/select (libcs implement them with "
       "ppoll/pselect6) or an epoll set; event loops pick by platform and timeout needs"),
    _g("pipes", "pipe pipe2", "create a pipe; pipe() is pipe2(fds, 0)"),
    _g("eventfd", "eventfd eventfd2", "eventfd; glibc calls eventfd2"),
    # ---- memory
    _g("memory-mapping", "brk madvise mmap mprotect mremap msync munmap",
       "map, remap, protect, advise and unmap the process's own memory; allocators move between "
       "brk, mmap and mremap by allocation size"),
    _g("memory-locking", "mlock mlock2 mlockall munlock munlockall",
       "lock the process's own pages in memory"),
    _g("memory-protection-keys", "pkey_alloc pkey_free pkey_mprotect",
       "memory protection keys for the process's own pages"),
    # ---- time
    _g("time-and-sleep", "clock_getres clock_gettime clock_nanosleep gettimeofday nanosleep time",
       "read the clock or sleep; the clock is served by the vDSO and falls back to whichever "
       "syscall the libc wraps, and glibc >= 2.31 implements nanosleep with clock_nanosleep"),
    _g("timers", "alarm getitimer setitimer timer_create timer_delete timer_getoverrun "
       "timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime",
       "the process's own timers: interval timers, POSIX timers and timerfds"),
    # ---- processes and threads
    _g("process-creation", "clone clone3 fork vfork",
       "create a task; glibc >= 2.34 uses clone3 for threads and posix_spawn and falls back to "
       "clone, fork() is clone(SIGCHLD)"),
    _g("child-wait", "wait4 waitid",
       "wait for a child to change state; libcs and runtimes pick either (a reaper may run once "
       "per session, or never when no child exited in time)"),
    _g("thread-setup", "get_robust_list rseq set_robust_list set_tid_address",
       "per-thread set-up that glibc and the runtime do at thread start"),
    _g("thread-synchronisation", "futex futex_requeue futex_wait futex_waitv futex_wake",
       "wait on and wake futexes; futex_wait/futex_wake/futex_requeue are split-out futex operations"),
    _g("signal-handling", "pause rt_sigaction rt_sigpending rt_sigprocmask rt_sigreturn "
       "rt_sigsuspend rt_sigtimedwait sigaltstack signalfd signalfd4",
       "the process's own signal dispositions, masks and waits"),
    _g("signal-sending", "kill pidfd_send_signal rt_sigqueueinfo rt_tgsigqueueinfo tgkill tkill",
       "send a signal to a process or a thread; the runtime picks the form by target (tgkill for "
       "a thread, kill for a process group of workers), with the same permission check; where the "
       "Landlock ruleset is applied its signal scope confines the targets to the workload's own "
       "processes"),
    _g("process-identity-read", "getegid geteuid getgid getgroups getpgid getpgrp getpid getppid "
       "getresgid getresuid getsid gettid getuid",
       "read the process's own ids; changing them is not part of this group"),
    _g("resource-limits", "getrlimit prlimit64 setrlimit",
       "resource limits; glibc implements getrlimit/setrlimit with prlimit64"),
    _g("resource-usage", "getrusage times", "the process's own resource usage"),
    _g("scheduling-read", "sched_get_priority_max sched_get_priority_min sched_getaffinity "
       "sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval sched_yield",
       "read scheduling parameters or yield; thread pools size themselves from the affinity mask"),
    _g("system-info", "getcpu sysinfo uname", "read what machine and CPU the process runs on"),
    # ---- sockets (destinations are the egress substrate's decision)
    _g("socket-accept", "accept accept4", "accept a connection; accept() is accept4(..., 0)"),
    _g("socket-receive", "recvfrom recvmmsg recvmsg", "receive on a socket; the runtime picks the "
       "form by whether it wants the peer address or ancillary data"),
    _g("socket-send", "sendmmsg sendmsg sendto", "send on a socket; every destination is judged "
       "by the egress programs (sendmsg4/6) where the policy constrains egress"),
    _g("socket-options", "getsockopt setsockopt", "read or set socket options"),
    _g("socket-names", "getpeername getsockname", "read a socket's local or peer address"),
)

GROUP_OF: dict[str, SyscallGroup] = {m: g for g in GROUPS for m in g.members}
BY_NAME: dict[str, SyscallGroup] = {g.name: g for g in GROUPS}


def group_of(syscall: str) -> SyscallGroup | None:
    return GROUP_OF.get(syscall)


def _d(names: str, reason: str) -> dict[str, str]:
    return {n: reason for n in names.split()}


#: Syscalls that closure never admits by association, each with why. A policy allows one only on
#: its own evidence, flagged ``dangerous``; one in review is denied when it recurs.
DANGEROUS: MappingProxyType = MappingProxyType({
    **_d("ptrace", "traces and controls other processes (registers, memory, syscalls)"),
    **_d("process_vm_readv process_vm_writev", "reads or writes another process's memory"),
    **_d("pidfd_getfd", "takes a copy of another process's file descriptor"),
    **_d("kcmp", "compares kernel objects of other processes (a probe for their resources)"),
    **_d("process_madvise process_mrelease migrate_pages move_pages",
         "acts on another process's memory"),
    **_d("mount umount2 pivot_root chroot move_mount open_tree open_tree_attr fsopen fsconfig "
         "fsmount fspick mount_setattr", "changes the mount table or the root directory"),
    **_d("unshare setns", "enters or creates namespaces (the base of container escapes)"),
    **_d("bpf", "loads BPF programs and maps into the kernel"),
    **_d("perf_event_open", "kernel and hardware performance monitoring, a side channel and a "
         "frequent kernel attack surface"),
    **_d("init_module finit_module delete_module create_module query_module get_kernel_syms",
         "loads or removes kernel modules"),
    **_d("kexec_load kexec_file_load reboot", "replaces or restarts the running kernel"),
    **_d("add_key request_key keyctl", "kernel keyrings, shared across processes of a user"),
    **_d("io_uring_setup io_uring_enter io_uring_register",
         "io_uring runs I/O outside the syscall filter's view, and is a frequent kernel attack "
         "surface; allowed only when the workload was seen using it"),
    **_d("userfaultfd", "handles page faults in userspace, a staple of kernel exploits"),
    **_d("open_by_handle_at name_to_handle_at",
         "opens files by handle, bypassing path-based confinement (container escapes)"),
    **_d("swapon swapoff", "system swap"),
    **_d("syslog", "reads or clears the kernel log"),
    **_d("acct", "process accounting for the whole system"),
    **_d("settimeofday clock_settime clock_adjtime adjtimex", "sets the system clock"),
    **_d("sethostname setdomainname", "sets the system's names"),
    **_d("iopl ioperm", "direct access to I/O ports"),
    **_d("quotactl quotactl_fd", "filesystem quotas"),
    **_d("nfsservctl lookup_dcookie uselib _sysctl vhangup ustat sysfs",
         "obsolete interfaces with a history of kernel bugs"),
    **_d("personality", "changes the execution domain (can turn off address randomisation)"),
    **_d("fanotify_init fanotify_mark", "watches and intercepts file access system-wide"),
    **_d("lsm_set_self_attr", "changes the process's security-module attributes"),
    **_d("mknod mknodat", "creates device nodes (with CAP_MKNOD)"),
    **_d("modify_ldt", "changes the local descriptor table, a frequent kernel attack surface"),
})


def dangerous(syscall: str) -> str | None:
    """Why ``syscall`` is never admitted by association, or None for an ordinary syscall."""
    return DANGEROUS.get(syscall)
