"""``envelope replay POLICY NAME``: what the policy would have denied in NAME's recorded evidence.

Answers "would this policy have broken us last week?" before anything is enforced. ``--since
7d`` keeps only behaviours last seen in the final seven days of the profile's window.
``--strict`` exits 1 when anything would have been denied on any substrate the policy encodes,
or when the profile hit its caps (what was not kept cannot be shown to be allowed).
"""

from __future__ import annotations

import sys

from enforcer.replay import replay

from .. import options
from ..errors import EXIT_FINDINGS
from ..output import add_output_option, dump, table
from .derive import load_profile_arg, read_policy


def register(sub) -> None:
    p = sub.add_parser("replay", help="report what a policy would have denied in a recorded profile",
                       description=__doc__.splitlines()[0])
    p.add_argument("policy", help="policy file (YAML or JSON)")
    p.add_argument("name", help="workload whose profile to replay (or a profile file)")
    p.add_argument("--since", default=None, metavar="DURATION",
                   help="only behaviours last seen within DURATION before the window end, e.g. 7d")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when anything would be denied, or the profile lost keys over its caps")
    add_output_option(p)
    p.set_defaults(func=cmd_replay)


def render_text(r: dict) -> str:
    out = []
    if not r["sameWorkload"]:
        out.append(f"note: policy is for {r['policyWorkload']}, evidence is from {r['profileWorkload']}")
    w = r["window"]
    out.append(f"replay {r['policy']} (mode {r['mode']}) against {r['profileWorkload']}: {r['behaviours']} behaviours, "
               f"{r['events']} events, {r['sessions']} sessions, window {w['start']} to {w['end']}"
               + (f", since {w['since']}" if w["since"] else ""))
    verdict = (f"would deny {r['deniedBehaviours']} behaviours ({r['deniedEvents']} events)"
               if r["denied"] else "would deny nothing")
    out.append(verdict)
    if r.get("alerted"):
        out.append(f"would let through and report {len(r['alerted'])} review item(s): " + ", ".join(r["alerted"]))
    if r["denied"]:
        out.append("")
        out.append(table([[d["key"], d["count"], d["sessions"], d["firstSeen"], d["lastSeen"],
                           "yes" if d["watched"] else ""] for d in r["denied"]],
                         ["behaviour", "count", "sessions", "first seen", "last seen", "watched"]).rstrip("\n"))
    if r["unknownOverflow"]:
        out.append("")
        out.append("unknown (over the profile's cardinality cap, keys not kept): "
                   + ", ".join(f"{s}: {o['count']} events, {o['keys']} keys" for s, o in r["unknownOverflow"].items()))
    return "\n".join(out) + "\n"


def cmd_replay(args, config) -> int:
    policy = read_policy(args.policy, judging=True)
    profile = load_profile_arg(args.name, config.state_dir)
    since = None
    if args.since:
        _, end = profile.window()
        since = None if end is None else options.since(args.since, end)
    r = replay(policy, profile, since)
    sys.stdout.write(render_text(r) if args.output == "table" else dump(r, args.output))
    sys.stdout.flush()
    return EXIT_FINDINGS if args.strict and (r["denied"] or r["unknownOverflow"]) else 0
