"""Errors a user can cause and fix; the driver prints them without a traceback."""


class UserError(RuntimeError):
    """Bad input, a missing file or contradictory flags. The message names the file and the fix."""
