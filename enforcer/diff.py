"""Diff: what one policy allows that another does not, and why.

Allowed sets are compared entry by entry: syscalls by name, execs by path or pattern, egress by
``(proto, CIDR, port)`` (a port range is one entry), files by pattern, IAM statements by action
and resource, capabilities by name, MCP tools, prompts, resources and argument elements by entry id (an argument element
that changed says what the argument's envelope was or became). Each added entry carries the provenance that
admitted it in the new policy; each removed entry says why it is gone: its substrate was left
out, a wider entry now covers its evidence, it fell below the threshold (it is in review), or it
was not observed at all. Decision changes (mode, closure, substrates, thresholds, fingerprint,
expiry) and review and watch changes are listed too. Pure.
"""

from __future__ import annotations

import dataclasses

from .mcp_envelope import McpAllow, owner_of
from .policy import EgressRule, Policy
from .names import NameRule


def entry_atoms(policy: Policy) -> list[str]:
    """Allowed entries, with exact-port egress rules split into one entry per port."""
    out = [f"syscall:{s}" for s in policy.syscalls]
    for r in policy.egress:
        if r.port_range is not None:
            out.append(r.id)
        else:
            out += [EgressRule(r.proto, r.cidr, (p,)).id for p in r.ports]
    for n in policy.names:
        if n.proto is None or n.port_range is not None:
            out.append(n.id)
        else:
            out += [NameRule(n.pattern, n.proto, (p,), max_labels=n.max_labels).id for p in n.ports]
    out += [f"exec:{e}" for e in policy.execs]
    out += list(policy.files)
    if policy.mcp is not None:
        out += policy.mcp.entries()
    out += [st.id for st in policy.iam]
    out += [f"capability:{c}" for c in policy.capabilities]
    return out


def _argument_entry(atom: str) -> bool:
    return atom.startswith("mcp:") and "#" in atom and not atom.startswith("mcp:resources/read#")


def _argument_path(atom: str) -> str:
    """``mcp:tools/call:T#repo_path:path-prefix:/srv/**`` → ``repo_path``."""
    return atom.partition("#")[2].partition(":")[0]


def _envelope_text(policy: Policy, key: str, path: str) -> str:
    els = policy.mcp.elements_at(key, path) if policy.mcp is not None else ()
    return ", ".join(f"{e.rule} {e.spec}" for e in els)


def _argument_previously(atom: str, a: Policy, review_a: dict) -> str:
    key, path = owner_of(atom), _argument_path(atom)
    if atom in review_a:
        return f"in review in the old policy ({review_a[atom].get('why', '')})"
    if "mcp" not in a.substrates:
        return "substrate mcp not included in the old policy"
    if not a.allows(key):
        return f"{key} was not allowed by the old policy"
    old = _envelope_text(a, key, path)
    return f"argument {path!r} was {old} in the old policy" if old else f"argument {path!r} had no envelope in the old policy"


def _argument_removed(atom: str, b: Policy, review_b: dict) -> str:
    key, path = owner_of(atom), _argument_path(atom)
    if "mcp" not in b.substrates:
        return "substrate mcp is not included in the new policy"
    if not b.allows(key):
        return f"{key} is not allowed by the new policy"
    if atom in review_b:
        return f"below threshold in the new policy (review {atom}: {review_b[atom].get('why', '')})"
    new = _envelope_text(b, key, path)
    return f"argument {path!r} is now {new}" if new else f"argument {path!r} has no envelope in the new policy"


def provenance_of(policy: Policy) -> dict[str, dict]:
    return {p["entry"]: p for p in policy.provenance}


def covering(policy: Policy, behaviour: str) -> list[str]:
    """The entries of ``policy`` that allow ``behaviour``."""
    out = []
    for atom in entry_atoms(policy):
        if _argument_entry(atom):
            continue  # arguments are not behaviours; their tool's entry covers the key
        only = {"syscalls": (), "egress": (), "execs": (), "files": (), "iam": (), "mcp": None, "capabilities": ()}
        probe = dataclasses.replace(policy, **{**only, **_single(policy, atom)})
        if probe.allows(behaviour):
            out.append(atom)
    return out


def _single(policy: Policy, atom: str) -> dict:
    kind, _, rest = atom.partition(":")
    if kind == "syscall":
        return {"syscalls": (rest,)}
    if kind == "exec":
        return {"execs": (rest,)}
    if kind == "file":
        return {"files": (atom,)}
    if kind == "mcp":
        return {"mcp": McpAllow.of_entries([atom])}
    if kind == "iam":
        return {"iam": tuple(st for st in policy.iam if st.id == atom)}
    if kind == "capability":
        return {"capabilities": (rest,)}
    from .policy import parse_entry
    value = parse_entry(atom)[1]
    if isinstance(value, NameRule):
        return {"names": (value,)}
    return {"egress": (value,)}


def _behaviours(prov: dict | None) -> list[str]:
    if not prov:
        return []
    return list((prov.get("evidence") or {}).get("behaviours") or [])


def _summary(prov: dict | None) -> dict:
    if not prov:
        return {"why": "no provenance recorded"}
    ev = prov.get("evidence") or {}
    out = {"rule": prov.get("rule"), "admitted": prov.get("admitted"),
           "count": ev.get("count"), "sessions": ev.get("sessions")}
    if prov.get("reason"):
        out["reason"] = prov["reason"]
    if prov.get("flags"):
        out["flags"] = prov["flags"]
    return out


def diff(a: Policy, b: Policy) -> dict:
    atoms_a, atoms_b = set(entry_atoms(a)), set(entry_atoms(b))
    prov_a, prov_b = provenance_of(a), provenance_of(b)
    review_a = {r["key"]: r for r in a.review}
    review_b_by_behaviour: dict[str, dict] = {}
    for r in b.review:
        for k in (r.get("evidence") or {}).get("behaviours") or []:
            review_b_by_behaviour[k] = r

    added = []
    for atom in sorted(atoms_b - atoms_a):
        item = {"entry": atom, **_summary(prov_b.get(atom))}
        if _argument_entry(atom):
            item["previously"] = _argument_previously(atom, a, review_a)
            added.append(item)
            continue
        behaviours = _behaviours(prov_b.get(atom))
        was_reviewed = sorted({r["key"] for r in a.review
                               if set((r.get("evidence") or {}).get("behaviours") or []) & set(behaviours)})
        if was_reviewed:
            item["previously"] = f"in review in the old policy ({', '.join(was_reviewed)})"
        elif atom.split(":", 1)[0] not in a.substrates and _substrate(atom) not in a.substrates:
            item["previously"] = f"substrate {_substrate(atom)} not included in the old policy"
        elif behaviours and all(a.allows(k) for k in behaviours):
            item["previously"] = "widening: its evidence was already allowed by the old policy"
        added.append(item)

    review_b = {r["key"]: r for r in b.review}
    removed = []
    for atom in sorted(atoms_a - atoms_b):
        prov = prov_a.get(atom)
        behaviours = _behaviours(prov)
        item = {"entry": atom, "was": _summary(prov)}
        if _argument_entry(atom):
            item["why"] = _argument_removed(atom, b, review_b)
            removed.append(item)
            continue
        sub = _substrate(atom)
        if sub not in b.substrates:
            item["why"] = f"substrate {sub} is not included in the new policy"
        elif behaviours and all(b.allows(k) for k in behaviours):
            cover = sorted({c for k in behaviours for c in covering(b, k)})
            item["why"] = f"its evidence is covered by {', '.join(cover)}"
        elif any(k in review_b_by_behaviour for k in behaviours):
            r = next(review_b_by_behaviour[k] for k in behaviours if k in review_b_by_behaviour)
            item["why"] = f"below threshold in the new policy (review {r['key']}: {r.get('why', '')})"
        else:
            item["why"] = "not part of the new policy's evidence"
        removed.append(item)

    decisions = []
    for label, va, vb in (
        ("mode", a.mode, b.mode),
        ("closure", a.closure, b.closure),
        ("substrates", list(a.substrates), list(b.substrates)),
        ("lowConfidence", a.low_confidence, b.low_confidence),
        ("minCount", (a.decisions.get("confidence") or {}).get("minCount"),
         (b.decisions.get("confidence") or {}).get("minCount")),
        ("minSessions", (a.decisions.get("confidence") or {}).get("minSessions"),
         (b.decisions.get("confidence") or {}).get("minSessions")),
        ("closureRules", (a.decisions.get("closure") or {}).get("rules"),
         (b.decisions.get("closure") or {}).get("rules")),
        ("fingerprint", a.validity.get("fingerprint"), b.validity.get("fingerprint")),
        ("mcpCatalog", a.mcp.catalog if a.mcp else None, b.mcp.catalog if b.mcp else None),
        ("expiresAt", a.validity.get("expiresAt"), b.validity.get("expiresAt")),
        ("workload", a.workload.key, b.workload.key),
    ):
        if va != vb:
            decisions.append({"decision": label, "old": va, "new": vb})

    return {
        "old": a.metadata_name,
        "new": b.metadata_name,
        "added": added,
        "removed": removed,
        "decisions": decisions,
        "review": {
            "added": [{"key": k, "why": review_b[k].get("why")} for k in sorted(set(review_b) - set(review_a))],
            "removed": sorted(set(review_a) - set(review_b)),
        },
        "watch": {
            "added": sorted(set(b.watch) - set(a.watch)),
            "removed": sorted(set(a.watch) - set(b.watch)),
        },
        "identical": not added and not removed and not decisions and set(review_a) == set(review_b)
                     and a.watch == b.watch,
    }


def _substrate(atom: str) -> str:
    kind = atom.split(":", 1)[0]
    return {"syscall": "syscall", "exec": "exec", "egress": "egress", "file": "file", "mcp": "mcp",
            "iam": "iam", "capability": "capability"}.get(kind, kind)
