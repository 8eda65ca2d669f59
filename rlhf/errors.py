"""The one exception type a user is meant to see.

Anything raised as `RlhfError` is a problem with the user's input or environment (a missing
file, a bad row, an unknown key). The CLI prints it as a single line and exits non-zero;
any other exception is a bug and keeps its traceback.
"""


class RlhfError(Exception):
    """A user-facing error: the message names the thing, the place and the fix."""
