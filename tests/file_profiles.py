"""Profiles made of file behaviours with exact counts and sessions, for the file-derivation tests
(unit, property and golden), which all derive through :func:`enforcer.derive.derive`."""

from __future__ import annotations

from typing import Mapping

from enforcer.derive import DeriveOptions, derive
from sensor.profile import Profile
from sensor.workload import Workload

T0 = 1_767_225_600.0
W = Workload("agents", "Deployment", "files", "main")


def file_profile(spec: Mapping[str, tuple[int, int, int]], workload: Workload = W) -> Profile:
    """``spec``: behaviour key -> (count, sessions, first session index). The behaviour is seen
    in sessions ``s<first>`` .. ``s<first + sessions - 1>`` (session ``sN`` runs in hour N), its
    count spread over them (the first takes the remainder); ``count >= sessions``."""
    p = Profile(workload)
    node = p.node("n1")
    per_session: dict[int, list[tuple[str, int]]] = {}
    for key, (count, sessions, first) in sorted(spec.items()):
        if count < sessions or sessions < 1:
            raise ValueError(f"{key}: {count} occurrences cannot be spread over {sessions} sessions")
        share, rest = divmod(count, sessions)
        for i in range(sessions):
            per_session.setdefault(first + i, []).append((key, share + (rest if i == 0 else 0)))
    last = max(per_session, default=0)
    for s in range(last + 1):
        sid = f"s{s}"
        start = T0 + s * 3600
        node.open_session(sid, start)
        for key, n in per_session.get(s, []):
            node.observe(sid, key, n, start + 60)
        node.close_session(sid, start + 600)
    node.touch(T0 + (last + 1) * 3600 + 3 * 86400)  # past coverage-stop's trailing day
    return p


def derive_files(spec_or_profile, *, min_count: int = 5, min_sessions: int = 3, **kw):
    """The policy :func:`enforcer.derive.derive` makes with ``--substrates file``."""
    profile = spec_or_profile if isinstance(spec_or_profile, Profile) else file_profile(spec_or_profile)
    opts = DeriveOptions(substrates=("file",), min_count={"file": min_count},
                         min_sessions={"file": min_sessions}, **kw)
    return derive(profile, opts)


def rules(policy) -> dict[str, str]:
    """allowed entry -> the closure rule that admitted it (from provenance)."""
    return {p["entry"]: p["rule"] for p in policy.provenance}


def provenance(policy, entry: str) -> dict:
    return next(p for p in policy.provenance if p["entry"] == entry)
