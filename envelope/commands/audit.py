"""``envelope audit verify`` and ``envelope audit show``: the hash-chained audit log."""

from __future__ import annotations

import sys

from enforcer import audit, state

from ..errors import UserError
from ..output import add_output_option, emit


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify or show the append-only audit log")
    psub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    psub.required = True
    v = psub.add_parser("verify", help="check the hash chain; exit 1 naming the first bad line")
    add_output_option(v)
    v.set_defaults(func=cmd_verify)
    s = psub.add_parser("show", help="list audit entries")
    s.add_argument("--workload", help="only entries for this workload (name or full key)")
    s.add_argument("--action", help="only actions starting with this (mode, exception, apply, ...)")
    add_output_option(s)
    s.set_defaults(func=cmd_show)


def cmd_verify(args, config) -> int:
    try:
        result = audit.verify(config.state_dir)
    except audit.AuditError as e:
        raise UserError(str(e)) from None
    if args.output != "table":
        emit(result.to_dict(), args.output)
    elif result.ok:
        print(f"{result.path}: {result.entries} entries, chain intact")
    if not result.ok:
        for p in result.problems:
            print(f"envelope: audit: {result.path}: {p}", file=sys.stderr)
        return 1
    return 0


def cmd_show(args, config) -> int:
    workload = args.workload
    if workload:
        try:
            workload = state.resolve_workload(config.state_dir, workload).key
        except state.StateError:
            pass  # a workload no longer known still has its history: match the text as given
    entries = audit.read(config.state_dir, workload=workload, action=args.action)
    rows = [[e.get("seq"), e.get("time"), e.get("actor"), e.get("action"), e.get("workload") or "-",
             e.get("reason")] for e in entries]
    emit(entries, args.output, rows, ["seq", "time", "actor", "action", "workload", "reason"])
    return 0
