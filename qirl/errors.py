"""The one exception type for mistakes a user can make.

The CLI turns a `UserError` into a single line on stderr and exit code 2 (no traceback); anything
else is a bug in qirl and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: a recipe key, a malformed JSONL line, a missing checkpoint.

    The message must name the file and the line or key, so one line is enough to fix it.
    """
