"""Container-runtime completeness: syscalls a runtime makes after it has loaded the filter.

A container runtime loads the container's seccomp filter inside its own init process and then
keeps running until it ``execve``\\ s the container's command. Every syscall it makes in that gap
passes through the container's filter. A profile that holds only what the container's command
did can therefore never start the container again: this is where recorded profiles of other tools
failed. The compiler adds the set below when the workload is a container (or when asked with
``--runtime runc``) and names the rule ``runtime-completeness:<runtime>`` in its report, one entry
per added syscall, so the addition is visible in provenance and never silent.

The set was measured, not guessed, on this project's reference machine (runc 1.1.5+ds1, go1.19.8,
libseccomp 2.5.4, Linux 6.18, x86_64): a busybox container ran under a profile whose default
action was ``SCMP_ACT_LOG`` with no rules, so every syscall after the filter load was logged to
the kernel log (``type=1326``) with the calling ``comm``; the lines from ``runc:[2:INIT]`` are
the runtime's, the rest the container command's. At least twenty runs each with
``noNewPrivileges`` true and false; a syscall seen in any run is in the set. :func:`measure`
repeats that measurement on any host (root; it reads ``/dev/kmsg`` and lifts the printk rate
limit while it runs), and ``tests/privileged/test_seccomp_runc.py`` re-measures and checks the
set on every run. The set was then confirmed by bisection under ``SCMP_ACT_ERRNO``: dropping any
syscall marked ``required`` below makes ``runc run`` fail (the error runc prints is in the
reason).

Where runc loads the filter depends on ``process.noNewPrivileges``:

* ``true`` (``runc spec``'s default): as late as possible, just before ``execve``. Only the sync
  pipe close, the exec FIFO write and the ``execve`` itself follow.
* ``false`` (the Kubernetes default, since ``allowPrivilegeEscalation`` defaults to true): before
  ``finalizeNamespace``, so closing inherited fds, dropping the capability bounding set,
  ``setgroups``/``setgid``/``setuid``, ``capset`` and ``chdir`` all run under the filter.

The set covers the ``false`` case, which is a superset of the ``true`` case. Go-runtime syscalls
that the init thread made only sometimes (a futex wait when the scheduler parks it, a signal
return after an asynchronous preemption) are in the set, marked ``nondeterministic``: a profile
that depended on their absence would fail one start in a few. A few more that the Go runtime can
make on the init thread (signal masking, back-off sleeps, heap growth) were not seen here and are
in the set as ``precaution``: each would abort an init at random if it ever came.

runc loads the filter without ``SECCOMP_FILTER_FLAG_TSYNC``, so only the init thread is
filtered; the Go runtime's other threads (sysmon, the GC workers) never pass through the filter,
and they end at ``execve`` anyway.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class RuntimeSet:
    """Syscalls one container runtime makes between loading the filter and ``execve``."""

    runtime: str
    measured_with: str
    syscalls: Mapping[str, str]  # name -> why the runtime makes it

    @property
    def rule(self) -> str:
        return f"runtime-completeness:{self.runtime}"

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.syscalls))


RUNC = RuntimeSet(
    runtime="runc",
    measured_with="runc 1.1.5+ds1 (go1.19.8, libseccomp 2.5.4), Linux 6.18 x86_64",
    syscalls=MappingProxyType({
        # finalizeNamespace -> CloseExecFrom: walk /proc/self/fd and set O_CLOEXEC on each fd.
        "openat": "required: open /proc/self/fd and /proc/self/status after the filter load",
        "fstatfs": "required: CloseExecFrom checks /proc/self/fd is on procfs",
        "getdents64": "required: CloseExecFrom reads /proc/self/fd",
        "fcntl": "observed: F_SETFD O_CLOEXEC on inherited fds (failure would leak fds into the container)",
        "close": "required: closing the log and sync pipes ('close log pipe fd')",
        "fstat": "required: setupUser fstat /dev/stdin",
        "newfstatat": "required: setupUser stat /dev/null; exec path lookup",
        "read": "required: read /proc/self/status (capabilities, ambient set)",
        # capabilities and identity
        "capget": "required: reading the current capability sets",
        "capset": "required: 'unable to apply caps' without it",
        "prctl": "required: PR_CAPBSET_DROP per capability, PR_SET_KEEPCAPS around setuid",
        "setgroups": "required: setupUser setgroups",
        "setgid": "required: setupUser setgid",
        "setuid": "required: setupUser setuid",
        "getppid": "required: parent-death signal check after changing identity",
        # working directory
        "getcwd": "required: verifying the working directory is inside the container",
        "chdir": "required: chdir to process.cwd",
        # handing over to the container command
        "write": "required: the exec FIFO write that 'runc start' waits for, and error reports",
        "epoll_ctl": "observed: Go's netpoller deregisters fds on close",
        "getpid": "observed: Go runtime (signal and preemption bookkeeping)",
        "faccessat2": "observed: exec path lookup (falls back to faccessat on older kernels)",
        "faccessat": "fallback of faccessat2 on kernels before 5.8",
        "execve": "required: the final exec of the container command",
        "exit_group": "error path: init exits after reporting a failure",
        # Go runtime on the locked init thread: seen in some runs only
        "futex": "nondeterministic (seen in 7 of 20 runs): the Go scheduler parks the init thread",
        "rt_sigreturn": "nondeterministic (seen in 3 of 20 runs): return from a preemption signal",
        # Go runtime on the locked init thread: not seen here, possible on any run
        "rt_sigprocmask": "precaution: Go signal masking around thread state changes",
        "sigaltstack": "precaution: Go signal stack switch on the init thread",
        "nanosleep": "precaution: Go runtime back-off (usleep) on the init thread",
        "sched_yield": "precaution: Go runtime spin-wait back-off (osyield) on the init thread",
        "tgkill": "precaution: Go preemption signal sent from the init thread",
        "mmap": "precaution: Go heap growth while init allocates",
        "munmap": "precaution: Go heap growth while init allocates",
        "madvise": "precaution: Go heap growth while init allocates",
    }),
)

RUNTIMES: Mapping[str, RuntimeSet] = MappingProxyType({"runc": RUNC})

class UnknownRuntimeError(ValueError):
    """An unknown runtime name."""


def runtime_set(name: str) -> RuntimeSet:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UnknownRuntimeError(
            f"unknown container runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})") from None


def default_runtime(workload_kind: str, workload_namespace: str) -> str | None:
    """The runtime to complete for by default: ``runc`` for containers, none for host units
    (``("host", "Unit", ...)`` workloads run without a container runtime)."""
    if workload_namespace == "host" and workload_kind == "Unit":
        return None
    return "runc"


# ---- measurement (root, real runc) -----------------------------------------------------------

_AUDIT_LINE = re.compile(r'type=1326 .*?comm="(?P<comm>[^"]*)".*?arch=(?P<arch>[0-9a-f]+) '
                         r'syscall=(?P<nr>\d+)')
INIT_COMM = "runc:[2:INIT]"
_AUDIT_ARCH = {"c000003e": "X86_64", "40000003": "X86", "c00000b7": "AARCH64", "40000028": "ARM"}


def parse_seccomp_log(text: str) -> list[tuple[str, str, int]]:
    """``(comm, audit arch hex, syscall nr)`` for each seccomp log line (``type=1326``)."""
    return [(m["comm"], m["arch"], int(m["nr"])) for m in _AUDIT_LINE.finditer(text)]


class KernelLog:
    """New kernel log records from ``/dev/kmsg`` since this object was made (root).

    Seccomp's ``SCMP_ACT_LOG`` lines go to the kernel log when no audit daemon takes them; they
    are printk rate-limited, so the limit is lifted while this is open and put back on close.
    """

    RATELIMIT = Path("/proc/sys/kernel/printk_ratelimit")

    def __init__(self):
        self._saved = self.RATELIMIT.read_text()
        self.RATELIMIT.write_text("0\n")
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> str:
        out = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten before we read them
                continue
            if not rec:
                break
            out.append(rec.decode(errors="replace"))
        return "".join(out)

    def close(self) -> None:
        os.close(self.fd)
        self.RATELIMIT.write_text(self._saved)

    def __enter__(self) -> "KernelLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def logged_syscalls(text: str) -> dict[str, set[str]]:
    """Split seccomp log lines into ``{"runtime": names, "command": names}`` by ``comm``."""
    import seccomp  # Debian python3-seccomp; only needed for number -> name

    out: dict[str, set[str]] = {"runtime": set(), "command": set()}
    for comm, arch, nr in parse_seccomp_log(text):
        attr = _AUDIT_ARCH.get(arch)
        name = seccomp.resolve_syscall(getattr(seccomp.Arch, attr) if attr else seccomp.Arch.NATIVE, nr)
        name = name.decode() if isinstance(name, bytes) else name
        out["runtime" if comm == INIT_COMM else "command"].add(name)
    return out


def measure(bundle: Path, runs: int = 10, container_id: str = "envelope-runtime-measure",
            runc: str = "runc") -> dict[str, dict[str, int]]:
    """Measure which syscalls runc's init and the container command make under the filter.

    ``bundle``'s ``config.json`` must carry ``linux.seccomp`` with ``defaultAction:
    SCMP_ACT_LOG`` and no rules, so every syscall after the filter load is logged. Returns
    ``{"runtime": {name: runs seen}, "command": {name: runs seen}}`` over ``runs`` runs.
    """
    seen: dict[str, Counter] = {"runtime": Counter(), "command": Counter()}
    with KernelLog() as klog:
        for i in range(runs):
            cid = f"{container_id}-{os.getpid()}-{i}"
            klog.read()
            r = subprocess.run([runc, "run", cid], cwd=bundle, capture_output=True, text=True)
            subprocess.run([runc, "delete", "-f", cid], capture_output=True)
            if r.returncode != 0:
                raise OSError(f"runc run {cid} in {bundle} failed ({r.returncode}): {r.stderr.strip()}")
            for side, names in logged_syscalls(klog.read()).items():
                seen[side].update(names)
    return {side: dict(sorted(c.items())) for side, c in seen.items()}
