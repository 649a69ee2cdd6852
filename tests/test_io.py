"""Atomic writes, metrics rows and user errors: what a run leaves on disk and tells its user."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.samples import ImageDataset, single_collate
from dataset.voc12 import VOC12
from misc.errors import UserError, user_message
from misc.io import atomic_write, read_metrics, record_metrics
from misc.pipeline import gt_confusions, prepare_output_dir
from misc.train import already_trained, progress_log_path, save_trained


def test_atomic_write_keeps_the_umasks_permissions(tmp_path: Path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "shared.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    # Others in a shared group can read it; the temporary file's 0600 does not leak through.
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_a_rerun_replaces_its_metrics_row(tmp_path: Path):
    record_metrics(tmp_path, {"step": "eval_cam", "variant": "baseline", "miou": 10.0})
    record_metrics(tmp_path, {"step": "eval_sem_seg", "variant": "baseline", "miou": 20.0})
    record_metrics(tmp_path, {"step": "eval_cam", "variant": "baseline", "miou": 11.0})
    record_metrics(tmp_path, {"step": "eval_cam", "variant": "cda", "miou": 12.0})
    record_metrics(tmp_path, {"step": "eval_deeplab", "variant": "cda", "labels": "gt", "miou": 80.0})
    record_metrics(tmp_path, {"step": "eval_deeplab", "variant": "cda", "labels": "pseudo", "miou": 50.0})
    rows = [(r["variant"], r["step"], r["miou"]) for r in read_metrics(tmp_path)]
    assert rows == [("baseline", "eval_sem_seg", 20.0), ("baseline", "eval_cam", 11.0), ("cda", "eval_cam", 12.0),
                    ("cda", "eval_deeplab", 80.0), ("cda", "eval_deeplab", 50.0)]


def test_temporary_files_of_an_interrupted_run_are_cleaned(tmp_path: Path):
    out = prepare_output_dir(tmp_path / "ir_label", "fp", "*.png")
    (out / ".a.png.x1y2.tmp").write_bytes(b"half")
    (out / "a.png").write_bytes(b"done")
    prepare_output_dir(tmp_path / "ir_label", "fp", "*.png")
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", "a.png"]


def test_an_error_in_a_loader_worker_reaches_the_user_as_one_line(tmp_path: Path):
    (tmp_path / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "JPEGImages" / "good.jpg")
    (tmp_path / "JPEGImages" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    loader = torch.utils.data.DataLoader(ImageDataset(VOC12(tmp_path), ["good", "bad"]), batch_size=1,
                                         num_workers=1, collate_fn=single_collate)
    with pytest.raises(UserError) as caught:
        list(loader)
    assert "Traceback" in str(caught.value)  # what torch hands over
    message = user_message(caught.value)
    assert message.startswith(f"image {tmp_path / 'JPEGImages' / 'bad.jpg'} is unreadable or corrupt")
    assert "Traceback" not in message and "\n" not in message
    assert user_message(UserError("plain\nmessage")) == "plain\nmessage"


def test_a_ground_truth_value_outside_the_labels_names_the_mask(tmp_path: Path):
    (tmp_path / "SegmentationClass").mkdir()
    Image.fromarray(np.array([[0, 1], [40, 255]], np.uint8)).save(tmp_path / "SegmentationClass" / "a.png")
    with pytest.raises(UserError, match=r"SegmentationClass/a.png has values \[40\] that are neither"):
        gt_confusions(VOC12(tmp_path), "a", [np.zeros((2, 2), np.uint8)])


def test_trained_weights_are_reused_only_for_the_same_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    out = tmp_path / "net.pth"
    assert not already_trained(out, "fp-a", "train_x")
    progress_log_path(out, "fp-a").write_text("")  # what the training loop leaves for save_trained to finish
    save_trained(torch.nn.Linear(2, 1), out, "fp-a")
    with caplog.at_level(logging.INFO, logger="wsss"):
        assert already_trained(out, "fp-a", "train_x")
    assert "train_x: " in caplog.text and "is up to date" in caplog.text
    assert not already_trained(out, "fp-b", "train_x")  # other settings or inputs: train again
