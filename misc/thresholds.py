"""Threshold calibration: carry IRNet's VOC thresholds over to CAMs of another backbone or dataset.

IRNet's thresholds (CAM evaluation 0.15, seeds 0.30 / 0.05, pseudo-mask background 0.25) were chosen on
VOC train for ResNet-50 CAMs, whose best evaluation threshold is 0.15. CAMs of another backbone or dataset
peak elsewhere (EfficientNet-Lite0 on the demo: 0.55), and the seed thresholds must move with them.

``--calibrate_thresholds`` does that from the eval_cam sweep on the evaluation split, which uses that
split's ground truth, as the reference's own choice did. With ``t*`` the best CAM threshold of the sweep,
every threshold keeps its reference distance from the reference's best threshold in logit space::

    logit(thr) = logit(t*) + logit(thr_reference) - logit(0.15)

so ``t* = 0.15`` gives back exactly the reference values. With ``--rw_normalize`` the walked maps stay in
CAM units (see ``step.make_sem_seg_labels.propagate``), so their background thresholds are ``t*`` itself.
eval_cam writes the result to ``<round>/calibration.json``; the later steps read their thresholds through
``thresholds(args)``, which takes the calibrated values for the thresholds the user left unset.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from misc.errors import UserError
from misc.io import save_json

log = logging.getLogger("wsss")

REFERENCE_BEST = 0.15
REFERENCE = {"conf_fg_thres": 0.30, "conf_bg_thres": 0.05, "sem_seg_bg_thres": 0.25, "ins_seg_bg_thres": 0.25}
WALKED = ("sem_seg_bg_thres", "ins_seg_bg_thres")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def carried(reference: float, best: float) -> float:
    """A threshold chosen for CAMs whose best threshold is ``REFERENCE_BEST``, carried over to CAMs whose
    best is ``best``: the same distance from the best in logit space."""
    if not 0 < best < 1:
        raise ValueError(f"best CAM threshold {best} is not in (0, 1)")
    return _sigmoid(_logit(reference) + _logit(best) - _logit(REFERENCE_BEST))


def calibrated(best: float, rw_normalize: bool) -> dict[str, float]:
    """The thresholds that follow from a best CAM threshold ``best`` (in (0, 1)), rounded to 0.01."""
    out = {name: round(carried(ref, best), 2) for name, ref in REFERENCE.items()}
    if rw_normalize:
        out.update({name: round(best, 2) for name in WALKED})
    return out


def calibration_path(args: argparse.Namespace) -> Path:
    return Path(args.cam_out_dir).parent / "calibration.json"


def save_calibration(args: argparse.Namespace, best: float, split: str) -> None:
    """Write ``calibration.json`` for this round: the sweep's best threshold and, for the reader, the
    thresholds that follow from it."""
    save_json(calibration_path(args), {"best_cam_threshold": best, "split": split,
                                       "rw_normalize": args.rw_normalize, **calibrated(best, args.rw_normalize)})


def thresholds(args: argparse.Namespace) -> dict[str, float]:
    """This round's four thresholds (``REFERENCE``'s names): those named in ``args.calibrated_thresholds``
    (the ones the user left unset) from the round's ``calibration.json``, written by eval_cam; the others
    as given."""
    values = {name: getattr(args, name) for name in REFERENCE}
    if not args.calibrated_thresholds:
        return values
    path = calibration_path(args)
    if not path.is_file():
        raise UserError(f"{path} is missing: --calibrate_thresholds needs eval_cam's sweep; run eval_cam first "
                        "(--eval_cam_pass true), or set the thresholds yourself with --calibrate_thresholds false")
    saved = json.loads(path.read_text())
    derived = calibrated(saved["best_cam_threshold"], args.rw_normalize)
    values.update({name: derived[name] for name in args.calibrated_thresholds})
    if values["conf_bg_thres"] >= values["conf_fg_thres"]:
        given = [f"--{n} {getattr(args, n)}" for n in ("conf_bg_thres", "conf_fg_thres")
                 if getattr(args, n) is not None]
        raise UserError(f"the seed thresholds cross: confident background {values['conf_bg_thres']} is not below "
                        f"confident foreground {values['conf_fg_thres']} ({' and '.join(given)} given, the other "
                        f"calibrated from the best CAM threshold {saved['best_cam_threshold']}): give both, or "
                        "neither.")
    log.info("calibrated thresholds (%s, best CAM threshold %.2f on %s): %s", args.variant,
             saved["best_cam_threshold"], saved["split"], ", ".join(f"{n} {v}" for n, v in values.items()))
    return values
