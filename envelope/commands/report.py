"""``envelope report NAME --out report.html``: one self-contained HTML page for a workload.

The coverage curve, the policy with its decisions, closure rules and evidence, review and watch
lists, violations over time, and (with ``--declared``) the reconciliation findings and blind
spots. Without ``--policy`` a policy is derived for the page with the defaults (forced, so a
window still growing still shows one; the page says so).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from enforcer.declared import DeclaredError, load_declared
from enforcer.derive import DeriveError, DeriveOptions, derive
from enforcer.reconcile import reconcile
from enforcer.violations import ViolationStore, ViolationStoreError
from sensor.state_dir import atomic_write

from ..errors import UserError
from ..recording import progress_printer
from .derive import load_profile_arg, read_policy


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page: coverage, policy, violations, "
                                      "reconciliation", description=__doc__.splitlines()[0])
    p.add_argument("name", help="workload whose profile to report on (or a profile file)")
    p.add_argument("--policy", metavar="FILE", help="the policy to show (default: derived for the page)")
    p.add_argument("--declared", action="append", default=[], metavar="FILE",
                   help="declared policies to reconcile with (repeatable)")
    p.add_argument("--out", metavar="FILE", help="write the page here (default: stdout)")
    p.set_defaults(func=cmd_report)


def cmd_report(args, config) -> int:
    from ..report import render, report_data

    say = progress_printer(sys.stderr.isatty() or bool(args.out))
    profile = load_profile_arg(args.name, config.state_dir)
    if args.policy:
        policy, source = read_policy(args.policy), args.policy
    else:
        try:
            policy = derive(profile, DeriveOptions(force=True))
        except DeriveError as e:
            raise UserError(f"report: derive a policy for the page: {e}") from None
        source = "(derived for this page with the defaults, not saved)"
    decls = []
    for f in args.declared:
        try:
            decls += load_declared(f)
        except DeclaredError as e:
            raise UserError(str(e)) from None
    try:
        violations = ViolationStore(config.state_dir).list(workload=profile.workload.key)
    except ViolationStoreError as e:
        raise UserError(str(e)) from None
    say("rendering the report (plots)")
    data = report_data(profile, policy, violations, reconcile(profile, decls) if decls else None,
                       policy_source=source, generated=time.time())
    page = render(data)
    if args.out:
        try:
            atomic_write(Path(args.out), page.encode())
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror}") from None
        say(f"wrote {args.out} ({len(page) // 1024} KiB)")
    else:
        sys.stdout.write(page)
    return 0
