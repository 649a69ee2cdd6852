"""Threshold calibration (misc.thresholds) and the normalised random walk it pairs with."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import run_sample
from dataset.voc12 import VOC12
from methods.irn import propagate
from misc.errors import UserError
from misc.indexing import random_walk_dense
from misc.pipeline import require_gt
from misc.thresholds import REFERENCE, calibrated, save_calibration, thresholds


def test_reference_best_threshold_gives_back_the_reference_values():
    assert calibrated(0.15, rw_normalize=False) == REFERENCE


def test_calibration_by_hand_at_055():
    # logit(0.55) - logit(0.15) = 0.2007 + 1.7346 = 1.9353; logit(0.30) + 1.9353 = 1.0880 -> 0.748, etc.
    t = calibrated(0.55, rw_normalize=False)
    assert t == {"conf_fg_thres": 0.75, "conf_bg_thres": 0.27, "sem_seg_bg_thres": 0.70, "ins_seg_bg_thres": 0.70}
    # With the normalised walk the walked maps stay in CAM units: their threshold is the CAM's own.
    t = calibrated(0.55, rw_normalize=True)
    assert t["sem_seg_bg_thres"] == t["ins_seg_bg_thres"] == 0.55 and t["conf_fg_thres"] == 0.75


@pytest.mark.parametrize("best", [0.05, 0.15, 0.3, 0.55, 0.8, 0.95])
def test_calibrated_thresholds_keep_their_order(best):
    t = calibrated(best, rw_normalize=False)
    assert 0 < t["conf_bg_thres"] <= best <= t["sem_seg_bg_thres"] <= t["conf_fg_thres"] < 1
    with pytest.raises(ValueError):
        calibrated(1.0, rw_normalize=False)


def _round(tmp_path, *flags: str) -> argparse.Namespace:
    return run_sample.round_args(run_sample.make_args(["--work_dir", str(tmp_path), *flags]), "baseline")


def test_driver_applies_calibration_but_keeps_explicit_flags(tmp_path):
    args = _round(tmp_path, "--conf_bg_thres", "0.2")
    assert args.calibrate_thresholds and args.conf_fg_thres is None and args.conf_bg_thres == 0.2
    with pytest.raises(UserError, match="calibration.json is missing"):
        thresholds(args)
    save_calibration(args, 0.55, "train")
    saved = json.loads((tmp_path / "baseline" / "calibration.json").read_text())
    assert saved["best_cam_threshold"] == 0.55 and saved["rw_normalize"] is True
    values = thresholds(args)
    assert (values["conf_fg_thres"], values["conf_bg_thres"], values["sem_seg_bg_thres"]) == (0.75, 0.2, 0.55)
    assert args.conf_fg_thres is None  # the args are read, never changed


def test_voc_preset_keeps_the_reference():
    args = run_sample.make_args(["--voc12_root", "/nonexistent"])
    assert not args.calibrate_thresholds and not args.rw_normalize and args.exp_times == 8
    assert {n: getattr(args, n) for n in REFERENCE} == REFERENCE and args.calibrated_thresholds == []


def test_normalised_walk_is_the_dense_walk_divided_by_the_walked_mass():
    gen = torch.Generator().manual_seed(3)
    cams = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)
    edge = torch.rand(6, 7, generator=gen, dtype=torch.float64) * 0.6
    args = argparse.Namespace(beta=10, exp_times=4, rw_normalize=True)
    out = propagate(cams, edge, (24, 28), args)
    walked = random_walk_dense(torch.cat([torch.ones_like(cams[:1]), cams]), edge, beta=10, exp_times=4)
    expected = F.interpolate((walked[1:] / walked[:1])[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected)


def test_normalised_walk_keeps_cam_units_where_the_reference_rescales():
    # Two regions split by a closed boundary: object CAM 0.8, context CAM 0.4 (a CAM that spills onto the
    # context). The normalised walk keeps both values, so the CAM threshold 0.55 separates them; the
    # reference divides by the max, which lifts the context to 0.5, far above its threshold 0.25.
    cams = torch.full((1, 10, 12), 0.4, dtype=torch.float64)
    cams[0, :, :5] = 0.8
    edge = torch.zeros(10, 12, dtype=torch.float64)
    edge[:, 5] = 1.0
    size = (40, 48)
    norm = propagate(cams, edge, size, argparse.Namespace(beta=10, exp_times=6, rw_normalize=True))
    assert math.isclose(float(norm[0, :, :16].min()), 0.8, rel_tol=1e-6)
    assert math.isclose(float(norm[0, :, 28:].max()), 0.4, rel_tol=1e-6)
    ref = propagate(cams, edge, size, argparse.Namespace(beta=10, exp_times=6, rw_normalize=False))
    assert math.isclose(float(ref[0, :, 28:].max()), 0.5, rel_tol=1e-4)


def test_missing_ground_truth_names_the_calibration_switch(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(UserError, match=r"2 of 2 .*--calibrate_thresholds false"):
        require_gt(VOC12(tmp_path), ["a", "b"])


def test_an_explicit_threshold_that_crosses_a_calibrated_one_is_an_error(tmp_path):
    args = _round(tmp_path, "--conf_bg_thres", "0.8")
    save_calibration(args, 0.55, "train")  # calibrated confident foreground: 0.75
    with pytest.raises(UserError, match=r"cross.*--conf_bg_thres 0.8 given"):
        thresholds(args)
