"""Errors the command line reports without a traceback."""


class UserError(Exception):
    """An error caused by the user's input; the message says how to fix it."""
