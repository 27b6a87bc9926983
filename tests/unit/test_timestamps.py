"""One time format and one duration grammar for every option, file and message."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensor.timestamps import (TimeFormatError, format_duration, iso_time, parse_duration,
                               parse_since, parse_time)


@pytest.mark.parametrize("text,secs", [
    ("90s", 90), ("90m", 5400), ("1h30m", 5400), ("36h", 129600), ("14d", 14 * 86400),
    ("2w", 14 * 86400), ("1.5h", 5400), ("1w2d3h4m5s", 7 * 86400 + 2 * 86400 + 3 * 3600 + 245),
    ("  10M ", 600),
])
def test_durations(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "-1h", "0s", "2h 30m", "30m2h", "1h1h",
                                  "1e3s", "nan", True, None, "1hour"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(TimeFormatError) as err:
        parse_duration(text, "--expires-in")
    assert "\n" not in str(err.value) and str(err.value).startswith("--expires-in: ")


@given(st.integers(min_value=1, max_value=10 ** 8))
def test_format_and_parse_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_times_round_trip_in_utc():
    t = 1795706675
    assert iso_time(t) == "2026-11-26T15:24:35Z"
    assert iso_time(t + 0.25, precise=True) == "2026-11-26T15:24:35.250000Z"
    assert parse_time("2026-11-26T15:24:35Z") == t
    assert parse_time("2026-11-26T16:24:35+01:00") == t
    assert parse_time("2026-11-26T15:24:35") == t  # no offset: UTC
    assert iso_time(None) is None


def test_since_takes_a_duration_back_or_a_time():
    now = 1795706675.0
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2026-11-26T15:24:35Z", now) == 1795706675
    with pytest.raises(TimeFormatError, match="neither a duration"):
        parse_since("yesterday", now)
    assert dt.datetime.fromtimestamp(parse_since("1h", now), dt.timezone.utc).hour == 14
