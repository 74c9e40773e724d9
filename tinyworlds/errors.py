"""The one error type users see.

Anything the user can cause (a missing file, a bad size, an unreadable model) raises
`TinyWorldsError` with a one-line message that names the thing and says what is wrong.
The CLI prints it as `error: <message>` and exits with status 1, without a traceback.
"""


class TinyWorldsError(Exception):
    """A user-facing failure; its message is printed as-is on one line."""
