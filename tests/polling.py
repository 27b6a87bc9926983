"""Polling for a condition the code under test reaches on its own time, in its own thread or
process. The timeout only stops a hung test; it is never what a test asserts."""

from __future__ import annotations

import time


def until(cond, timeout: float = 30.0, interval: float = 0.01) -> bool:
    """Poll ``cond`` every ``interval`` seconds; True once it holds, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
