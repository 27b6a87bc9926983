"""``envelope rebaseline NAME --reason TEXT``: alert mode and a new observation window."""

from __future__ import annotations

from enforcer import state

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("rebaseline", help="move a workload to alert mode and start a new "
                                          "observation window (the current profile is archived)")
    p.add_argument("name", help="workload: name, namespace/name or full key")
    p.add_argument("--reason", required=True, help="why (goes to the audit log)")
    p.set_defaults(func=cmd_rebaseline)


def cmd_rebaseline(args, config) -> int:
    try:
        workload = state.resolve_workload(config.state_dir, args.name, allow_new=True)
        s = state.rebaseline(config.state_dir, workload, reason=args.reason)
    except state.StateError as e:
        raise UserError(str(e)) from None
    rb = s["rebaseline"]
    where = f"; previous profile archived at {rb['archive']}" if rb.get("archive") else ""
    print(f"{workload.key}: mode alert, observation window {rb['generation']} started{where}")
    return 0
