"""The ``envelope`` command: a node-local debug CLI.

Global options come before the subcommand (``envelope --state-dir DIR record ...``). Each
subcommand lives in ``envelope/commands/<name>.py`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func(args, config) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import argcomplete
import structlog

from . import commands
from .config import Config
from .errors import EXIT_ENVIRONMENT, EXIT_FINDINGS, EXIT_USAGE, UserError, one_line

EXIT_STATUSES = (f"exit status: 0 success; {EXIT_FINDINGS} findings (differs, stale, would deny, "
                 f"violations, coverage-stop not reached); {EXIT_USAGE} bad input or usage; "
                 f"{EXIT_ENVIRONMENT} environment or internal failure")

#: One or more examples per command, shown by ``envelope COMMAND --help``.
EXAMPLES = {
    "audit": ["envelope audit verify", "envelope audit show --workload research-agent -o json"],
    "cluster": ["envelope cluster apply policy.yaml", "envelope cluster policies -o yaml"],
    "compile": ["envelope compile policy.yaml --format oci-seccomp --out agent.json",
                "envelope compile policy.yaml --format cilium -o json",
                "envelope compile policy.yaml --format iam --iam-target session --out session.json",
                "envelope compile policy.yaml --format k8s-capabilities -o json",
                "envelope compile policy.yaml --format landlock-ruleset --root rootfs/ --out agent.ruleset"],
    "completion": ['eval "$(envelope completion bash)"'],
    "daemon": ["envelope daemon --metrics-port 9464"],
    "derive": ["envelope derive research-agent --out policy.yaml",
               "envelope derive research-agent --substrates syscall,egress,exec,file --expires-in 14d",
               "envelope derive research-agent --substrates syscall,egress,exec,iam --out policy.yaml",
               'envelope derive research-agent --admit capability:NET_RAW --reason "ping checks, SEC-7"'],
    "diff": ["envelope diff old.yaml new.yaml"],
    "doctor": ["envelope doctor", "envelope doctor -o json"],
    "enforce": ["envelope enforce research-agent --policy policy.yaml --mode alert",
                'envelope enforce host/Unit/demo-agent/main --remove --reason "decommissioned"'],
    "exception": ['envelope exception add research-agent --allow connect:tcp:10.0.9.4:443 --ttl 2h '
                  '--reason "vendor API trial"', "envelope exception list -o json"],
    "exec": ["envelope exec --policy policy.yaml -- /usr/bin/python3 agent.py --task 7",
             "envelope exec --policy policy.yaml --mode alert -- ./agent",
             "envelope exec --policy policy.yaml --allow-landlock-gaps -- ./agent"],
    "explain": ["envelope explain policy.yaml", "envelope explain policy.yaml -o json"],
    "launcher": ["envelope launcher pod deployment.yaml --ruleset agent=agent.ruleset --image REGISTRY/envelope:0.1.0",
                 "envelope launcher oci config.json --ruleset agent.ruleset --out config.json"],
    "mcp": ["envelope mcp wrap --workload tools -- mcp-server-time",
            "envelope mcp proxy --workload tools --listen 127.0.0.1:8931 --upstream http://127.0.0.1:8000/mcp"],
    "mode": ['envelope mode research-agent alert --reason "investigating"'],
    "profile": ["envelope profile list", "envelope profile show research-agent --substrate egress -o json"],
    "reconcile": ["envelope reconcile research-agent --declared /usr/share/containers/seccomp.json",
                  "envelope reconcile research-agent --declared netpol.yaml --declared policy.yaml -o json"],
    "report": ["envelope report research-agent --out report.html",
               "envelope report research-agent --policy policy.yaml --declared netpol.yaml --out r.html"],
    "rebaseline": ['envelope rebaseline research-agent --reason "new model version"'],
    "record": ["envelope record --workload agent -- python3 agent.py --task 4",
               "envelope record --workload agent --fingerprint model=v3 -- ./agent"],
    "replay": ["envelope replay policy.yaml research-agent --since 7d --strict"],
    "top": ["envelope top --interval 2 -n 5", "envelope top -o json -n 1"],
    "validity": ["envelope validity check policy.yaml --current model=v4"],
    "violations": ["envelope violations --workload research-agent --since 1h",
                   "envelope violations --substrate egress --action denied -o json"],
}


def configure_logging(json_logs: bool, verbose: bool) -> None:
    import logging
    level = logging.DEBUG if verbose else logging.INFO
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=processors + [renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve stderr at log time: callers (tests, the demo) may swap it after configuration.
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"envelope: error: {self.prog.removeprefix('envelope').strip() or 'envelope'}: "
                              f"{one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="envelope",
        description="Least privilege for AI-agent workloads: observe, derive, enforce. "
                    "A node-local debug CLI; commands that need the kernel run standalone.")
    p.add_argument("--state-dir", default=None,
                   help="state directory (env ENVELOPE_STATE_DIR, default /var/lib/envelope)")
    p.add_argument("--config", default=None, help="YAML config file (keys: see envelope/config.py)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines to stderr")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"envelope {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(sub)
    for name, parser in sub.choices.items():
        examples = "\n".join(f"  {e}" for e in EXAMPLES.get(name, ()))
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = (f"examples:\n{examples}\n\n" if examples else "") + EXIT_STATUSES
    p.epilog = EXIT_STATUSES
    return p


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("envelope-least-privilege")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # answers shell completion requests, else does nothing
    args = parser.parse_args(argv)
    configure_logging(args.log_json, args.verbose)
    try:
        config = Config.load(args.config, state_dir=args.state_dir)
        return int(args.func(args, config) or 0)
    except UserError as e:
        print(f"envelope: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"envelope: internal error: {type(e).__name__}: {one_line(e)} (run with -v for the traceback)",
              file=sys.stderr)
        return EXIT_ENVIRONMENT


if __name__ == "__main__":
    sys.exit(main())
