"""``envelope exception add|list|revoke``: expiring exceptions to a workload's policy."""

from __future__ import annotations

import time

from enforcer import exceptions, state

from ..errors import UserError
from ..output import add_output_option, emit, iso


def register(sub) -> None:
    p = sub.add_parser("exception", help="add, list or revoke expiring exceptions")
    psub = p.add_subparsers(dest="exception_command", metavar="ACTION")
    psub.required = True
    a = psub.add_parser("add", help="allow one behaviour for a workload until the TTL ends")
    a.add_argument("name", help="workload: name, namespace/name or full key")
    a.add_argument("--allow", required=True, metavar="KEY",
                   help="behaviour key (syscall:NAME, exec:/PATH, connect:tcp:ADDR:PORT, "
                        "send:udp:ADDR:PORT) or egress:PROTO:CIDR:PORTS")
    a.add_argument("--ttl", required=True, help="how long: 90s, 30m, 2h, 1d, 1h30m (max 30d)")
    a.add_argument("--reason", required=True, help="why (goes to the audit log)")
    a.set_defaults(func=cmd_add)
    ls = psub.add_parser("list", help="list exceptions")
    ls.add_argument("--workload", help="only this workload")
    ls.add_argument("--all", action="store_true", help="include lapsed exceptions")
    add_output_option(ls)
    ls.set_defaults(func=cmd_list)
    r = psub.add_parser("revoke", help="end an exception now")
    r.add_argument("id", help="exception id (see 'exception list')")
    r.add_argument("--reason", required=True, help="why (goes to the audit log)")
    r.set_defaults(func=cmd_revoke)


def cmd_add(args, config) -> int:
    try:
        workload = state.resolve_workload(config.state_dir, args.name, allow_new=True)
        e = exceptions.add(config.state_dir, workload, args.allow, args.ttl, reason=args.reason)
    except state.StateError as err:
        raise UserError(str(err)) from None
    print(f"exception {e.id}: {e.workload} may {e.allow} until {iso(e.expires)}")
    if e.allow.startswith("syscall:"):
        print("note: a loaded seccomp filter cannot be widened; this applies to processes and "
              "containers started from now on")
    return 0


def cmd_list(args, config) -> int:
    now = time.time()
    try:
        items = exceptions.load_all(config.state_dir)
        if args.workload:
            key = state.resolve_workload(config.state_dir, args.workload).key
            items = [e for e in items if e.workload == key]
    except state.StateError as err:
        raise UserError(str(err)) from None
    if not args.all:
        items = [e for e in items if e.active(now)]
    data = []
    for e in items:
        d = e.to_dict()
        d["active"] = e.active(now)
        d["remaining_seconds"] = max(0.0, round(e.expires - now, 1)) if e.active(now) else 0.0
        data.append(d)
    rows = [[e.id, e.workload, e.allow, iso(e.expires),
             "active" if e.active(now) else "lapsed", e.actor, e.reason] for e in items]
    emit(data, args.output, rows, ["id", "workload", "allow", "expires", "state", "actor", "reason"])
    return 0


def cmd_revoke(args, config) -> int:
    try:
        e = exceptions.revoke(config.state_dir, args.id, reason=args.reason)
    except state.StateError as err:
        raise UserError(str(err)) from None
    print(f"exception {e.id} revoked ({e.workload}: {e.allow})")
    return 0
