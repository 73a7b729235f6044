"""The one exception type lmforge raises for problems a user can fix.

The CLI prints these as a single line; anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A user-facing error: bad recipe, unsupported model, corrupted artifact, bad flag."""
