"""Landlock denial visibility without audit: ``bpf/files.c`` in its denial role.

A file access or exec that Landlock refuses fails with ``-EACCES``, and Landlock has no log of
its own unless the node's audit subsystem is enabled (:mod:`enforcer.kernel_audit`). So for each
watched cgroup, the file syscalls' exit tracepoints report every call that failed with
``-EACCES``, with its path as given, the access it asked for, the process and the syscall
(``EV_FILE_DENIAL``). :func:`enforcer.violations.from_file_denial` turns a report into violations:
relative paths are resolved through ``/proc`` (:class:`sensor.proc_paths.ProcPaths`), and what
the policy allows is dropped, because Landlock allows it: that ``EACCES`` was an ordinary
permission check (file mode bits), not the envelope.

One :class:`FileDenialProbe` serves every watched cgroup of an enforcement session
(:meth:`watch`); its records come out of the ``events`` ring buffer
(:attr:`FileDenialProbe.events_fd`). Like the seccomp denial probe it lives as long as its fds.
"""

from __future__ import annotations

import structlog

from sensor.file_observer import FileProbeError, family, read_loss
from sensor.kernel import BpfError, LoadError, Map, load
from sensor.mirrors import FILE_WATCH_ENFORCE, U64, FileWatch

log = structlog.get_logger(__name__)

MAPS = ("watched", "file_loss", "events")


class FileDenialProbeError(Exception):
    """The file denial probe could not be loaded or configured; the message says where."""


class FileDenialProbe:
    """Reports -EACCES from the file syscalls of watched cgroups (see the module docstring)."""

    def __init__(self, max_cgroups: int = 4096, ringbuf_pages: int = 64):
        try:
            self._loaded = load(family("file-denials", ["-DFILES_DENIALS=1"], MAPS,
                                       [f"-DFILES_MAX_CGROUPS={int(max_cgroups)}",
                                        f"-DFILES_RINGBUF_PAGES={int(ringbuf_pages)}"]))
        except (LoadError, FileProbeError) as e:
            raise FileDenialProbeError(str(e)) from e
        self._watched = Map(self._loaded.maps["watched"], "watched")
        self._loss = Map(self._loaded.maps["file_loss"], "file_loss")
        self.events_fd = self._loaded.maps["events"]
        self.watched: set[int] = set()
        log.info("file denial probe loaded")

    def watch(self, cgroup_id: int) -> None:
        try:
            self._watched.update(U64.pack(cgroup_id), FileWatch.pack(mode=FILE_WATCH_ENFORCE))
        except BpfError as e:
            raise FileDenialProbeError(f"watch cgroup {cgroup_id}: {e}") from e
        self.watched.add(cgroup_id)

    def unwatch(self, cgroup_id: int) -> None:
        self._watched.delete(U64.pack(cgroup_id))
        self.watched.discard(cgroup_id)

    def lost(self) -> int:
        """Reports dropped because the ring buffer was full, plus paths that could not be read."""
        loss = read_loss(self._loss)
        return loss["ringbuf_full_denial"] + loss["path_unreadable"]

    def close(self) -> None:
        self._loaded.close()
