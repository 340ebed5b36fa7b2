"""The one exception type for user errors.

The CLI turns an ``LlmpruneError`` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class LlmpruneError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
