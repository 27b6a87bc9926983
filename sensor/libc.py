"""The C library, for the system calls Python's ``os`` module does not wrap (``unshare``, ``mount``,
``prctl``, ``capset``, ``statfs``, ``name_to_handle_at``, raw ``syscall`` on Python 3.11). One
handle for the process, errno kept.

Its attributes are shared by every caller, so they stay untyped (``syscall`` returns a long).
A caller that needs argument types takes a prototype of its own with :func:`function`."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
LIBC.syscall.restype = ctypes.c_long


def function(name: str, restype, *argtypes):
    """A typed prototype of libc's ``name`` over the one handle (errno kept), leaving the handle's
    own attribute untyped: ``syscall`` is typed one way for bpf(2), another for perf_event_open."""
    return ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, LIBC))


def checked(what: str, rc: int) -> int:
    """``rc`` of a libc call named ``what``; OSError with the call's errno when it is -1."""
    if rc == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc
