"""The tiny whole-pipeline run (tests/conftest.py): every stage's outputs, metrics and resume behaviour."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import run_sample
from dataset.base import read_id_list
from misc.instances import rle_to_mask
from misc.io import load_png
from misc.thresholds import calibrated
from step import make_sem_seg_labels
from step.eval_ins_seg import load_detections


def _ids(tiny_run, split):
    return read_id_list(tiny_run.work_dir / "demo_voc12" / "ImageSets" / "Segmentation" / f"{split}.txt")


def test_pseudo_masks_cover_the_training_list_in_both_rounds(tiny_run):
    train_aug = _ids(tiny_run, "train_aug")
    for variant in ("baseline", "cda"):
        masks = tiny_run.work_dir / variant / "sem_seg"
        assert sorted(p.stem for p in masks.glob("*.png")) == sorted(train_aug)
        for image_id in train_aug[:8]:
            mask = load_png(masks / f"{image_id}.png")
            gt = load_png(tiny_run.work_dir / "demo_voc12" / "SegmentationClass" / f"{image_id}.png")
            assert mask.shape == gt.shape and mask.max() <= 20
        ir = load_png(tiny_run.work_dir / variant / "ir_label" / f"{train_aug[0]}.png")
        assert set(np.unique(ir)) <= {0, 255, *range(1, 21)}
        row = tiny_run.metric("eval_sem_seg", variant, postprocess=None)
        assert row["split"] == "train" and set(row["per_class"]) >= {"background", "aeroplane"}
        # Above labelling everything background (~8.6 mIoU on this split).
        assert row["miou"] > 12
        seeds = tiny_run.metric("eval_ir_label", variant)
        assert seeds["images"] == len(set(_ids(tiny_run, "train")) & set(train_aug))
        # Labelling each image's object pixels with its class everywhere would score the object share (~1/4);
        # the seeds are confident, so precise where they label, and leave the uncertain part unlabelled.
        assert seeds["fg_precision"] > 50 and seeds["bg_precision"] > 80 and 5 < seeds["labelled"] < 95


def test_deeplab_learns_from_masks_with_uncertain_background_ignored(tiny_run):
    train_aug = _ids(tiny_run, "train_aug")
    complete, ignoring = (tiny_run.work_dir / "cda" / name for name in ("sem_seg", "sem_seg_ignore"))
    assert sorted(p.stem for p in ignoring.glob("*.png")) == sorted(train_aug)
    ignored = 0
    for image_id in train_aug:
        full, part = load_png(complete / f"{image_id}.png"), load_png(ignoring / f"{image_id}.png")
        # Only background is ever ignored; every labelled pixel keeps the complete mask's label.
        assert (full[part == 255] == 0).all() and (part[part != 255] == full[part != 255]).all()
        ignored += (part == 255).sum()
    assert ignored > 0
    row = tiny_run.metric("eval_sem_seg", "cda", postprocess="ignore_uncertain")
    assert 0 < row["ignored"] < 1 and row["miou"] > 12
    log = (tiny_run.work_dir / "log.txt").read_text()
    assert re.search(r"train_deeplab: .* images \(\S*cda/sem_seg_ignore\)", log)


def test_a_missing_ignore_mask_alone_is_remade(tiny_run):
    args = tiny_run.args("cda")
    args.infer_list = str(tiny_run.work_dir / "demo_voc12" / "ImageSets" / "Segmentation" / "train_aug.txt")
    gone, kept = _ids(tiny_run, "train_aug")[:2]
    folder = Path(args.sem_seg_ignore_dir)
    before = (folder / f"{gone}.png").read_bytes()
    kept_mtime = (folder / f"{kept}.png").stat().st_mtime_ns
    (folder / f"{gone}.png").unlink()
    make_sem_seg_labels.run(args)
    assert (folder / f"{gone}.png").read_bytes() == before
    # Same settings: the folders were not cleared, and no other image was redone.
    assert (folder / f"{kept}.png").stat().st_mtime_ns == kept_mtime


def test_each_round_calibrates_its_thresholds_from_its_own_cam_sweep(tiny_run):
    for variant in ("baseline", "cda"):
        saved = json.loads((tiny_run.work_dir / variant / "calibration.json").read_text())
        assert saved["best_cam_threshold"] == tiny_run.metric("eval_cam", variant)["best_threshold"]
        assert saved == {**saved, **calibrated(saved["best_cam_threshold"], rw_normalize=True)}
    log = (tiny_run.work_dir / "log.txt").read_text()
    assert log.count("calibrated thresholds") >= 2


def test_instance_labels_and_coco_export(tiny_run):
    ids = _ids(tiny_run, "train")
    out = tiny_run.work_dir / "baseline" / "ins_seg"
    det = load_detections(out / f"{ids[0]}.npz")
    h, w = load_png(tiny_run.work_dir / "demo_voc12" / "SegmentationClass" / f"{ids[0]}.png").shape
    assert det["mask"].shape[1:] == (h, w) and len(det["score"]) == len(det["class"]) == len(det["mask"])
    row = tiny_run.metric("eval_ins_seg")
    # A looser IoU threshold can only match more detections.
    assert row["map@0.25"] >= row["map@0.5"] >= row["map@0.75"] >= 0
    coco = json.loads((tiny_run.work_dir / "baseline" / "instances_coco.json").read_text())
    assert len(coco["images"]) == len(ids) and len(coco["categories"]) == 20
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert len(first) == len(det["score"])
    for ann, mask in zip(first, det["mask"], strict=True):
        np.testing.assert_array_equal(rle_to_mask(ann["segmentation"]), mask)


def test_cda_round_trains_on_composites_with_the_reference_schedule(tiny_run):
    bank = tiny_run.work_dir / "cda" / "bank"
    assert (bank / "index.json").is_file() and (bank / "composites.png").is_file()
    rows = [json.loads(x) for x in (tiny_run.work_dir / "cda" / "sess" / "cam.pth.log.jsonl").read_text().splitlines()]
    base = (tiny_run.work_dir / "baseline" / "sess" / "cam.pth.log.jsonl").read_text().splitlines()
    # Half-batches of originals plus their composites: twice the steps of the baseline round.
    assert len(rows) == 2 * len(base) == 48
    # The reference sized the poly schedule for the full batch (T = 24), so the LR falls for steps 0..23
    # and stays at its last value 0.1 * (1/24)^0.9 for the second half.
    lrs = [r["lr"][0] for r in rows]
    assert lrs[0] == 0.1 and all(a > b for a, b in zip(lrs[:23], lrs[1:24], strict=True))
    assert lrs[23:] == [pytest.approx(0.1 * (1 / 24) ** 0.9)] * 25
    assert tiny_run.metric("eval_cam", "cda")["miou"] > 10


def test_deeplab_trained_on_the_last_rounds_masks_and_evaluated_on_val(tiny_run):
    row = tiny_run.metric("eval_deeplab", "cda")
    assert row["split"] == "val" and row["postprocess"] == "msf+crf" and row["labels"] == "pseudo"
    preds = tiny_run.work_dir / "deeplab" / "cda" / "pred_val_crf"
    assert sorted(p.stem for p in preds.glob("*.png")) == sorted(_ids(tiny_run, "val"))


def test_every_metrics_row_names_its_round(tiny_run):
    assert all(r["variant"] in ("baseline", "cda") for r in tiny_run.metrics())


def test_rerun_is_a_resume_not_a_retrain(tiny_run):
    before = {(r["variant"], r["step"]): r.get("miou", r.get("map")) for r in tiny_run.metrics()}
    assert run_sample.main(tiny_run.flags) == 0
    timings = [json.loads(x) for x in (tiny_run.work_dir / "timings.jsonl").read_text().splitlines()]
    second = timings[len(timings) // 2:]
    for t in second:
        if t["step"].startswith(("train_", "make_")):
            assert t["seconds"] < 2, t
    after = {(r["variant"], r["step"]): r.get("miou", r.get("map")) for r in tiny_run.metrics()}
    assert after == before
