"""``envelope doctor``: what this node can do for Envelope, and how to fix what it cannot."""

from __future__ import annotations

from sensor.features import failed_required, run_checks

from ..errors import EXIT_ENVIRONMENT
from ..output import add_output_option, emit


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="check kernel features, headers, tracefs, cgroup v2 and BPF permission",
        description="Probe the kernel and host for what the sensor needs. Exits 1 if a "
                    "required check fails; optional ones (kprobes, fentry, LSM) are reported.")
    add_output_option(p)
    p.set_defaults(func=run)


def check_landlock():
    """What this kernel's Landlock can restrict (it enforces the exec and file substrates)."""
    from sensor.features import Check

    from enforcer import landlock
    try:
        s = landlock.probe().to_dict()
    except OSError as e:
        return Check("landlock", False, str(e), "exec and file entries can only be reported, not enforced: a "
                     "kernel with CONFIG_SECURITY_LANDLOCK=y and landlock in lsm=", required=False)
    missing = f"; cannot restrict {', '.join(s['missing'])}" if s["missing"] else ""
    return Check("landlock", True, f"ABI {s['abi']}: {len(s['fs'])} filesystem rights{missing}", required=False)


def run(args, config) -> int:
    checks = run_checks() + [check_landlock()]
    failed = failed_required(checks)
    data = {"ok": not failed, "checks": [c.to_dict() for c in checks]}
    rows = [[c.name, "ok" if c.ok else ("FAIL" if c.required else "absent"),
             "yes" if c.required else "no", c.detail, "" if c.ok else c.fix] for c in checks]
    emit(data, args.output, rows, ["check", "status", "required", "detail", "fix"])
    if args.output == "table":
        print("\nall required checks passed" if not failed else
              f"\n{len(failed)} required check(s) failed: {', '.join(c.name for c in failed)}")
    return EXIT_ENVIRONMENT if failed else 0
