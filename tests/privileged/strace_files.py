"""File and exec behaviours of a command, recorded with strace (the real tool), for the Landlock
scenario tests. It stands in for the kernel's file observation, which is built elsewhere, and
emits the same behaviour keys (:mod:`enforcer.file_patterns`): every successful open with its
access (the fd's resolved path from ``strace -y``), ``list`` for a directory opened, ``create``
for ``O_CREAT``, ``truncate`` for ``O_TRUNC``, ``mkdir``, ``remove`` for unlink, and
``exec:PATH`` for each successful ``execve`` (the path as given).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from collections import Counter

_DIRFD = r"(?:AT_FDCWD(?:<[^>]*>)?|\d+<[^>]*>)"
_OPEN = re.compile(r'^(?:openat\(' + _DIRFD + r', |open\()"(?P<path>(?:[^"\\]|\\.)*)", (?P<flags>[A-Z_|]+)'
                   r'.*\) = (?P<fd>\d+)<(?P<resolved>[^>]*)>')
_EXEC = re.compile(r'^execve\("(?P<path>(?:[^"\\]|\\.)*)", .*\) = 0$')
_MKDIR = re.compile(r'^(?:mkdir\(|mkdirat\(' + _DIRFD + r', )"(?P<path>[^"]*)", .*\) = 0$')
_UNLINK = re.compile(r'^(?:unlink\(|unlinkat\(' + _DIRFD + r', )"(?P<path>[^"]*)"(?:, 0)?\) = 0$')
TRACE = "trace=open,openat,execve,mkdir,mkdirat,unlink,unlinkat"


def record(argv: list[str], out_prefix: str, env: dict | None = None, cwd: str | None = None) -> tuple[Counter, subprocess.CompletedProcess]:
    """Run ``argv`` under ``strace -f``; the behaviour keys it produced, with counts."""
    for old in glob.glob(out_prefix + ".*"):
        os.unlink(old)
    proc = subprocess.run(["strace", "-ff", "-qq", "-y", "-s", "4096", "-e", TRACE, "-e", "signal=none",
                           "-o", out_prefix, "--", *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)
    keys: Counter = Counter()
    for path in sorted(glob.glob(out_prefix + ".*")):
        with open(path) as f:
            for line in f:
                keys.update(parse_line(line.rstrip("\n")))
        os.unlink(path)
    return keys, proc


def parse_line(line: str) -> list[str]:
    m = _OPEN.match(line)
    if m:
        flags = set(m["flags"].split("|"))
        p = m["resolved"]
        if "O_PATH" in flags or not p.startswith("/"):
            return []
        if "O_DIRECTORY" in flags or os.path.isdir(p):
            return [f"file:list:{p}"]
        out = []
        if "O_WRONLY" in flags or "O_RDWR" in flags:
            out.append(f"file:write:{p}")
        if "O_WRONLY" not in flags:
            out.append(f"file:read:{p}")
        if "O_CREAT" in flags:
            out.append(f"file:create:{p}")
        if "O_TRUNC" in flags:
            out.append(f"file:truncate:{p}")
        return out
    m = _EXEC.match(line)
    if m:
        return [f"exec:{m['path']}"]
    m = _MKDIR.match(line)
    if m and m["path"].startswith("/"):
        return [f"file:mkdir:{os.path.normpath(m['path'])}"]
    m = _UNLINK.match(line)
    if m and m["path"].startswith("/"):
        return [f"file:remove:{os.path.normpath(m['path'])}"]
    return []
