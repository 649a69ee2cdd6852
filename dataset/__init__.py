"""Dataset descriptions (``DatasetInfo``) by name: the only place that knows classes and folder layouts.

Add a dataset: subclass ``dataset.base.DatasetInfo`` in a module of this package and list it in
``DATASETS`` (see docs/DESIGN.md, "How to add a dataset").
"""

from __future__ import annotations

import argparse
import os

from dataset.base import DatasetInfo
from dataset.cityscapes import Cityscapes
from dataset.coco14 import COCO14
from dataset.voc12 import VOC12
from misc.errors import UserError

DATASETS: dict[str, type[DatasetInfo]] = {d.name: d for d in (VOC12, COCO14, Cityscapes)}


def get_dataset(name: str, root: str | os.PathLike, max_side: int | None = None) -> DatasetInfo:
    """The description of dataset ``name`` rooted at ``root`` (not checked: call ``.check()``), reading photos
    and masks scaled down to ``max_side`` (``DatasetInfo.fit``)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} (--dataset).")
    return DATASETS[name](root, max_side)


def from_args(args: argparse.Namespace) -> DatasetInfo:
    """The dataset a run's ``args`` name (``args.dataset`` at ``args.data_root``, ``args.max_image_side``)."""
    return get_dataset(args.dataset, args.data_root, getattr(args, "max_image_side", None))
