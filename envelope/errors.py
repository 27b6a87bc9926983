"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input or an unmet precondition; the message says what and how to fix it."""

    exit_code = 2
