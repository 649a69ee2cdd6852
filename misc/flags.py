"""Flag types shared by the driver and the plug-ins' own flags (``methods.base.Plugin.add_arguments``)."""

from __future__ import annotations

import argparse


def str2bool(value: str) -> bool:
    """Real booleans for flags: ``--train_cam_pass false`` means false (the reference's ``is True`` did not)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")
