"""``envelope violations [--workload NAME] [-o table|json|yaml]``: list recorded violations.

Fields: time, workload, substrate (syscall, egress, exec, file, http, mcp, iam, capability,
watch, detection), behaviour, action (denied or alerted), count (identical records folded within one
flush), and in ``detail`` the process (pid, comm), the session, and for a network call a seccomp
filter denied the destination it asked for. MCP gateway refusals and alerts (substrate ``mcp``)
are listed beside the kernel's. The table shows the process, the session and that destination.
"""

from __future__ import annotations

import time

from enforcer.violations import ACTIONS, SUBSTRATES, ViolationStore, ViolationStoreError

from .. import options
from ..errors import EXIT_FINDINGS, UserError
from ..output import add_output_option, emit, iso


def register(sub) -> None:
    p = sub.add_parser("violations", help="list denied and alerted behaviour (seccomp, egress, MCP, watch, detection)",
                       description="List violations from the state dir. Exits 1 when any match "
                                   "(a finding), 0 when none do.")
    p.add_argument("--workload", help="only this workload (name or full key)")
    p.add_argument("--substrate", choices=SUBSTRATES, help="only this substrate")
    p.add_argument("--action", choices=ACTIONS, help="only denied or only alerted")
    p.add_argument("--since", default=None, metavar="DURATION|TIME",
                   help="only newer ones: a duration back from now (90m, 1h30m, 7d) or an RFC 3339 time")
    add_output_option(p)
    p.set_defaults(func=cmd_violations)


def cmd_violations(args, config) -> int:
    try:
        since = options.since(args.since, time.time()) if args.since else None
        items = ViolationStore(config.state_dir).list(workload=args.workload, substrate=args.substrate,
                                                      action=args.action, since=since)
    except ViolationStoreError as e:
        raise UserError(str(e)) from None
    data = [v.to_dict() for v in items]
    rows = [[iso(v.time), v.workload, v.substrate, v.behaviour, v.action, v.count, _process(v.detail),
             v.detail.get("session", ""), _context(v.detail)] for v in items]
    emit(data, args.output, rows, ["time", "workload", "substrate", "behaviour", "action", "count",
                                   "process", "session", "context"])
    return EXIT_FINDINGS if items else 0


def _process(detail: dict) -> str:
    pid = detail.get("pid")
    if pid is None:
        return ""
    return f"{detail['comm']}[{pid}]" if detail.get("comm") else str(pid)


def _context(detail: dict) -> str:
    if detail.get("destination"):
        return f"to {detail['destination']}"
    sock = detail.get("socket")
    if isinstance(sock, dict):
        return f"socket {sock.get('family')} {sock.get('type')}"
    return ""
