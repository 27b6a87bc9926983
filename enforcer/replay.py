"""Replay: what would a policy have denied, judged against recorded evidence?

Runs every behaviour in a profile through :meth:`Policy.admits` and reports the ones enforcement
would deny with their evidence, before anything is enforced ("would this policy have broken us
last week?"); review items whose substrate's review action lets them through are listed apart
(``alerted``: they run and are reported). Behaviours the policy watches are marked, since
detection would alert on them.
Keys a capped profile could not keep are reported as unknown: they happened, and nothing can say
whether the policy allows them. Pure: the caller passes the profile and an optional ``since``.
"""

from __future__ import annotations

from sensor.profile import Profile
from sensor.workload import BehaviourKeyError, substrate_of

from sensor.timestamps import iso_time

from .policy import Policy


def replay(policy: Policy, profile: Profile, since: float | None = None) -> dict:
    """Report the behaviours of ``profile`` (last seen at or after ``since``) the policy denies."""
    stats = profile.behaviours()
    watch = set(policy.watch)
    denied: list[dict] = []
    alerted: list[str] = []
    considered = events = denied_events = 0
    per_sub: dict[str, dict[str, int]] = {}
    for key, s in stats.items():
        if since is not None and s.last_seen < since:
            continue
        try:
            sub = substrate_of(key)
        except BehaviourKeyError:
            sub = key.split(":", 1)[0]  # a kind no substrate encodes: counted, never denied
        row = per_sub.setdefault(sub, {"behaviours": 0, "denied": 0, "events": 0, "deniedEvents": 0})
        considered += 1
        events += s.count
        row["behaviours"] += 1
        row["events"] += s.count
        if policy.allows(key):
            continue
        if policy.admits(key):
            alerted.append(key)
            continue
        denied_events += s.count
        row["denied"] += 1
        row["deniedEvents"] += s.count
        denied.append({
            "key": key,
            "substrate": sub,
            "count": s.count,
            "sessions": s.sessions,
            "firstSeen": iso_time(s.first_seen),
            "lastSeen": iso_time(s.last_seen),
            "watched": key in watch,
        })
    start, end = profile.window()
    overflow = {k: {"count": o.count, "keys": o.new_keys}
                for k, o in profile.overflow().items() if k in policy.substrates and o.count}
    return {
        "policy": policy.metadata_name,
        "policyWorkload": policy.workload.key,
        "profileWorkload": profile.workload.key,
        "sameWorkload": policy.workload == profile.workload,
        "mode": policy.mode,
        "window": {"start": iso_time(start), "end": iso_time(end), "since": iso_time(since)},
        "sessions": profile.session_count,
        "behaviours": considered,
        "events": events,
        "denied": denied,
        "deniedBehaviours": len(denied),
        "alerted": sorted(alerted),
        "deniedEvents": denied_events,
        "bySubstrate": dict(sorted(per_sub.items())),
        "unknownOverflow": overflow,
        "wouldBreak": bool(denied),
    }
