"""Errors a user can cause and fix; the driver prints them without a traceback."""


class UserError(RuntimeError):
    """Bad input, a missing file or contradictory flags. The message names the file and the fix."""


def user_message(error: UserError) -> str:
    """The message of ``error`` for the user. One raised in a DataLoader worker reaches the main process
    wrapped in the worker's traceback (``Caught UserError in DataLoader worker process 0 ...``): only the
    message at its end is kept."""
    text = str(error)
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text[text.rindex(marker) + len(marker):]
    return text.strip()
