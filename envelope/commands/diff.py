"""``envelope diff POLICY_A POLICY_B``: what B allows that A did not, what it dropped, and why.

Exits 0 when the policies are equivalent and 1 when they differ (like diff(1)).
"""

from __future__ import annotations

import sys

import json

from enforcer.diff import diff

from ..output import add_output_option, dump, table
from .derive import read_policy


def register(sub) -> None:
    p = sub.add_parser("diff", help="compare two policies: entries added and removed, and why",
                       description=__doc__.splitlines()[0])
    p.add_argument("old", help="policy file A")
    p.add_argument("new", help="policy file B")
    add_output_option(p)
    p.set_defaults(func=cmd_diff)


def _compact(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))


def render_text(d: dict) -> str:
    out = [f"{d['old']} -> {d['new']}: " + ("no differences" if d["identical"] else
           f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['decisions'])} decision changes")]
    if d["decisions"]:
        out.append("")
        out.append(table([[c["decision"], _compact(c["old"]), _compact(c["new"])] for c in d["decisions"]],
                         ["decision", "old", "new"]).rstrip("\n"))
    if d["added"]:
        out.append("")
        rows = []
        for a in d["added"]:
            why = f"{a.get('rule')} ({a.get('admitted')}"
            why += f": {a['reason']})" if a.get("reason") else f", count {a.get('count')}, sessions {a.get('sessions')})"
            if a.get("previously"):
                why += f"; {a['previously']}"
            rows.append(["+", a["entry"], why])
        out.append(table(rows, ["", "entry", "why"]).rstrip("\n"))
    if d["removed"]:
        out.append("")
        out.append(table([["-", r["entry"], r["why"]] for r in d["removed"]], ["", "entry", "why"]).rstrip("\n"))
    rv, w = d["review"], d["watch"]
    if rv["added"] or rv["removed"]:
        out.append("")
        out += [f"review + {r['key']} ({r['why']})" for r in rv["added"]]
        out += [f"review - {k}" for k in rv["removed"]]
    if w["added"] or w["removed"]:
        out.append("")
        out += [f"watch + {k}" for k in w["added"]] + [f"watch - {k}" for k in w["removed"]]
    return "\n".join(out) + "\n"


def cmd_diff(args, config) -> int:
    a, b = read_policy(args.old, judging=True), read_policy(args.new, judging=True)
    d = diff(a, b)
    sys.stdout.write(render_text(d) if args.output == "table" else dump(d, args.output))
    sys.stdout.flush()
    return 0 if d["identical"] else 1
