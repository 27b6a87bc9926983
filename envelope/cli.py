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

import structlog

from . import commands
from .config import Config
from .errors import UserError, one_line


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
    """argparse with one-line errors (exit 2), like every other bad input: the usage is what
    ``--help`` is for."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        return 1


if __name__ == "__main__":
    sys.exit(main())
