"""Errors caused by the user's input (a file, a field, a value): the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input: the message names the file, field or value and what was expected."""
