"""The three modes, defined once for every substrate.

``observe``
    nothing is restricted; behaviour is recorded (the profile keeps growing).
``alert``
    nothing is restricted; what the policy would deny is reported as a violation with action
    ``alerted``.
``enforce``
    what the policy does not allow is refused (EPERM for syscalls and connects) and reported as a
    violation with action ``denied``.

Detection (watch list, probabilistic rules) keeps running in every mode but observe.
"""

from __future__ import annotations

MODES = ("observe", "alert", "enforce")
DEFAULT_MODE = "observe"  # a workload with no recorded state is only observed


def check_mode(mode: object, what: str = "mode", error: type[Exception] = ValueError) -> str:
    """``mode`` if it is one of :data:`MODES`; else ``error("<what>: 'x' is not one of ...")``."""
    if mode not in MODES:
        raise error(f"{what}: {mode!r} is not one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]
