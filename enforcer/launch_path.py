"""The launch's own ``execve``: the one a seccomp filter without exec entries admits.

``envelope exec`` loads the command's seccomp filter in its child and then execs the command, so
the filter has to let that ``execve`` through. When the policy allows no program to be exec'd,
nothing else may pass: an ``execve`` from the confined code (an injected ``/bin/sh``) must be
denied. A filter sees only syscall arguments, not the path they point to, so the rule
(:func:`enforcer.seccomp.profile_for`, target ``exec``) admits ``execve`` only when its path
argument is one address: a buffer that this module maps at a random address (and a random
offset inside it) before the filter is built. The confined program never learns the address
(it is in the filter only, which takes CAP_SYS_ADMIN and ptrace to read back, and ptrace is
denied); its ``execve`` calls pass their own pointers and get EPERM, reported as denials. The
buffer is private to the launching process: ``execve`` replaces the address space, so after
the launch the page no longer exists.

The argument and environment arrays are built before the fork too, so that between loading the
filter and ``execve`` the child allocates nothing.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from typing import Mapping, NoReturn, Sequence

from sensor.libc import function

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")
# Where the buffer may go on x86_64: above the usual heap and below the stack and libraries
# (47-bit user space); MAP_FIXED_NOREPLACE refuses an address already in use.
_LOW, _HIGH = 0x1000_0000_0000, 0x7000_0000_0000

_mmap = function("mmap", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                 ctypes.c_int, ctypes.c_long)
_munmap = function("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_execve = function("execve", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class LaunchPathError(OSError):
    """The launch buffer could not be mapped."""


def _cstrings(items: Sequence[bytes]):
    arr = (ctypes.c_char_p * (len(items) + 1))()
    for i, b in enumerate(items):
        arr[i] = b
    arr[len(items)] = None
    return arr


class LaunchPath:
    """``path`` in a page mapped at a random address; :attr:`pointer` is what the filter admits."""

    def __init__(self, path: str | bytes, argv: Sequence[str | bytes],
                 env: Mapping[str, str] | None = None, tries: int = 16):
        raw = os.fsencode(path)
        if b"\0" in raw:
            raise ValueError("path contains a NUL byte")
        self.path = raw
        self.size = (len(raw) + 1 + PAGE) // PAGE * PAGE + PAGE
        self.base = None
        for _ in range(tries):
            hint = (_LOW + secrets.randbelow((_HIGH - _LOW) // PAGE) * PAGE)
            got = _mmap(hint, self.size, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
            if got not in (None, MAP_FAILED) and got == hint:
                self.base = got
                break
            if got not in (None, MAP_FAILED):  # an old kernel ignoring NOREPLACE placed it elsewhere
                _munmap(got, self.size)
        if self.base is None:
            err = ctypes.get_errno()
            raise LaunchPathError(err, f"cannot map the launch path buffer: {os.strerror(err)}")
        offset = secrets.randbelow(self.size - len(raw) - 1)
        self.pointer = self.base + offset
        ctypes.memmove(self.pointer, raw + b"\0", len(raw) + 1)
        self._argv = _cstrings([os.fsencode(a) for a in argv])
        envb = os.environb if env is None else {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        self._env = _cstrings([k + b"=" + v for k, v in envb.items()])

    def execve(self) -> NoReturn:
        """``execve`` the path through the buffer (in the child, after the filter is loaded)."""
        _execve(self.pointer, ctypes.addressof(self._argv), ctypes.addressof(self._env))
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.base is not None:
            _munmap(self.base, self.size)
            self.base = None
