"""Times and durations, written and read one way everywhere.

* :func:`iso_time`: seconds since the epoch as RFC 3339 UTC, ``2026-11-26T15:23:59Z`` (whole
  seconds: policies, evidence, reports); ``precise=True`` keeps microseconds
  (``2026-11-26T15:23:59.123456Z``: audit entries, custom-resource timestamps).
* :func:`parse_time`: an RFC 3339 / ISO 8601 time (``Z`` or an offset; none means UTC) as epoch
  seconds.
* :func:`parse_duration`: the one duration grammar of every option and config value:
  one or more ``<number><unit>`` parts with units ``s``, ``m``, ``h``, ``d``, ``w``, largest
  first, e.g. ``90s``, ``90m``, ``1h30m``, ``36h``, ``14d``, ``2w``, ``1.5h``.
* :func:`parse_since`: a point in time given as a duration back from now (``7d``) or as an
  RFC 3339 time.
* :func:`format_duration`: the inverse, for messages.
"""

from __future__ import annotations

import datetime as _dt
import math
import re

UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
#: The longest duration accepted (100 years): longer ones fall off the calendar datetime can hold.
MAX_DURATION = 100 * 365 * 86400
_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_EXAMPLES = "e.g. 90s, 90m, 1h30m, 36h, 14d, 2w"


class TimeFormatError(ValueError):
    """A time or duration that does not parse; the message is one line naming the input."""


def iso_time(ts: float | None, precise: bool = False) -> str | None:
    """Epoch seconds as RFC 3339 UTC (``None`` stays ``None``)."""
    if ts is None:
        return None
    if precise:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return _dt.datetime.fromtimestamp(math.floor(ts), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: object, what: str = "time") -> _dt.datetime:
    """An RFC 3339 / ISO 8601 time (or a datetime) as an aware datetime; no offset means UTC."""
    if isinstance(text, _dt.datetime):
        return text if text.tzinfo else text.replace(tzinfo=_dt.timezone.utc)
    if not isinstance(text, str):
        raise TimeFormatError(f"{what}: {text!r} is not a time")
    try:
        t = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        t = t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
        t.astimezone(_dt.timezone.utc)  # a time that is off the calendar in UTC fails here
    except (ValueError, OverflowError):
        raise TimeFormatError(f"{what}: {text!r} is not an RFC 3339 time "
                              f"(e.g. 2026-11-26T15:23:59Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def parse_time(text: object, what: str = "time") -> float:
    """An RFC 3339 time as epoch seconds."""
    return parse_datetime(text, what).timestamp()


def parse_duration(text: object, what: str = "duration") -> float:
    """A positive duration in the one grammar (see the module docstring) as seconds."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TimeFormatError(f"{what}: {text!r} is not a duration ({_EXAMPLES})")
    raw = str(text).strip().lower()
    pos, total, last = 0, 0.0, None
    order = list(UNITS)
    for m in _PART.finditer(raw):
        if m.start() != pos:
            break
        unit = m.group(2)
        if last is not None and order.index(unit) <= order.index(last):
            raise TimeFormatError(f"{what}: {text!r}: units must go from largest to smallest, each "
                                  f"once ({_EXAMPLES})")
        total += float(m.group(1)) * UNITS[unit]
        pos, last = m.end(), unit
    if pos != len(raw) or last is None:
        raise TimeFormatError(f"{what}: {text!r} is not a duration ({_EXAMPLES})")
    if not math.isfinite(total) or total <= 0:
        raise TimeFormatError(f"{what}: {text!r} must be longer than zero")
    if total > MAX_DURATION:
        raise TimeFormatError(f"{what}: {text!r} is longer than 100 years")
    return total


def parse_since(text: object, now: float, what: str = "--since") -> float:
    """Epoch seconds for "since": a duration back from ``now`` or an RFC 3339 time."""
    try:
        return now - parse_duration(text, what)
    except TimeFormatError:
        pass
    try:
        return parse_time(text, what)
    except TimeFormatError:
        raise TimeFormatError(f"{what}: {text!r} is neither a duration ({_EXAMPLES}) nor an "
                              f"RFC 3339 time (e.g. 2026-11-26T15:23:59Z)") from None


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; whole seconds, largest units first."""
    s = int(round(seconds))
    if s <= 0:
        return "0s"
    out = []
    for unit, size in UNITS.items():
        if unit == "w":
            continue  # 14d reads better than 2w in messages
        n, s = divmod(s, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
