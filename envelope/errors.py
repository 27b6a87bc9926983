"""Errors a user can act on, and the exit statuses of every command.

The CLI prints an error's message on one line and exits with its status:

==  ========================================================================================
0   success
1   findings: the command worked and found something a script should act on (policies
    differ, a policy is stale, a replay would deny, violations were listed, coverage-stop not
    reached yet, the audit chain does not verify)
2   bad input or usage (a typo, a malformed file, a missing option)
3   the environment or Envelope itself failed (no root, no BPF, probes that do not attach,
    an internal error)
==  ========================================================================================
"""

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3


class UserError(Exception):
    """Bad input or an unmet precondition; the message says what and how to fix it."""

    exit_code = EXIT_USAGE


class EnvironmentFailure(UserError):
    """The host cannot do what was asked (privileges, kernel features, a probe that does not
    attach): not the user's input, and not a finding."""

    exit_code = EXIT_ENVIRONMENT


class Finding(UserError):
    """The command worked and its answer is a finding a script should act on (exit 1), said in
    one line on stderr, e.g. coverage-stop not reached."""

    exit_code = EXIT_FINDINGS


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (a newline in a field name, a
    carriage return that would overwrite the line) are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
