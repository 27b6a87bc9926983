"""Test tiers.

``tests/unit`` and ``tests/golden`` need no root. ``tests/privileged`` needs root, BPF, cgroup v2
and (for some tests) runc. A privileged test skips only where those are missing; with ``CI`` set
in the environment it fails instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _missing_privilege() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (python3-bpfcc); run make setup"
    if not Path("/sys/fs/bpf").is_dir():
        return "needs bpffs"
    return None


def require(reason: str | None) -> None:
    """Skip with ``reason`` (or fail when CI is set) if ``reason`` is not None."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"privileged test cannot run in CI: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/privileged" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.privileged)


def pytest_runtest_setup(item):
    if item.get_closest_marker("privileged"):
        require(_missing_privilege())
        if item.get_closest_marker("runc") and shutil.which("runc") is None:
            require("needs runc; run make setup")


def pytest_configure(config):
    config.addinivalue_line("markers", "runc: needs the runc binary and busybox-static")


# ---- privileged tests clean up their pins ---------------------------------------------------

_PINS = Path("/sys/fs/bpf/envelope")
_pins_before: set[str] = set()


def _pins() -> set[str]:
    try:
        return {p.name for p in _PINS.iterdir()}
    except OSError:
        return set()


def pytest_sessionstart(session):
    _pins_before.update(_pins())


def pytest_sessionfinish(session, exitstatus):
    left = sorted(_pins() - _pins_before)
    if left:
        # Under CI nothing else runs, so a new pin is this session's leak. On a shared machine
        # another run may be creating pins right now: say so, but do not fail for it.
        level = "error" if os.environ.get("CI") else "warning"
        print(f"\n{level}: pinned BPF objects appeared under {_PINS} during the session: "
              f"{', '.join(left)}")
        if os.environ.get("CI"):
            session.exitstatus = 1


@pytest.fixture
def structlog_warnings_to_stderr():
    """Library calls a test makes directly log warnings only, to the stderr of the moment;
    ``envelope.cli.main()`` rebinds structlog to one test's captured stderr, so it is reset after."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=lambda *a: structlog.PrintLogger(sys.stderr))
    yield
    structlog.reset_defaults()
