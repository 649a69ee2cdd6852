"""Flag types shared by the driver and the plug-ins' own flags (``methods.base.Plugin.add_arguments``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def str2bool(value: str) -> bool:
    """Real booleans for flags: ``--train_cam_pass false`` means false (the reference's ``is True`` did not)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def out_of_bounds(args: argparse.Namespace, names: Iterable[str], minimum: float, strict: bool = False) -> str | None:
    """The error for the first flag of ``names`` whose value is set and below ``minimum`` (``strict``: not
    above it), phrased ``--NAME must be >= MINIMUM`` (``positive`` for strictly above 0); None when all hold.
    Unset flags (None) are left to their preset."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (value <= minimum if strict else value < minimum):
            bound = "positive" if strict and minimum == 0 else f"{'>' if strict else '>='} {minimum}"
            return f"--{name} must be {bound}, got {value}"
    return None
