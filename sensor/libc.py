"""The C library, for the few system calls Python's ``os`` module does not wrap (``unshare``,
``mount``, ``prctl``, ``capset`` on Python 3.11). One handle for the process, errno kept."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def checked(what: str, rc: int) -> int:
    """``rc`` of a libc call named ``what``; OSError with the call's errno when it is -1."""
    if rc == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc
