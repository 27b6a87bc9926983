"""``envelope validity check POLICY --current key=value ...``: has a re-derivation trigger fired?

Reports every trigger (fingerprint changes and expiry) and exits 1 when the policy is stale,
0 when it is still valid. ``--at`` checks against a given time instead of now.
"""

from __future__ import annotations

import sys

from enforcer.policy import PolicyError, parse_time
from enforcer.validity import check, now_seconds

from .. import options
from ..errors import UserError
from ..output import add_output_option, dump, table
from .derive import read_policy


def register(sub) -> None:
    p = sub.add_parser("validity", help="check whether a policy is still valid")
    vsub = p.add_subparsers(dest="validity_command", metavar="ACTION")
    vsub.required = True
    c = vsub.add_parser("check", help="report fired re-derivation triggers; exit 1 when stale",
                        description=__doc__.splitlines()[0])
    c.add_argument("policy", help="policy file (YAML or JSON)")
    c.add_argument("--current", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="the workload's current fingerprint, e.g. model=v4 image=sha256:...")
    c.add_argument("--at", default=None, metavar="TIME", help="check expiry at this ISO 8601 time (default now)")
    add_output_option(c)
    c.set_defaults(func=cmd_check)


def cmd_check(args, config) -> int:
    policy = read_policy(args.policy)
    try:
        current = options.pairs(args.current, "--current")
        now = parse_time(args.at, "--at").timestamp() if args.at else now_seconds()
    except PolicyError as e:
        raise UserError(str(e)) from e
    r = check(policy, current, now)
    if args.output == "table":
        head = (f"{r['policy']} ({r['workload']}), derived at {r['derivedAt'] or 'unknown'}: "
                + ("STALE, re-derive" if r["stale"] else "valid"))
        rows = [[t["trigger"], t["status"], t["reason"]] for t in r["triggers"]]
        sys.stdout.write(head + "\n" + (table(rows, ["trigger", "status", "reason"]) if rows else "no triggers\n"))
    else:
        sys.stdout.write(dump(r, args.output))
    sys.stdout.flush()
    return 1 if r["stale"] else 0
