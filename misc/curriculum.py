"""The segmenter's scale curriculum (orandnet spec 8, ``--deeplab_scale_schedule``): small images first.

A schedule is a list of ``(factor, fraction)`` phases, e.g. ``0.5:1,0.75:1,1:1`` (fractions are relative
weights: thirds here), over the segmenter's ``--deeplab_iters``. During a phase each training image and its
mask are scaled by the phase's factor before the usual random rescale, flip and crop; the crop size stays,
so a small image is padded (image 0, mask 255). The learning rate's poly schedule spans the whole run.

The factor is applied by scaling the random rescale's range (``SegmentationDataset.scale_range``) by it: one
resampling by ``factor * s`` of the same ``s`` (image bicubic, mask nearest), the geometry of the spec's
bilinear pre-downscale followed by the rescale, without interpolating the image twice.

Determinism: the factor of a sample is that of the global iteration ``t`` that draws it, and
``misc.pipeline.epoch_loader`` hands each sample its ``t`` (datasets with ``needs_step``), so the images and
scales of iteration ``t`` depend on the seed and ``t`` only, and a resumed run repeats them exactly.
"""

from __future__ import annotations

import argparse
import bisect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ScaleSchedule:
    """Phases ``(factor, fraction)`` over ``total`` iterations; ``bounds[i]`` is the first iteration after
    phase ``i`` (the fractions' running sums times ``total``, rounded)."""

    factors: tuple[float, ...]
    bounds: tuple[int, ...]

    @classmethod
    def build(cls, phases: list[tuple[float, float]], total: int) -> ScaleSchedule:
        weight = sum(f for _, f in phases)
        bounds, run = [], 0.0
        for _, fraction in phases:
            run += fraction
            bounds.append(round(total * run / weight))
        return cls(tuple(float(s) for s, _ in phases), tuple(bounds))

    def factor(self, step: int) -> float:
        """The scale factor of 0-based iteration ``step`` (steps past the end keep the last phase's)."""
        return self.factors[min(bisect.bisect_right(self.bounds, step), len(self.factors) - 1)]


def parse_scale_schedule(text: str | None) -> list[tuple[float, float]] | None:
    """``"0.5:1,0.75:1,1:2"`` -> ``[(0.5, 1.0), (0.75, 1.0), (1.0, 2.0)]``; ``"0.5,1"`` gives equal phases;
    ``None``, ``""`` or ``"none"``: no curriculum. ``ValueError`` naming the bad part otherwise."""
    if text is None or text.strip().lower() in ("", "none", "off", "false"):
        return None
    phases = []
    for part in text.split(","):
        factor, _, fraction = part.strip().partition(":")
        try:
            phase = (float(factor), float(fraction) if fraction else 1.0)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not FACTOR[:FRACTION]") from None
        if not phase[0] > 0 or not phase[1] > 0:
            raise ValueError(f"{part.strip()!r}: factor and fraction must be positive")
        phases.append(phase)
    return phases


def schedule_flag(text: str) -> str:
    """argparse type of ``--deeplab_scale_schedule``: the text itself, once it parses (config.yaml keeps it)."""
    try:
        parse_scale_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected e.g. 0.5:1,0.75:1,1:1 (factor:fraction, ...)") from None
    return text


class ScheduledScale(torch.utils.data.Dataset):
    """A ``SegmentationDataset`` whose random-scale range follows a :class:`ScaleSchedule` by iteration.

    Indexed by ``(index, step)`` pairs (``needs_step``; ``misc.pipeline.epoch_loader`` makes them); a plain
    ``index`` is iteration 0's. Items are the wrapped dataset's.
    """

    needs_step = True

    def __init__(self, dataset: Any, schedule: ScaleSchedule) -> None:
        self.dataset = dataset
        self.schedule = schedule
        self.base_range = tuple(dataset.scale_range)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, step = key if isinstance(key, tuple) else (key, 0)
        factor = self.schedule.factor(step)
        # Each loader worker holds its own copy of the wrapped dataset and reads one item at a time, so
        # setting the range just before the read is local to this item.
        self.dataset.scale_range = (self.base_range[0] * factor, self.base_range[1] * factor)
        item = self.dataset[index]
        item["scale_factor"] = factor
        return item
