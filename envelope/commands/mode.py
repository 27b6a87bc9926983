"""``envelope mode [NAME [MODE --reason TEXT]]``: show or set a workload's enforcement mode."""

from __future__ import annotations

from enforcer import state

from ..errors import UserError
from ..output import add_output_option, emit, iso


def register(sub) -> None:
    p = sub.add_parser("mode", help="show or set a workload's mode (observe, alert, enforce)")
    p.add_argument("name", nargs="?", help="workload: name, namespace/name or full key")
    p.add_argument("mode", nargs="?", choices=state.MODES, help="new mode")
    p.add_argument("--reason", help="why (required when setting; goes to the audit log)")
    add_output_option(p)
    p.set_defaults(func=cmd_mode)


def cmd_mode(args, config) -> int:
    try:
        if args.name is None:
            states = state.all_states(config.state_dir)
            emit(states, args.output, [[s["workload"], s["mode"], iso(s.get("since")), s.get("actor"),
                                        s.get("reason")] for s in states],
                 ["workload", "mode", "since", "actor", "reason"])
            return 0
        workload = state.resolve_workload(config.state_dir, args.name,
                                          allow_new=args.mode is not None)
        if args.mode is None:
            s = state.read_state(config.state_dir, workload) or {
                "workload": workload.key, "mode": state.DEFAULT_MODE}
            emit(s, args.output, [[s["workload"], s["mode"], iso(s.get("since")), s.get("actor"),
                                   s.get("reason")]], ["workload", "mode", "since", "actor", "reason"])
            return 0
        if not args.reason:
            raise UserError("--reason is required to change a mode")
        old = state.get_mode(config.state_dir, workload)
        state.set_mode(config.state_dir, workload, args.mode, reason=args.reason)
    except state.StateError as e:
        raise UserError(str(e)) from None
    print(f"{workload.key}: mode {old} -> {args.mode}")
    return 0
