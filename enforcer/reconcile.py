"""Reconciliation: declared policies against observed behaviour, per substrate.

Findings, each backed by the behaviours or the window behind it:

* **would deny** (under-coverage): an observed behaviour no declaration allows (or one
  explicitly denies), with its count, distinct sessions and first and last seen;
* **unused** (over-permission): a grant no observed behaviour in the window used, with how long
  the window was, so "unused" has a meaning;
* **undetermined**: behaviours only grants that cannot be compared with observed keys could
  cover (a podSelector, an endpoint selector, a named port, an IAM condition);
* **blind spots**: what the sensor could not see for this workload (events lost, behaviours
  over the profile's caps, sessions whose identity stayed incomplete, a declared substrate with
  nothing observed, sessions the capability probe did not watch);
* **refused** (capability): checks the kernel refused the workload while it was observed, with
  whether the declarations would grant them (then the workload would run with a privilege it was
  seen to do without).

A declaration made for one container of a pod (a pod spec with several) applies only to the
workload of that container; the others are listed with ``applies: false``.

Several declarations of one substrate combine as Kubernetes combines NetworkPolicies: a behaviour
is allowed when any declaration allows it and none explicitly denies it. A substrate no
declaration constrains is not reported. Pure: a profile and declarations in, a sorted document
out.
"""

from __future__ import annotations

from typing import Iterable

from sensor.profile import Profile
from sensor.timestamps import iso_time
from sensor.workload import BehaviourKeyError, substrate_of

from .declared import Declaration


def _substrate(key: str) -> str | None:
    try:
        return substrate_of(key)
    except BehaviourKeyError:
        return None


def _verdict(d: Declaration, substrate: str, key: str) -> tuple[str, list[str]]:
    """``allow``, ``deny`` or ``undetermined`` for one declaration, with the grants that decided."""
    grants = [g for g in d.grants if g.substrate == substrate]
    denied = [g.id for g in grants if g.effect == "deny" and g.match is not None and g.match(key)]
    if denied:
        return "deny", denied
    allowed = [g.id for g in grants if g.effect == "allow" and g.match is not None and g.match(key)]
    if d.judge is not None and substrate in d.default:
        return ("allow" if d.judge(key) else "deny"), allowed
    if allowed:
        return "allow", allowed
    if any(g.match is None for g in grants):
        return "undetermined", []
    return d.default.get(substrate, "allow"), []


def reconcile(profile: Profile, declarations: Iterable[Declaration], since: float | None = None) -> dict:
    listed = list(declarations)
    decls = [d for d in listed if d.container is None or d.container == profile.workload.container]
    stats = profile.behaviours()
    start, end = profile.window()
    hours = None if start is None or end is None else round((end - start) / 3600.0, 2)
    substrates = sorted({s for d in decls for s in d.default})
    used: dict[tuple[str, str], int] = {}
    per_sub: dict[str, dict] = {}
    for sub in substrates:
        covering = [d for d in decls if sub in d.default]
        keys = sorted(k for k, s in stats.items() if _substrate(k) == sub
                      and (since is None or s.last_seen >= since))
        would_deny, undetermined = [], []
        for key in keys:
            verdicts = [(d, *_verdict(d, sub, key)) for d in covering]
            for d, _v, gids in verdicts:
                for gid in gids:
                    used[(d.source, gid)] = used.get((d.source, gid), 0) + stats[key].count
            explicit = sorted({g for _, v, gids in verdicts if v == "deny" for g in gids})
            outcomes = {v for _, v, _ in verdicts}
            s = stats[key]
            if explicit or ("allow" not in outcomes and "undetermined" not in outcomes):
                would_deny.append({
                    "key": key, "count": s.count, "sessions": s.sessions,
                    "firstSeen": iso_time(s.first_seen), "lastSeen": iso_time(s.last_seen),
                    "deniedBy": sorted({d.source for d, v, _ in verdicts if v == "deny"}),
                    "explicitDeny": explicit,
                })
            elif "allow" not in outcomes:
                undetermined.append({"key": key, "count": s.count, "sessions": s.sessions,
                                     "lastSeen": iso_time(s.last_seen)})
        unused, unjudged = [], []
        for d in covering:
            for g in d.grants:
                if g.substrate != sub or g.effect != "allow":
                    continue
                if g.match is None:
                    unjudged.append({"declaration": d.source, "grant": g.id, "note": g.note})
                elif (d.source, g.id) not in used:
                    unused.append({"declaration": d.source, "grant": g.id, "windowHours": hours,
                                   **({"note": g.note} if g.note else {})})
        if sub == "capability":
            extra = {"refused": _refused(profile, covering, since)}
        else:
            extra = {}
        per_sub[sub] = {
            **extra,
            "declarations": sorted({d.source for d in covering}),
            "observed": len(keys),
            "wouldDeny": would_deny,
            "unused": sorted(unused, key=lambda u: (u["declaration"], u["grant"])),
            "undetermined": undetermined,
            "notJudged": sorted(unjudged, key=lambda u: (u["declaration"], u["grant"])),
            "used": sorted(({"declaration": src, "grant": gid, "count": n}
                            for (src, gid), n in used.items()
                            if any(g.id == gid and g.substrate == sub for d in covering
                                   if d.source == src for g in d.grants)),
                           key=lambda u: (u["declaration"], u["grant"])),
        }
    blind = blind_spots(profile, substrates, per_sub)
    return {
        "workload": profile.workload.key,
        "window": {"start": iso_time(start), "end": iso_time(end), "hours": hours, "since": iso_time(since)},
        "sessions": profile.session_count,
        "declarations": [{"source": d.source, "format": d.format, "substrates": d.substrates,
                          **({"container": d.container, "applies": any(d is x for x in decls)}
                             if d.container is not None else {})}
                         for d in listed],
        "substrates": per_sub,
        "blindSpots": blind,
        "summary": {
            "wouldDeny": sum(len(v["wouldDeny"]) for v in per_sub.values()),
            "unused": sum(len(v["unused"]) for v in per_sub.values()),
            "undetermined": sum(len(v["undetermined"]) for v in per_sub.values()),
            "blindSpots": len(blind),
        },
    }


def _refused(profile: Profile, covering: list[Declaration], since: float | None) -> list[dict]:
    """Refused capability checks seen in the window, and which declarations would grant them."""
    out = []
    for key, r in profile.refused().items():
        if _substrate(key) != "capability" or (since is not None and r.last_seen < since):
            continue
        granted = sorted({d.source for d in covering if _verdict(d, "capability", key)[0] == "allow"})
        out.append({"key": key, "count": r.count, "firstSeen": iso_time(r.first_seen), "lastSeen": iso_time(r.last_seen),
                    "grantedBy": granted})
    return out


def blind_spots(profile: Profile, substrates: list[str], per_sub: dict | None = None) -> list[dict]:
    """What the sensor could not see for this workload, each with what shows it."""
    out: list[dict] = []
    for counter, n in sorted(profile.loss().items()):
        if n:
            out.append({"kind": "loss", "detail": f"{n} {counter}",
                        "meaning": "events the kernel or the decoder dropped while this workload ran"})
    for sub, o in sorted(profile.overflow().items()):
        if o.count:
            out.append({"kind": "overflow", "substrate": sub,
                        "detail": f"{o.new_keys} distinct {sub} behaviours ({o.count} events) over the cap",
                        "meaning": "counted, but which behaviours they were is not known"})
    incomplete = sorted({s.meta.get("identity_incomplete") for s in profile.sessions()
                         if s.meta.get("identity_incomplete")})
    for why in incomplete:
        n = sum(1 for s in profile.sessions() if s.meta.get("identity_incomplete") == why)
        out.append({"kind": "identity", "detail": f"{n} sessions: {why}",
                    "meaning": "evidence of containers whose workload could not be named"})
    for spot in sorted({s.meta.get("blind_spot") for s in profile.sessions() if s.meta.get("blind_spot")}):
        out.append({"kind": "substrate", "detail": spot, "meaning": "reported by the sensor"})
    from sensor.workload import MARKED_SUBSTRATES
    for sub in substrates:
        if sub in MARKED_SUBSTRATES and profile.observed_sessions(sub) < profile.session_count:
            n = profile.session_count - profile.observed_sessions(sub)
            out.append({"kind": "unobserved", "substrate": sub,
                        "detail": f"{n} of {profile.session_count} sessions were recorded without the {sub} probe",
                        "meaning": "what those sessions did on this substrate is not known (a kernel without the "
                                   "probe, or a profile recorded before it)"})
            continue
        if per_sub is not None and per_sub.get(sub, {}).get("observed") == 0:
            out.append({"kind": "unobserved", "substrate": sub,
                        "detail": f"the declarations constrain {sub} but no {sub} behaviour was observed",
                        "meaning": "either the workload never did it, or the sensor cannot see it here "
                                   "(e.g. an invisible TLS stack, DNS over HTTPS, no gateway in front of "
                                   "its tools)"})
    return out
