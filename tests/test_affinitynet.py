"""AffinityNet (PSA) as a refiner: pair affinities, loss, seeds, alphas, the walk, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import run_sample
from methods.affinitynet import PSA_ALPHAS, alphas, label_from_walk, walk_cams
from misc.crf import aff_label_from_cam, fuse_seeds
from misc.indexing import affinity_labels, get_path_index, walk_affinity
from misc.thresholds import save_calibration
from net.affinitynet import (
    AffinityNet,
    affinity_loss,
    alpha_threshold,
    feature_affinity,
    source_affinity,
    threshold_alpha,
)
from net.factory import build_backbone


def test_feature_affinity_hand_computed():
    feats = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]],
                          [[1.0, 1.0, 1.0], [0.0, 4.0, 1.0]]])[None]  # (1, 2 channels, 2, 3)
    offsets = torch.tensor([[0, 1], [1, 0], [1, -1]])
    aff = feature_affinity(feats, offsets)[0]
    # (0, 0) -> (0, 1): |0 - 1|, |1 - 1| -> mean 0.5
    assert aff[0, 0, 0].item() == pytest.approx(math.exp(-0.5))
    # (0, 1) -> (1, 1): |1 - 2|, |1 - 4| -> mean 2
    assert aff[1, 0, 1].item() == pytest.approx(math.exp(-2.0))
    # (0, 2) -> (1, 1): |3 - 2|, |1 - 4| -> mean 2
    assert aff[2, 0, 2].item() == pytest.approx(math.exp(-2.0))
    # Neighbours outside the map: right of the last column, below the last row, left of the first column.
    assert aff[0, :, 2].abs().sum() == 0 and aff[1, 1].abs().sum() == 0 and aff[2, :, 0].abs().sum() == 0


def test_psa_pair_layout_on_a_56_grid():
    pi = get_path_index(5, (56, 56))
    assert len(pi.offsets) == 34 and pi.n_sources == 52 * 48 == 2496
    zero = np.zeros((56, 56), np.int64)
    bg_pos, fg_pos, neg = affinity_labels(zero, pi)
    assert bg_pos.min() == 1 and fg_pos.max() == 0 and neg.max() == 0


def test_source_affinity_matches_the_label_layout_and_the_loss_vanishes_on_perfect_affinities():
    label = np.zeros((16, 20), np.int64)
    label[:, 9:] = 3
    label[12:, :4] = 255
    pi = get_path_index(5, (16, 20))
    bg_pos, fg_pos, neg = (t[None] for t in affinity_labels(label, pi))
    # Embeddings that are far apart across classes: affinity 1 within a class, ~0 across.
    feats = torch.from_numpy(np.stack([label == 0, label == 3]).astype(np.float32) * 50)[None]
    aff = source_affinity(feats, pi)
    assert aff.shape == bg_pos.shape == (1, 34, pi.n_sources)
    valid = (bg_pos + fg_pos + neg) > 0
    assert torch.all(aff[(bg_pos + fg_pos) > 0] == 1) and torch.all(aff[neg > 0] < 1e-10)
    assert valid.any() and abs(affinity_loss(aff, bg_pos, fg_pos, neg)["total"].item()) < 1e-4
    # Swapped affinities cost a lot.
    assert affinity_loss(1 - aff, bg_pos, fg_pos, neg)["total"].item() > 5


def test_affinity_loss_hand_computed():
    aff = torch.tensor([[[0.5, 0.25, 0.8, 0.1]]])
    bg = torch.tensor([[[1.0, 0, 0, 0]]])
    fg = torch.tensor([[[0, 1.0, 0, 0]]])
    neg = torch.tensor([[[0, 0, 1.0, 1.0]]])
    terms = affinity_loss(aff, bg, fg, neg)
    e = 1e-5
    bg_term = -math.log(0.5 + e) / (1 + e)
    fg_term = -math.log(0.25 + e) / (1 + e)
    neg_term = (-math.log(1 + e - 0.8) - math.log(1 + e - 0.1)) / (2 + e)
    assert terms["bg"].item() == pytest.approx(bg_term, rel=1e-5)
    assert terms["neg"].item() == pytest.approx(neg_term, rel=1e-5)
    assert terms["total"].item() == pytest.approx(bg_term / 4 + fg_term / 4 + neg_term / 2, rel=1e-5)


@pytest.mark.parametrize(("alpha", "threshold"), [(4, 0.2755), (6, 0.2219), (16, 0.1228), (24, 0.0939), (32, 0.0770)])
def test_alpha_thresholds_of_spec_2_5(alpha: float, threshold: float):
    assert alpha_threshold(alpha) == pytest.approx(threshold, abs=1e-4)
    assert threshold_alpha(alpha_threshold(alpha)) == pytest.approx(alpha, rel=1e-6)


def _dense_walk(x: torch.Tensor, aff: torch.Tensor, offsets: torch.Tensor, steps: int) -> torch.Tensor:
    """The references' formulation: symmetric A with unit diagonal, T = A D^-1, x . T^steps."""
    n, h, w = x.shape
    a = torch.eye(h * w, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets.tolist()):
        for y in range(h):
            for xx in range(w):
                if 0 <= y + dy < h and 0 <= xx + dx < w:
                    i, j = y * w + xx, (y + dy) * w + xx + dx
                    a[i, j] = a[j, i] = aff[k, y, xx]
    t = a / a.sum(dim=0, keepdim=True)
    return (x.reshape(n, -1).double() @ torch.linalg.matrix_power(t, steps)).reshape(n, h, w)


def test_walk_affinity_equals_the_dense_walk_and_keeps_constants():
    torch.manual_seed(0)
    offsets = get_path_index(3, (6, 6)).offsets
    h, w = 5, 7
    aff = feature_affinity(torch.rand(1, 4, h, w) * 3, offsets)[0].double()
    x = torch.rand(2, h, w, dtype=torch.float64)
    walked = walk_affinity(x, aff, offsets, 4)
    assert torch.allclose(walked, _dense_walk(x, aff, offsets, 4), atol=1e-10)
    assert walked.min() >= x.min() - 1e-12 and walked.max() <= x.max() + 1e-12
    const = torch.full((1, h, w), 0.3, dtype=torch.float64)
    assert torch.allclose(walk_affinity(const, aff, offsets, 8), const)


def test_fuse_seeds_rules():
    fg_pass = np.array([[0, 3, 3], [0, 0, 5]])
    bg_pass = np.array([[0, 3, 0], [4, 0, 5]])
    assert fuse_seeds(fg_pass, bg_pass).tolist() == [[0, 3, 3], [255, 0, 5]]


def test_psa_seeds_on_bands_of_cam_scores():
    # A flat image, three bands: a confident object (0.9), a weak part (0.15, between PSA's 0.276 and
    # 0.077) and nothing (0.0); the CRF has no edges to follow, so each band's middle keeps its role.
    img = np.full((60, 40, 3), 128, np.uint8)
    cam = np.zeros((1, 60, 40), np.float32)
    cam[0, :20], cam[0, 20:40] = 0.9, 0.15
    seeds = aff_label_from_cam(img, cam, np.array([6]), low_alpha=4, high_alpha=32)
    assert (seeds[2:18] == 7).all() and (seeds[24:36] == 255).all() and (seeds[44:] == 0).all()
    # With both alphas low, the weak band is background too.
    assert (aff_label_from_cam(img, cam, np.array([6]), 4, 4)[24:36] == 0).all()


def _alpha_args(tmp_path: Path, calibrate: bool, **given: float) -> argparse.Namespace:
    args = argparse.Namespace(calibrate_thresholds=calibrate, cam_out_dir=str(tmp_path / "cam"), rw_normalize=True,
                              **{flag: given.get(flag) for flag in PSA_ALPHAS})
    return args


def test_alphas_are_psa_s_or_carried_over_from_the_cam_threshold(tmp_path: Path):
    assert alphas(_alpha_args(tmp_path, False)) == PSA_ALPHAS
    assert alphas(_alpha_args(tmp_path, False, aff_rw_alpha=6.0))["aff_rw_alpha"] == 6.0
    args = _alpha_args(tmp_path, True, aff_high_alpha=24.0)
    save_calibration(args, 0.15, "train")  # IRNet's own best threshold: nothing moves
    assert alphas(args) == pytest.approx({**PSA_ALPHAS, "aff_high_alpha": 24.0}, rel=1e-3)
    save_calibration(args, 0.55, "train")  # CAMs that peak higher: every background wins up to a higher score
    moved = alphas(args)
    assert moved["aff_high_alpha"] == 24.0
    for flag in ("aff_low_alpha", "aff_rw_alpha"):
        assert alpha_threshold(moved[flag]) > alpha_threshold(PSA_ALPHAS[flag]) + 0.2


def test_walk_cams_shapes_and_units():
    torch.manual_seed(0)
    model = AffinityNet(build_backbone("efficientnet_lite0", None)).eval()
    img = torch.randn(1, 3, 37, 50)
    high_res = torch.rand(2, 37, 50)
    walked = walk_cams(model, img, high_res, rw_alpha=4.0, beta=8, logt=3)
    assert walked.shape == (3, 37, 50)
    scores = torch.cat([(1 - high_res.amax(0, keepdim=True)) ** 4, high_res])
    # A walk averages: every walked score lies within the scores' range.
    assert walked.min() >= scores.min() - 1e-5 and walked.max() <= scores.max() + 1e-5
    label = label_from_walk(walked.numpy(), np.array([4, 11]))
    assert label.shape == (37, 50) and set(np.unique(label)) <= {0, 5, 12}


def test_bad_affinity_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    for flags, named in ((["--aff_crop_size", "100"], "--aff_crop_size"), (["--aff_low_alpha", "0"], "--aff_low_alpha"),
                         (["--affinity_weights", "x.pth", "--train_affinity_pass", "true"], "--affinity_weights")):
        assert run_sample.main(["--refiner", "affinitynet", "--work_dir", str(tmp_path / "w"), *flags]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_affinitynet_with_cda_runs_end_to_end(tiny_run, tmp_path: Path):
    work = tmp_path / "aff"
    rows = tiny_run.rerun(work, "--refiner", "affinitynet", "--aff_batch_size", "8", "--aff_num_epoches", "2",
                          "--aff_logt", "4")
    for variant in ("baseline", "cda"):
        assert (work / variant / "sess" / "affinity.pth").is_file()
        seeds = [r for r in rows if r["step"] == "eval_ir_label" and r["variant"] == variant][-1]
        masks = [r for r in rows if r["step"] == "eval_sem_seg" and r["variant"] == variant
                 and r.get("postprocess") is None][-1]
        assert seeds["fg_precision"] > 50 and seeds["bg_precision"] > 80
        # Above labelling everything background (~8.6 mIoU on this split).
        assert masks["miou"] > 12
    log = (work / "log.txt").read_text()
    assert "aff_label_from_cam" in log and "make_sem_seg_affinity" in log
