"""Waiting for a condition the system under test reaches on its own time (never asserting a time)."""

from __future__ import annotations

import time


def wait_for(pred, timeout: float = 120.0, what: str = "condition"):
    """Poll ``pred`` every 0.2 s until it returns something true, and return that; fail the test
    naming ``what`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
