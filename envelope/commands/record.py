"""``envelope record --workload NAME [--session ID] -- CMD [ARGS...]``."""

from __future__ import annotations

import sys

from sensor.workload import Workload

from ..errors import UserError
from ..output import dump
from ..recording import progress_printer, record


def parse_kv(items, what: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} must be key=value, got {item!r}")
        out[key] = value
    return out


def register(sub) -> None:
    p = sub.add_parser("record", help="run CMD in a fresh cgroup as one session of a workload")
    p.add_argument("--workload", required=True, help="workload name (host workload host/Unit/NAME/main)")
    p.add_argument("--session", help="session id (default: a new one per run)")
    p.add_argument("--fingerprint", action="append", metavar="KEY=VALUE",
                   help="validity fingerprint input, e.g. model=gpt-x (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table",
                   help="table: a summary line on stderr (default); json or yaml: the summary on stdout")
    p.add_argument("cmd", nargs="+", metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_record)


def cmd_record(args, config) -> int:
    workload = Workload.parse(args.workload) if args.workload.count("/") == 3 else Workload.host(args.workload)
    fps = parse_kv(args.fingerprint, "--fingerprint")
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    res = record(config, workload, cmd, session=args.session, fingerprints=fps,
                 progress=progress_printer(not args.quiet))
    summary = {"workload": workload.key, "session": res.session, "exit_code": res.exit_code,
               "behaviours": res.behaviours, "loss": res.loss}
    if args.output != "table":
        sys.stdout.write(dump(summary, args.output))
    if not args.quiet:
        lost = f", LOST {res.loss}" if res.loss else ", no events lost"
        print(f"envelope: session {res.session} recorded: {res.behaviours} behaviours in profile{lost}; "
              f"exit {res.exit_code}", file=sys.stderr)
    return res.exit_code
