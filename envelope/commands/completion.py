"""``envelope completion bash|zsh|fish``: the shell code that completes envelope's commands and
options (argcomplete), for ``eval "$(envelope completion bash)"`` or a file in the shell's
completion directory."""

from __future__ import annotations

import sys

SHELLS = ("bash", "zsh", "fish")


def register(sub) -> None:
    p = sub.add_parser("completion", help="print shell completion code (bash, zsh or fish)",
                       description="Print the code that makes your shell complete envelope's "
                                   "commands and options.")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)


def cmd_completion(args, config) -> int:
    import argcomplete
    sys.stdout.write(argcomplete.shellcode(["envelope"], shell=args.shell))
    return 0
