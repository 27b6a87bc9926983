"""``envelope reconcile NAME --declared FILE...``: declared policies against observed behaviour.

Reads the policies a team already has (OCI seccomp JSON, the container default profile,
NetworkPolicy, CiliumNetworkPolicy, Envelope policies, landlockconfig rulesets, IAM policy
documents, Pods and workloads with a pod template for their containers' capabilities) and holds them against NAME's profile: what the declarations grant that was never used
in the window, what was observed that they would deny, what cannot be judged, and what the sensor
could not see. Exits 1 when there is anything that would be denied or is unused.
"""

from __future__ import annotations

import sys
import time

from enforcer.declared import DeclaredError, load_declared
from enforcer.reconcile import reconcile

from .. import options
from ..errors import EXIT_FINDINGS, UserError
from ..output import add_output_option, dump, table
from .derive import load_profile_arg


def register(sub) -> None:
    p = sub.add_parser("reconcile", help="declared policies against observed behaviour: unused grants, "
                                         "would-deny, blind spots",
                       description=__doc__.splitlines()[0])
    p.add_argument("name", help="workload whose profile to use (or a profile file)")
    p.add_argument("--declared", action="append", required=True, metavar="FILE",
                   help="a declared policy (YAML or JSON, several documents allowed); repeatable")
    p.add_argument("--since", default=None, metavar="DURATION|TIME",
                   help="only behaviours last seen since then (a duration back from the window end, "
                        "or an RFC 3339 time)")
    add_output_option(p)
    p.set_defaults(func=cmd_reconcile)


def findings(args, config) -> dict:
    profile = load_profile_arg(args.name, config.state_dir)
    decls = []
    for f in args.declared:
        try:
            decls += load_declared(f)
        except DeclaredError as e:
            raise UserError(str(e)) from None
    since = None
    if args.since:
        _, end = profile.window()
        since = options.since(args.since, end if end is not None else time.time())
    return reconcile(profile, decls, since)


def render_text(r: dict) -> str:
    w = r["window"]
    out = [f"reconcile {r['workload']}: window {w['start']} to {w['end']} ({w['hours']} h), "
           f"{r['sessions']} sessions; {len(r['declarations'])} declarations"]
    for d in r["declarations"]:
        if d.get("applies") is False:
            out.append(f"  {d['source']}: declares for container {d['container']}, not this workload's")
    s = r["summary"]
    out.append(f"would deny {s['wouldDeny']}, unused {s['unused']}, undetermined {s['undetermined']}, "
               f"blind spots {s['blindSpots']}")
    for sub, v in r["substrates"].items():
        out.append("")
        out.append(f"{sub}: {v['observed']} observed behaviours; declared by {', '.join(v['declarations'])}")
        if v["wouldDeny"]:
            out.append(table([[d["key"], d["count"], d["sessions"], d["lastSeen"],
                               ", ".join(d["explicitDeny"]) or "not granted"] for d in v["wouldDeny"]],
                             ["would deny", "count", "sessions", "last seen", "because"]).rstrip("\n"))
        if v["unused"]:
            out.append(table([[u["grant"], u["declaration"], u["windowHours"]] for u in v["unused"]],
                             ["unused grant", "declared in", "window h"]).rstrip("\n"))
        if v.get("refused"):
            out.append(table([[u["key"], u["count"], u["lastSeen"], ", ".join(u["grantedBy"]) or "no"]
                              for u in v["refused"]],
                             ["refused while observed", "count", "last seen", "granted by"]).rstrip("\n"))
        if v["undetermined"]:
            out.append(table([[u["key"], u["count"], u["lastSeen"]] for u in v["undetermined"]],
                             ["undetermined", "count", "last seen"]).rstrip("\n"))
    if r["blindSpots"]:
        out.append("")
        out.append(table([[b["kind"], b.get("substrate", ""), b["detail"]] for b in r["blindSpots"]],
                         ["blind spot", "substrate", "what"]).rstrip("\n"))
    return "\n".join(out) + "\n"


def cmd_reconcile(args, config) -> int:
    r = findings(args, config)
    sys.stdout.write(render_text(r) if args.output == "table" else dump(r, args.output))
    sys.stdout.flush()
    return EXIT_FINDINGS if r["summary"]["wouldDeny"] or r["summary"]["unused"] else 0
