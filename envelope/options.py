"""Parsers for command-line option values shared by several commands.

Each raises :class:`~envelope.errors.UserError` with one line naming the option. Durations and
times use the one grammar of :mod:`sensor.timestamps`.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from sensor.timestamps import TimeFormatError, parse_duration, parse_since
from sensor.workload import SUBSTRATES

from .errors import UserError


def thresholds(values: Iterable[str] | None, default: int | Mapping[str, int], what: str) -> dict[str, int]:
    """``["5"]`` sets every substrate; ``["egress=2"]`` one. Later values win. ``default`` is one
    value for every substrate or a value per substrate."""
    out = {s: (default[s] if isinstance(default, Mapping) else default) for s in SUBSTRATES}
    for raw in values or ():
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            sub, eq, num = part.rpartition("=")
            try:
                n = int(num)
            except ValueError:
                raise UserError(f"{what}: {part!r} is not an integer (use N or SUBSTRATE=N)") from None
            if n < 0:
                raise UserError(f"{what}: {n} is negative; thresholds must be 0 or more")
            if eq:
                if sub not in SUBSTRATES:
                    raise UserError(f"{what}: unknown substrate {sub!r} (want one of {', '.join(SUBSTRATES)})")
                out[sub] = n
            else:
                out = {s: n for s in SUBSTRATES}
    return out


def choices(values: Iterable[str] | None, allowed: Iterable[str], what: str) -> dict[str, str]:
    """``["syscall=alert", "egress=deny"]`` as {substrate: choice}; each value one of ``allowed``."""
    allowed = tuple(allowed)
    out: dict[str, str] = {}
    for raw in values or ():
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            sub, eq, v = part.partition("=")
            if not eq:
                raise UserError(f"{what}: {part!r} is not SUBSTRATE=VALUE")
            if sub not in SUBSTRATES:
                raise UserError(f"{what}: unknown substrate {sub!r} (want one of {', '.join(SUBSTRATES)})")
            if v not in allowed:
                raise UserError(f"{what}: {v!r} for {sub} is not one of {', '.join(allowed)}")
            out[sub] = v
    return out


def pairs(values: Iterable[str] | None, what: str) -> dict[str, str]:
    """``["model=v3", "image=sha256:..."]`` as a dict (the value may contain ``=``)."""
    out: dict[str, str] = {}
    for raw in values or ():
        k, eq, v = str(raw).partition("=")
        if not eq or not k.strip():
            raise UserError(f"{what}: {raw!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


def duration(text: str, what: str) -> float:
    """A duration option (``90m``, ``1h30m``, ``14d``, ``2w``) in seconds."""
    try:
        return parse_duration(text, what)
    except TimeFormatError as e:
        raise UserError(str(e)) from None


def since(text: str, now: float, what: str = "--since") -> float:
    """A ``--since`` option: a duration back from now or an RFC 3339 time, as epoch seconds."""
    try:
        return parse_since(text, now, what)
    except TimeFormatError as e:
        raise UserError(str(e)) from None
