"""Errors meant for people: bad input, not bugs.

The CLI prints a UsageError's message without a traceback and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: a file, a field, an option or a value. The message says which."""


class NonFiniteError(RuntimeError):
    """A loss, reward or logit became NaN/inf; the message names the step (and prompt)."""
