"""Seccomp denial visibility: the loader for ``bpf/denials.c``.

A syscall that a seccomp filter denies never reaches the ``sys_enter`` tracepoint (seccomp runs
first) but does reach raw ``sys_exit`` with its number and ``-errno``. For each watched cgroup
the program marks every thread's syscall at raw ``sys_enter``; a raw ``sys_exit`` that returns
``-deny_errno`` without a matching mark was stopped before entry, i.e. by seccomp. An ordinary
EPERM from a permission check has entered and is not reported. In alert mode (the filter's
default action is ``SCMP_ACT_LOG``) calls outside the cgroup's allowed set are reported at entry.

One :class:`DenialProbe` serves many cgroups: :meth:`DenialProbe.watch` adds one with its mode,
errno and allowed set; events come out of the ``events`` ring buffer (read them with
:class:`enforcer.egress.RingBufferReader` on :attr:`DenialProbe.events_fd`). The probe is not
pinned: the seccomp filters themselves live in the kernel independently of it, and a restarted
loader re-registers the cgroups it enforces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import structlog

from .egress import RawMap, percpu_sum

log = structlog.get_logger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = BPF_DIR / "denials.c"
NR_SLOTS = 512
MODE_CODES = {"alert": 1, "enforce": 2}


class DenialProbeError(Exception):
    """The denial probe could not be loaded or configured; the message says where."""


def syscall_numbers(names: Iterable[str]) -> list[int]:
    """Native syscall numbers for ``names`` (unknown names are skipped)."""
    import seccomp
    out = []
    for n in names:
        try:
            out.append(int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, n)))
        except (ValueError, TypeError, RuntimeError):
            log.debug("syscall name not known to libseccomp", name=n)
    return sorted(x for x in out if x >= 0)


def syscall_name(nr: int) -> str:
    """The native name of syscall ``nr`` (``nr_<n>`` when libseccomp does not know it)."""
    import seccomp
    try:
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, int(nr))
    except (ValueError, TypeError, RuntimeError):
        return f"nr_{nr}"
    return name.decode() if isinstance(name, bytes) else str(name)


def allowed_bitmap(numbers: Iterable[int]) -> list[int]:
    words = [0] * (NR_SLOTS // 64)
    for nr in numbers:
        if 0 <= nr < NR_SLOTS:
            words[nr // 64] |= 1 << (nr % 64)
    return words


class DenialProbe:
    """raw sys_enter + raw sys_exit programs reporting seccomp denials for watched cgroups."""

    def __init__(self, max_cgroups: int = 1024, max_threads: int = 32768, ringbuf_pages: int = 64):
        try:
            from bcc import BPF
        except ImportError as e:
            raise DenialProbeError("bcc is not importable (install python3-bpfcc)") from e
        cflags = [f"-I{BPF_DIR}", f"-DDENIALS_MAX_CGROUPS={max_cgroups}",
                  f"-DDENIALS_MAX_THREADS={max_threads}", f"-DDENIALS_RINGBUF_PAGES={ringbuf_pages}"]
        try:
            # RAW_TRACEPOINT_PROBE programs attach on construction.
            self._bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise DenialProbeError(f"load {SOURCE} (raw_tracepoint sys_enter/sys_exit): {e}") from e
        self._cgroups = self._bpf[b"cgroups"]
        self.events_fd = self._bpf[b"events"].map_fd
        self._lost = RawMap(os.dup(self._bpf[b"lost"].map_fd), "lost")
        self.watched: dict[int, str] = {}
        log.info("seccomp denial probe loaded")

    def watch(self, cgroup_id: int, mode: str, deny_errno: int, allowed_syscalls: Iterable[str] = ()) -> None:
        """Report for ``cgroup_id``: denials returning ``-deny_errno`` (enforce) or calls outside
        ``allowed_syscalls`` (alert). Observe mode watches nothing."""
        if mode == "observe":
            self.unwatch(cgroup_id)
            return
        if mode not in MODE_CODES:
            raise DenialProbeError(f"unknown mode {mode!r}")
        leaf = self._cgroups.Leaf()
        leaf.mode = MODE_CODES[mode]
        leaf.deny_errno = int(deny_errno)
        for i, w in enumerate(allowed_bitmap(syscall_numbers(allowed_syscalls))):
            leaf.allowed[i] = w
        self._cgroups[self._cgroups.Key(cgroup_id)] = leaf
        self.watched[cgroup_id] = mode

    def unwatch(self, cgroup_id: int) -> None:
        try:
            del self._cgroups[self._cgroups.Key(cgroup_id)]
        except KeyError:
            pass
        self.watched.pop(cgroup_id, None)

    def mode_of(self, cgroup_id: int) -> str | None:
        return self.watched.get(cgroup_id)

    def lost(self) -> int:
        """Reports dropped because the ring buffer was full (summed over CPUs)."""
        return percpu_sum(self._lost, b"\0\0\0\0")

    def close(self) -> None:
        self._lost.close()
        self._bpf.cleanup()
