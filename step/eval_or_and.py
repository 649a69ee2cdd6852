"""Score ORANDNet's OR and AND stores as eval_cam scores a CAM store (rows ``eval_or_cam``, ``eval_and_cam``).

With their precision and recall (orandnet spec 9), the rows show the two ends the ORAND CAM (eval_cam's
row) lies between: OR high recall, AND high precision. They calibrate nothing.
"""

from __future__ import annotations

import argparse

from methods.orand import orand_paths
from misc import dist
from misc.pipeline import record, score_cam_store


def run(args: argparse.Namespace) -> None:
    if not dist.is_main():
        return
    paths = orand_paths(args)
    for step, store in (("eval_or_cam", paths["or"]), ("eval_and_cam", paths["and"])):
        record(args, score_cam_store(args, store, step, "combine_cams"))
