"""Validity: is a policy still valid for what the workload runs now?

A policy records the fingerprint its evidence was gathered under (``spec.decisions.validity``):
per key (``image``, ``model``, ``prompt_template``, ``tool_catalog``, ``identity``, ...) the values
seen during the observation window, the re-derivation triggers that follow from them, and an
optional expiry. :func:`check` compares a current fingerprint and a time against that record and
reports every trigger, fired or not. It is pure: the caller supplies ``now``.

Rules:

- a fingerprint key whose current value is not among the recorded values fires its trigger;
- a current key the policy never recorded fires ``<key>-change`` too: the policy was derived
  without knowing it, so it cannot vouch for it;
- a recorded key with no current value is reported as ``unchecked`` and does not fire;
- ``pod_template_hash`` is informational: a change is reported, never fired (each dimension a
  rollout can change has its own trigger);
- the expiry trigger fires once ``now`` is at or past ``expiresAt``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Mapping

from .derive import INFORMATIONAL_FINGERPRINTS, trigger_name
from sensor.timestamps import iso_time

from .policy import Policy


def _trigger_name(policy: Policy, key: str) -> str:
    for t in policy.validity.get("triggers") or []:
        if t.get("key") == key:
            return str(t.get("name"))
    return trigger_name(key)


def check(policy: Policy, current: Mapping[str, str], now: float | None = None) -> dict:
    """Every trigger with whether it fired; ``stale`` when any did."""
    recorded: dict[str, list[str]] = {k: list(v) for k, v in (policy.validity.get("fingerprint") or {}).items()}
    results: list[dict] = []
    for key in sorted(set(recorded) | set(current)):
        name = _trigger_name(policy, key)
        was = recorded.get(key)
        cur = current.get(key)
        item = {"trigger": name, "key": key, "recorded": was or [], "current": cur}
        if key in INFORMATIONAL_FINGERPRINTS:
            if cur is not None and was is not None and cur not in was:
                item.update(fired=False, status="info", reason=f"{key} changed to {cur!r} (informational, not a trigger)")
                results.append(item)
            continue
        if cur is None:
            item.update(fired=False, status="unchecked", reason="no current value given")
        elif was is None:
            item.update(fired=True, status="fired",
                        reason=f"{key} was not part of the fingerprint at derivation; now {cur!r}")
        elif cur in was:
            item.update(fired=False, status="ok", reason=f"{key} {cur!r} matches")
        else:
            item.update(fired=True, status="fired",
                        reason=f"{key} changed: derived against {', '.join(repr(v) for v in was)}, now {cur!r}")
        results.append(item)
    expires = policy.expires_at()
    if expires is not None:
        at = iso_time(expires.timestamp())
        item = {"trigger": "expiry", "key": None, "recorded": [at], "current": iso_time(now)}
        if now is None:
            item.update(fired=False, status="unchecked", reason="no current time given")
        elif now >= expires.timestamp():
            item.update(fired=True, status="fired", reason=f"expired at {at}")
        else:
            left = (expires.timestamp() - now) / 3600.0
            item.update(fired=False, status="ok", reason=f"valid until {at} ({left:.1f} h left)")
        results.append(item)
    return {
        "policy": policy.metadata_name,
        "workload": policy.workload.key,
        "derivedAt": policy.validity.get("derivedAt"),
        "stale": any(r["fired"] for r in results),
        "triggers": results,
    }


def now_seconds() -> float:
    """The wall clock, for callers at the edge (the CLI)."""
    return _dt.datetime.now(_dt.timezone.utc).timestamp()
