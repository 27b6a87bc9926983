"""``envelope explain POLICY``: every allowed entry with the evidence and closure rule behind it.

Answers "show me a policy you generated, and the closure rule that produced it": the four
decisions, each allowed entry with its rule and evidence (or the admit reason), the review and
watch lists, the validity fingerprint and triggers, and the coverage-stop numbers. IAM statements
are listed with their access level, the closure rule of their resource pattern, the operations
that needed each action and how the action was found.
"""

from __future__ import annotations

import sys

from enforcer.derive import human_hours
from enforcer.diff import entry_atoms, provenance_of
from enforcer.policy import Policy

from ..output import add_output_option, dump, table
from .derive import read_policy


def register(sub) -> None:
    p = sub.add_parser("explain", help="show a policy's decisions and the evidence behind each entry",
                       description=__doc__.splitlines()[0])
    p.add_argument("policy", help="policy file (YAML or JSON)")
    add_output_option(p)
    p.set_defaults(func=cmd_explain)


def explanation(policy: Policy) -> dict:
    prov = provenance_of(policy)
    statements = {st.id: st for st in policy.iam}
    allowed = []
    for atom in entry_atoms(policy):
        p = prov.get(atom)
        if p is None:
            allowed.append({"entry": atom, "rule": None, "admitted": None,
                            "note": "no provenance: entry was not produced by derivation"})
            continue
        ev = p.get("evidence") or {}
        item = {"entry": atom, "substrate": p.get("substrate"), "rule": p.get("rule"),
                "admitted": p.get("admitted"), "observed": p.get("observed"),
                "count": ev.get("count"), "sessions": ev.get("sessions"),
                "firstSeen": ev.get("firstSeen"), "lastSeen": ev.get("lastSeen"),
                "behaviours": ev.get("behaviours") or []}
        for k in ("reason", "detail", "flags", "addresses"):
            if p.get(k):
                item[k] = p[k]
        if ev.get("values"):
            item["values"] = ev["values"]  # MCP argument elements: the values they were derived from
        if atom in statements:
            st = statements[atom]
            item.update(action=st.action, resource=st.resource, accessLevel=st.access_level)
        allowed.append(item)
    decisions = policy.to_dict()["spec"]["decisions"]  # with mode, substrates and validity filled in
    conf = decisions.get("confidence") or {}
    clos = decisions.get("closure") or {}
    return {
        "policy": policy.metadata_name,
        "workload": policy.workload.key,
        "iamIdentity": policy.iam_identity if "iam" in policy.substrates else None,
        "mode": policy.mode,
        "lowConfidence": policy.low_confidence,
        "decisions": {
            "granularity": {"substrates": list(policy.substrates),
                            "blindSpots": (policy.decisions.get("granularity") or {}).get("blindSpots", {}),
                            "excluded": (policy.decisions.get("granularity") or {}).get("excluded", []),
                            "unencoded": (policy.decisions.get("granularity") or {}).get("unencoded", {}),
                            "unobserved": (policy.decisions.get("granularity") or {}).get("unobserved", {}),
                            "observedSessions": (policy.decisions.get("granularity") or {}).get(
                                "observedSessions", {})},
            "closure": {k: v for k, v in clos.items()},
            "confidence": {k: v for k, v in conf.items() if k != "coverage"},
            "validity": policy.validity,
        },
        "allowed": allowed,
        "review": list(policy.review),
        "watch": list(policy.watch),
        "detection": list(policy.detection),
        "coverage": conf.get("coverage") or {},
        **({"mcpCatalog": dict(policy.mcp.catalog)} if policy.mcp is not None else {}),
    }


def _rules_text(clos: dict) -> list[str]:
    lines = []
    rules = clos.get("rules") or {}
    for sub in ("syscall", "egress", "exec", "capability"):
        r = rules.get(sub)
        if not r:
            continue
        if sub == "egress" and "address" in r:
            a, p = r["address"], r["ports"]
            svc = ", ".join(a.get("serviceCidrs") or []) or "none"
            lines.append(f"egress: {a['rule']} /{a['ipv4Prefix']} (IPv4), /{a['ipv6Prefix']} (IPv6), known "
                         f"service CIDRs: {svc}; {p['rule']}, range when more than {p['rangeAbove']} ports")
            n = r.get("names") or {}
            if "suffixAbove" in n:
                lines.append(f"egress names: exact-name; name-suffix (*.suffix) when more than "
                             f"{n['suffixAbove']} names under a suffix, at most {n['maxLabels']} "
                             f"label(s) in front, {n['publicSuffixList']}")
            if r.get("resolvers"):
                lines.append(f"egress resolvers: {r['resolvers']['rule']} (one exact address each)")
        elif sub == "exec" and "siblingsAbove" in r:
            lines.append(f"exec: {r['rule']} when more than {r['siblingsAbove']} siblings, else exact")
        elif sub == "capability" and "structural" in r:
            lines.append(f"capability: {r['structural']}")
        else:
            lines.append(f"{sub}: {r.get('rule')}")
    m = rules.get("mcp")
    if m:
        a = m.get("arguments") or {}
        text = f"mcp: {m.get('rule')}; arguments: {', '.join(a.get('rules') or [])}"
        if "enumAbove" in a:
            text += f" (enumeration up to {a['enumAbove']} values, directory prefix above {a['siblingsAbove']} siblings)"
        lines.append(text)
    iam = rules.get("iam")
    if iam:
        res = iam.get("resources") or {}
        parts = []
        for name, params in res.items():
            if name == "name-variant-prefix":
                parts.append(f"{name} ({', '.join(params.get('variables', []))}; stem >= {params.get('minStem')})")
            elif name == "key-prefix":
                parts.append(f"{name} (more than {params.get('siblingsAbove')} keys)")
            else:
                parts.append(name)
        lines.append(f"iam: actions {iam.get('actions')}; resources: {', '.join(parts)}")
        db = iam.get("actionDatabase")
        if db:
            lines.append(f"iam: action database {db['source']} schema {db['schemaVersion']}, {db['serviceModels']}")
    for g in clos.get("syscallGroups") or []:
        lines.append(f"syscall group {g['name']}: {', '.join(g['members'])} ({g['reason']})")
    if clos.get("flagged"):
        lines.append(f"flagged widenings: {', '.join(clos['flagged'])}")
    if clos.get("detection"):
        d = clos["detection"]
        lines.append(f"detection: k={d['k']:g} over {d['closedSessions']} closed sessions; {d['rule']}")
    return lines


def render_text(x: dict) -> str:
    out = []
    d = x["decisions"]
    conf, clos, val = d["confidence"], d["closure"], d["validity"]
    flag = "  LOW CONFIDENCE: derived before coverage-stop (forced)" if x["lowConfidence"] else ""
    out.append(f"Policy {x['policy']} for {x['workload']}: mode {x['mode']}, closure {clos.get('mode')}{flag}")
    out.append("")
    out.append("Decisions")
    out.append(f"  granularity: {', '.join(d['granularity']['substrates'])}"
               + (f" (excluded: {', '.join(d['granularity']['excluded'])})" if d["granularity"]["excluded"] else "")
               + ("; observed kinds no substrate encodes: "
                  + ", ".join(f"{k} ({n})" for k, n in d["granularity"]["unencoded"].items())
                  if d["granularity"]["unencoded"] else ""))
    for sub, why in sorted(d["granularity"].get("unobserved", {}).items()):
        out.append(f"    {sub} left out: {why}")
    for sub, n in sorted(d["granularity"].get("observedSessions", {}).items()):
        out.append(f"    {sub} observed in {n['observed']} of {n['sessions']} sessions only; what the others did "
                   f"with it is not known")
    out.append(f"  closure: {clos.get('mode')}")
    out += [f"    {line}" for line in _rules_text(clos)]
    mc, ms = conf.get("minCount") or {}, conf.get("minSessions") or {}
    out.append("  confidence: " + ("; ".join(f"{s} >= {mc[s]} occurrences over >= {ms.get(s)} sessions" for s in mc)
                                   or "not recorded (policy not produced by derivation)"))
    sr = conf.get("sessionRule")
    if isinstance(sr, dict):
        out.append(f"    session rule {sr.get('rule')}: {sr.get('meaning')}")
    fp = val.get("fingerprint") or {}
    out.append(f"  validity: derived at {val.get('derivedAt') or 'unknown'}, expires {val.get('expiresAt') or 'never'}")
    out.append("    fingerprint: " + (", ".join(f"{k}={'|'.join(v)}" for k, v in fp.items()) or "none"))
    out.append("    triggers: " + (", ".join(t.get("name", "?") for t in val.get("triggers") or []) or "none"))
    if val.get("untracked"):
        out.append(f"    untracked (changes cannot be detected): {', '.join(val['untracked'])}")
    out.append("")
    out.append(f"Allowed ({len(x['allowed'])} entries)")
    rows = []
    iam = [a for a in x["allowed"] if a.get("accessLevel")]
    for a in x["allowed"]:
        if a.get("accessLevel"):
            continue
        why = a.get("reason") and f"admit: {a['reason']}" or a.get("detail") or a.get("note") or ""
        if a.get("addresses"):
            why = "; ".join(x for x in (why, "resolved to " + ", ".join(a["addresses"])) if x)
        if a.get("values"):
            shown = ", ".join(a["values"][:4]) + (" ..." if len(a["values"]) > 4 else "")
            why += f" (seen: {shown})"
        if a.get("flags"):
            why = f"[FLAGGED {','.join(a['flags'])}] " + why
        seen = "" if a.get("observed", True) else " (by its group)"
        rows.append([a["entry"] + seen, a.get("rule"), a.get("admitted"), a.get("count"), a.get("sessions"),
                     a.get("firstSeen"), a.get("lastSeen"), why])
    if rows or not iam:
        out.append(table(rows, ["entry", "rule", "admitted", "count", "sessions", "first seen", "last seen",
                                "evidence"]).rstrip("\n"))
    if iam or "iam" in d["granularity"]["substrates"]:
        out.append("")
        out.append(f"IAM statements ({len(iam)}) for {x.get('iamIdentity') or 'no known role'}")
        for a in iam:
            admitted = f"admit: {a['reason']}" if a.get("reason") else a.get("admitted")
            flags = f"  [FLAGGED {','.join(a['flags'])}]" if a.get("flags") else ""
            out.append(f"  {a['accessLevel']:<6} {a['action']}  {a['resource']}{flags}")
            out.append(f"         rule {a.get('rule')}; {admitted}; {a.get('count')} occurrences over "
                       f"{a.get('sessions')} sessions, {a.get('firstSeen')} to {a.get('lastSeen')}"
                       + ("" if a.get("observed", True) else "; admitted with the action it depends on"))
            for part in (a.get("detail") or "").split("; "):
                if part:
                    out.append(f"         {part}")
    out.append("")
    out.append(f"Review ({len(x['review'])} below threshold, neither allowed nor dropped; behaviours are watched)")
    rows = []
    for r in x["review"]:
        ev = r.get("evidence") or {}
        rows.append([r["key"], r.get("rule"), ev.get("count"), ev.get("sessions"), ev.get("firstSeen"),
                     ev.get("lastSeen"), r.get("why"), r.get("action") or "deny"])
    if rows:
        out.append(table(rows, ["key", "rule", "count", "sessions", "first seen", "last seen", "why",
                                "on recurrence"]).rstrip("\n"))
    actions = (x["decisions"]["confidence"].get("reviewActions") or {})
    if actions:
        out.append("  on recurrence, per substrate: " + ", ".join(f"{s} {a}" for s, a in actions.items())
                   + " (alert: let through and reported; deny: denied where enforced, and reported; "
                     "dangerous syscalls always deny)")
    spots = d["granularity"].get("blindSpots") or {}
    if spots:
        n = sum(len(v) for v in spots.values())
        out.append("")
        out.append(f"Blind spots ({n}: what the sensor cannot see for this workload)")
        out.append(table([[sub, item] for sub, items in sorted(spots.items()) for item in items],
                         ["substrate", "blind spot"]).rstrip("\n"))
    out.append("")
    out.append(f"Watch ({len(x['watch'])}): " + (", ".join(x["watch"]) or "none"))
    if "mcpCatalog" in x:
        out.append("")
        cat = x["mcpCatalog"]
        out.append(f"MCP tool catalog ({len(cat)} tool definitions recorded; a changed one makes the policy stale)")
        out += [f"  {name}: {h}" for name, h in cat.items()]
    if x["detection"]:
        out.append("")
        out.append(f"Detection ({len(x['detection'])} soft rules)")
        out.append(table([[r["key"], f"{r['mean']:g}", f"{r['std']:g}", f"{r['k']:g}", r["sessions"]]
                          for r in x["detection"]], ["key", "mean", "std", "k", "sessions"]).rstrip("\n"))
    cov = x["coverage"]
    if cov:
        out.append("")
        new = ", ".join(f"{s} {n}" for s, n in (cov.get("newBehaviours") or {}).items())
        state = "reached" if cov.get("reached") else ("NOT reached (forced)" if cov.get("forced") else "NOT reached")
        out.append(f"Coverage-stop: {state}; new behaviours in the last {cov.get('hours', 24):g} h: {new} "
                   f"(threshold: fewer than {cov.get('threshold', 1):g})")
        w = cov.get("window") or {}
        out.append(f"  window {w.get('start')} to {w.get('end')} ({human_hours(w.get('hours'))}), {cov.get('sessions')} "
                   f"sessions ({cov.get('closedSessions')} closed)")
        if cov.get("remainingHours"):
            out.append("  still needed without new behaviours: "
                       + ", ".join(f"{s} {human_hours(h)}" for s, h in cov["remainingHours"].items()))
        if cov.get("overflowKeys"):
            out.append("  keys over the cardinality cap: "
                       + ", ".join(f"{s} {n}" for s, n in cov["overflowKeys"].items()))
        if cov.get("loss"):
            out.append("  events lost while recording: " + ", ".join(f"{k} {v}" for k, v in cov["loss"].items()))
    return "\n".join(out) + "\n"


def cmd_explain(args, config) -> int:
    policy = read_policy(args.policy)
    x = explanation(policy)
    if args.output == "table":
        sys.stdout.write(render_text(x))
    else:
        sys.stdout.write(dump(x, args.output))
    sys.stdout.flush()
    return 0
