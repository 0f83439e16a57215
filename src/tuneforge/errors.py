"""The one exception type users see: its message is printed as a single line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, data, paths) that they can fix.

    The CLI prints ``str(err)`` as one line and exits non-zero; ``--debug`` shows the traceback.
    """
