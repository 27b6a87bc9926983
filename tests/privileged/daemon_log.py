"""Reading a daemon's log while it runs, without a hidden buffer.

``select`` on a pipe and a buffered ``readline`` do not mix: lines that arrive in one chunk sit
in the file object's buffer while ``select`` waits on an empty pipe. This reads the raw fd.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


class LogReader:
    def __init__(self, stream):
        self.fd = stream.fileno()
        self.pending = b""
        self.lines: list[str] = []

    def wait_for(self, word: str, timeout: float = 120.0) -> str:
        """The first line (seen so far or arriving within ``timeout``) that contains ``word``."""
        return self.wait_until(lambda line: word in line, timeout, word)

    def wait_until(self, pred, timeout: float = 120.0, what: str = "a matching line") -> str:
        """The first line (seen so far or arriving within ``timeout``) for which ``pred`` holds."""
        for line in self.lines:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 1)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.pending += chunk
            *done, self.pending = self.pending.split(b"\n")
            fresh = [raw.decode(errors="replace") for raw in done]
            self.lines.extend(fresh)  # every line of the chunk is kept, also past a match
            for line in fresh:
                if pred(line):
                    return line
        raise AssertionError(f"no {what!r} line; saw: {chr(10).join(self.lines)[-2000:]}")


@contextlib.contextmanager
def running_daemon(config: Path, *args: str) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """``envelope --config CONFIG --log-json daemon --metrics-port 0 ARGS...``, once it is ready,
    and the lines it logs after that (drained all along, so it never blocks on a full pipe);
    killed on the way out if the test did not stop it."""
    daemon = subprocess.Popen([sys.executable, "-m", "envelope.cli", "--config", str(config), "--log-json",
                               "daemon", "--metrics-port", "0", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        LogReader(daemon.stderr).wait_for("ready")
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(daemon.stderr), daemon=True).start()
        yield daemon, log
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
