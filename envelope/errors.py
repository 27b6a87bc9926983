"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input or an unmet precondition; the message says what and how to fix it."""

    exit_code = 2


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (a newline in a field name, a
    carriage return that would overwrite the line) are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
