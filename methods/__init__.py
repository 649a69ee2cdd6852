"""The plug-ins by name: CAM methods (``--cam_method``), refiners (``--refiner``), segmenters (``--segmenter``).

Register a new one in its table below; see ``methods.base`` for the interfaces and docs/DESIGN.md.
"""

from __future__ import annotations

import argparse

from methods.affinitynet import AffinityNetRefiner
from methods.agmm import AGMMSegmenter
from methods.base import CAMMethod, Refiner, Segmenter
from methods.cam import PlainCAM
from methods.deeplab import DeepLabSegmenter
from methods.irn import IRNRefiner
from methods.orand import ORANDNet
from methods.ppl import PPL
from methods.rca import RCA
from methods.saliency import SaliencyRefiner
from methods.seam import SEAM
from methods.vit import ViTCAM
from misc.errors import UserError

CAM_METHODS: dict[str, type[CAMMethod]] = {m.name: m for m in (PlainCAM, PPL, SEAM, ORANDNet, ViTCAM, RCA)}
REFINERS: dict[str, type[Refiner]] = {m.name: m for m in (IRNRefiner, AffinityNetRefiner, SaliencyRefiner)}
SEGMENTERS: dict[str, type[Segmenter]] = {m.name: m for m in (DeepLabSegmenter, AGMMSegmenter)}


def _lookup(table: dict, name: str, flag: str):  # noqa: ANN202 - returns an instance of the table's type
    if name not in table:
        raise UserError(f"unknown {flag} {name!r}: choose one of {', '.join(table)}.")
    return table[name]()


def cam_method(args: argparse.Namespace) -> CAMMethod:
    return _lookup(CAM_METHODS, args.cam_method, "--cam_method")


def refiner(args: argparse.Namespace) -> Refiner:
    return _lookup(REFINERS, args.refiner, "--refiner")


def segmenter(args: argparse.Namespace) -> Segmenter:
    return _lookup(SEGMENTERS, args.segmenter, "--segmenter")
