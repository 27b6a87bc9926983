"""``envelope report``: one self-contained HTML page per workload.

The page holds the coverage curve (new behaviours per hour or day, per substrate, and where
coverage-stop was reached), the policy with its four decisions, every allowed entry with its
closure rule and evidence, the review and watch lists, violations over time, the reconciliation
findings and the blind spots. Plots are drawn with matplotlib as SVG and inlined; styles are
inline too, so the page needs no network to view and prints on paper.

:func:`report_data` gathers what the page shows (pure: a profile, a policy, violations and a
reconciliation in, plain data out); :func:`render` turns it into HTML. Every number on the page
comes from the evidence: nothing is shown that the data does not hold.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections import Counter
from typing import Iterable

from sensor.timestamps import format_duration, iso_time
from sensor.workload import BehaviourKeyError, substrate_of

HOUR = 3600.0
DAY = 86400.0
COLOURS = {"syscall": "#4c72b0", "egress": "#dd8452", "exec": "#55a868", "file": "#c44e52",
           "http": "#8172b3", "mcp": "#937860", "iam": "#da8bc3", "capability": "#64b5cd", "watch": "#8c8c8c",
           "detection": "#ccb974"}


def _sub(key: str) -> str | None:
    try:
        return substrate_of(key)
    except BehaviourKeyError:
        return None


# ---- data --------------------------------------------------------------------------------------


#: Time units of the plots' x axes and bins, by the longest span each is used for.
UNITS = (("second", 1.0, 2 * 60.0), ("minute", 60.0, 2 * HOUR), ("hour", HOUR, 7 * DAY),
         ("day", DAY, math.inf))


def time_unit(span: float) -> tuple[str, float]:
    """The unit (name, seconds) that shows a window of ``span`` seconds in a few dozen bins."""
    for name, seconds, longest in UNITS:
        if span <= longest:
            return name, seconds
    return UNITS[-1][0], UNITS[-1][1]


def coverage_curve(profile, hours: float = 24.0, threshold: float = 1.0) -> dict:
    """Per substrate: first-seen times, new behaviours per bin, and when coverage-stop (fewer than
    ``threshold`` new behaviours in a trailing ``hours``) was reached, if it was."""
    start, end = profile.window()
    first: dict[str, list[float]] = {}
    for ts, key in profile.coverage_timeline():
        sub = _sub(key)
        if sub is not None:
            first.setdefault(sub, []).append(ts)
    span = (end - start) if start is not None and end is not None else 0.0
    unit, width = time_unit(span)
    allowed_new = max(math.ceil(threshold) - 1, 0)
    out = {"start": start, "end": end, "bin": unit, "binSeconds": width, "substrates": {}}
    for sub, times in sorted(first.items()):
        times.sort()
        bins = Counter(int((t - start) // width) for t in times) if start is not None else Counter()
        reached = None
        if len(times) > allowed_new and end is not None:
            t = times[-(allowed_new + 1)] + hours * HOUR
            reached = t if t <= end else None
        elif end is not None:
            reached = start + hours * HOUR if start is not None and start + hours * HOUR <= end else None
        out["substrates"][sub] = {"firstSeen": times, "perBin": dict(sorted(bins.items())),
                                  "total": len(times), "reachedAt": reached}
    return out


def report_data(profile, policy=None, violations: Iterable = (), reconciliation: dict | None = None,
                policy_source: str = "", generated: float | None = None) -> dict:
    stats = profile.behaviours()
    start, end = profile.window()
    cov = (policy.decisions.get("confidence", {}).get("coverage", {}) if policy is not None else {})
    curve = coverage_curve(profile, cov.get("hours", 24.0), cov.get("threshold", 1.0))
    allowed = []
    if policy is not None:
        for p in policy.provenance:
            ev = p.get("evidence", {})
            allowed.append({"entry": p["entry"], "substrate": p.get("substrate", ""), "rule": p.get("rule", ""),
                            "admitted": p.get("admitted", ""), "count": ev.get("count"),
                            "sessions": ev.get("sessions"), "firstSeen": ev.get("firstSeen"),
                            "lastSeen": ev.get("lastSeen"), "detail": p.get("detail", ""),
                            "reason": p.get("reason", "")})
    vs = sorted(violations, key=lambda v: v.time)
    return {
        "workload": profile.workload.key,
        "window": {"start": iso_time(start), "end": iso_time(end),
                   "length": format_duration(end - start) if start is not None and end is not None else "-"},
        "sessions": profile.session_count, "closedSessions": profile.closed_sessions,
        "nodes": sorted(profile.nodes), "behaviours": len(stats),
        "bySubstrate": dict(sorted(Counter(s for s in map(_sub, stats) if s).items())),
        "loss": profile.loss(), "capped": profile.capped,
        "fingerprints": profile.fingerprints(),
        "coverage": curve,
        "policy": None if policy is None else {
            "name": policy.metadata_name, "source": policy_source, "mode": policy.mode,
            "substrates": list(policy.substrates), "closure": policy.closure,
            "lowConfidence": policy.low_confidence, "decisions": policy.decisions,
            "validity": policy.validity, "allowed": allowed, "review": list(policy.review),
            "watch": list(policy.watch), "detection": list(policy.detection),
        },
        "violations": [v.to_dict() for v in vs],
        "reconciliation": reconciliation,
        "generated": iso_time(generated),
    }


# ---- plots ---------------------------------------------------------------------------------------


def _svg(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "envelope-report",
                                "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt
    return plt


def coverage_plot(curve: dict) -> str:
    """Distinct behaviours over time per substrate, new ones per bin below, coverage-stop marked."""
    plt = _plt()
    start = curve["start"] or 0.0
    scale = curve["binSeconds"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    subs = curve["substrates"]
    bottoms: dict[int, float] = {}
    for sub, c in subs.items():
        xs = [(t - start) / scale for t in c["firstSeen"]]
        top.step([0.0] + xs, list(range(len(xs) + 1)), where="post", label=f"{sub} ({c['total']})",
                 color=COLOURS.get(sub))
        if c["reachedAt"] is not None:
            top.axvline((c["reachedAt"] - start) / scale, color=COLOURS.get(sub), linestyle="--", linewidth=1)
        for b, n in c["perBin"].items():
            bottom.bar(b + 0.5, n, width=0.9, bottom=bottoms.get(b, 0.0), color=COLOURS.get(sub))
            bottoms[b] = bottoms.get(b, 0.0) + n
    span = ((curve["end"] or start) - start) / scale
    top.set_xlim(0, max(span, max((len(c["perBin"]) for c in subs.values()), default=1), 1.0))
    top.set_ylabel("distinct behaviours")
    top.set_title("Coverage: behaviours seen for the first time (dashed: coverage-stop reached)")
    if subs:
        top.legend(loc="lower right", frameon=False)
    bottom.set_ylabel(f"new per {curve['bin']}")
    bottom.set_xlabel(f"{curve['bin']}s since the window start")
    return _svg(fig)


def violations_plot(violations: list[dict], start: float | None, end: float | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 2.8))
    if violations:
        t0 = start if start is not None else violations[0]["time"]
        t_end = max([v["time"] for v in violations] + ([end] if end else []))
        unit, scale = time_unit(t_end - t0)
        stacks: dict[tuple, Counter] = {}
        for v in violations:
            b = int((v["time"] - t0) // scale)
            stacks.setdefault((v["substrate"], v["action"]), Counter())[b] += v["count"]
        heights: dict[int, float] = {}
        for (sub, action), bins in sorted(stacks.items()):
            for b, n in sorted(bins.items()):
                ax.bar(b + 0.5, n, width=0.9, bottom=heights.get(b, 0.0), color=COLOURS.get(sub, "#999999"),
                       hatch="//" if action == "denied" else None, edgecolor="white", linewidth=0.3,
                       label=f"{sub} {action}")
                heights[b] = heights.get(b, 0.0) + n
        handles, labels = ax.get_legend_handles_labels()
        seen: dict[str, object] = {}
        for h, lab in zip(handles, labels):
            seen.setdefault(lab, h)
        ax.legend(seen.values(), seen.keys(), frameon=False, fontsize=8, ncol=4)
        ax.set_xlim(0, max((t_end - t0) / scale, max(heights) + 1.0, 1.0))
        ax.set_xlabel(f"{unit}s since the window start")
    else:
        ax.text(0.5, 0.5, "no violations recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("Violations over time (hatched: denied)")
    ax.set_ylabel("count")
    return _svg(fig)


# ---- HTML --------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;margin:2em auto;max-width:72em;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.meta{color:#555} .kv{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.2em}
.kv dt{font-weight:600} .kv dd{margin:0}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border-bottom:1px solid #e4e4e4;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.92em;word-break:break-all} .flag{background:#fff3cd;padding:0 .3em;border-radius:3px}
.bad{color:#a00} .ok{color:#070} figure{margin:1em 0} svg{max-width:100%;height:auto}
@media print{body{margin:0;max-width:none} h2{break-after:avoid} table,figure{break-inside:avoid}}
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _table(headers: list[str], rows: list[list], numeric: Iterable[int] = (), klass: str = "") -> str:
    if not rows:
        return "<p class=meta>none</p>"
    num = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=n>{_e(c)}</td>" if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{klass}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(items: list[tuple[str, str]]) -> str:
    return "<dl class=kv>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def render(data: dict) -> str:
    w = data["window"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
             f"<title>Envelope report: {_e(data['workload'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Envelope report: <code>{_e(data['workload'])}</code></h1>",
             f"<p class=meta>window {_e(w['start'])} to {_e(w['end'])} ({_e(w['length'])}), "
             f"{data['sessions']} sessions ({data['closedSessions']} closed) on {_e(', '.join(data['nodes']))}; "
             f"{data['behaviours']} distinct behaviours; generated {_e(data['generated'])}</p>"]
    parts.append("<h2 id=coverage>Coverage</h2>")
    parts.append(f"<figure id=coverage-plot>{coverage_plot(data['coverage'])}</figure>")
    rows = []
    for sub, c in data["coverage"]["substrates"].items():
        reached = iso_time(c["reachedAt"]) if c["reachedAt"] is not None else "<span class=bad>not reached</span>"
        rows.append([_e(sub), c["total"], reached])
    parts.append(_table(["substrate", "distinct behaviours", "coverage-stop reached"], rows, numeric=[1]))
    loss = {k: v for k, v in data["loss"].items() if v}
    parts.append(_kv([("events lost", _e(", ".join(f"{k} {v}" for k, v in sorted(loss.items())) or "none")),
                      ("capped", _e("yes" if data["capped"] else "no")),
                      ("fingerprints", "<br>".join(f"{_e(k)}: <code>{_e(', '.join(v))}</code>"
                                                   for k, v in sorted(data["fingerprints"].items())) or "none")]))
    pol = data["policy"]
    parts.append("<h2 id=policy>Policy</h2>")
    if pol is None:
        parts.append("<p class=meta>no policy given</p>")
    else:
        d = pol["decisions"]
        conf = d.get("confidence", {})
        val = pol["validity"]
        parts.append(_kv([
            ("policy", f"<code>{_e(pol['name'])}</code> {_e(pol['source'])}"),
            ("mode", _e(pol["mode"]) + (" <span class=flag>low confidence</span>" if pol["lowConfidence"] else "")),
            ("granularity", _e(", ".join(pol["substrates"]))),
            ("closure", _e(pol["closure"]) + "<br>" + "<br>".join(
                f"{_e(s)}: <code>{_e(json.dumps(r, sort_keys=True))}</code>"
                for s, r in sorted((d.get("closure", {}).get("rules") or {}).items()))),
            ("confidence", _e(f"min count {conf.get('minCount')}, min sessions {conf.get('minSessions')}, "
                              f"sessions counted by {(conf.get('sessionRule') or {}).get('rule', '')}")),
            ("validity", _e(f"derived {val.get('derivedAt')}, expires {val.get('expiresAt') or 'never'}; triggers: "
                            + (", ".join(t.get("name", "") for t in val.get("triggers", [])) or "none"))),
        ]))
        parts.append(f"<h3>Allowed ({len(pol['allowed'])} entries)</h3>")
        parts.append(_table(["entry", "rule", "admitted", "count", "sessions", "first seen", "last seen"],
                            [[f"<code>{_e(a['entry'])}</code>" + (f"<br><small>{_e(a['detail'])}</small>" if a["detail"] else ""),
                              _e(a["rule"]), _e(a["admitted"] + (f": {a['reason']}" if a["reason"] else "")),
                              a["count"], a["sessions"], _e(a["firstSeen"]), _e(a["lastSeen"])]
                             for a in pol["allowed"]], numeric=[3, 4], klass="allowed"))
        parts.append(f"<h3>Review ({len(pol['review'])}) and watch ({len(pol['watch'])})</h3>")
        parts.append(_table(["behaviour", "rule", "why", "count", "sessions", "last seen"],
                            [[f"<code>{_e(r['key'])}</code>", _e(r.get("rule")), _e(r.get("why")),
                              r.get("evidence", {}).get("count"), r.get("evidence", {}).get("sessions"),
                              _e(r.get("evidence", {}).get("lastSeen"))] for r in pol["review"]],
                            numeric=[3, 4], klass="review"))
        if pol["watch"]:
            parts.append("<p>watch list: " + ", ".join(f"<code>{_e(k)}</code>" for k in pol["watch"]) + "</p>")
    parts.append("<h2 id=violations>Violations</h2>")
    start_end = data["coverage"]["start"], data["coverage"]["end"]
    parts.append(f"<figure id=violations-plot>{violations_plot(data['violations'], *start_end)}</figure>")
    folded = Counter()
    for v in data["violations"]:
        folded[(v["substrate"], v["behaviour"], v["action"])] += v["count"]
    parts.append(_table(["substrate", "behaviour", "action", "count"],
                        [[_e(s), f"<code>{_e(b)}</code>", _e(a), n] for (s, b, a), n in folded.most_common(50)],
                        numeric=[3], klass="violations"))
    rec = data["reconciliation"]
    parts.append("<h2 id=reconciliation>Declared against observed</h2>")
    if not rec:
        parts.append("<p class=meta>no declared policies given (envelope report --declared FILE)</p>")
    else:
        s = rec["summary"]
        parts.append(f"<p>{len(rec['declarations'])} declarations: would deny {s['wouldDeny']}, unused "
                     f"{s['unused']}, undetermined {s['undetermined']}</p>")
        for sub, v in rec["substrates"].items():
            parts.append(f"<h3>{_e(sub)}: {v['observed']} observed behaviours</h3>")
            parts.append("<p class=meta>observed, and the declarations would deny it:</p>")
            parts.append(_table(["would deny", "count", "sessions", "last seen", "because"],
                                [[f"<code>{_e(x['key'])}</code>", x["count"], x["sessions"], _e(x["lastSeen"]),
                                  _e(", ".join(x["explicitDeny"]) or "not granted")] for x in v["wouldDeny"]],
                                numeric=[1, 2], klass="would-deny"))
            parts.append("<p class=meta>granted, and nothing in the window used it:</p>")
            parts.append(_table(["unused grant", "declared in", "window (h)"],
                                [[f"<code>{_e(u['grant'])}</code>", _e(u["declaration"]), u["windowHours"]]
                                 for u in v["unused"]], numeric=[2], klass="unused"))
        spots = rec["blindSpots"]
        parts.append("<h3>Blind spots</h3>")
        parts.append(_table(["kind", "substrate", "what", "meaning"],
                            [[_e(b["kind"]), _e(b.get("substrate", "")), _e(b["detail"]), _e(b["meaning"])]
                             for b in spots], klass="blind"))
    parts.append("</body></html>\n")
    return "".join(parts)
