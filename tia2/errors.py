"""Errors a user can cause and fix (bad input, missing data). The CLI prints them as one line."""


class UserError(Exception):
    """A mistake in the user's input or data; reported without a traceback, exit code 2."""
