"""Bad input never destroys finished work, never shows a traceback: each case exits 2 with one line naming
the flag or file, and the finished work dir of the tiny run is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import run_sample
from misc.io import IN_PROGRESS

# (name, extra flags, text the message must contain); "{tmp}" is a scratch folder of the case.
CASES = [
    ("cam threshold above 1", ["--cam_eval_thres", "1.5"], "--cam_eval_thres must lie in (0, 1)"),
    ("cam threshold 0", ["--cam_eval_thres", "0"], "--cam_eval_thres"),
    ("negative fg threshold", ["--conf_fg_thres", "-0.1"], "--conf_fg_thres"),
    ("bg threshold 1", ["--conf_bg_thres", "1.0"], "--conf_bg_thres"),
    ("walk threshold 2", ["--sem_seg_bg_thres", "2"], "--sem_seg_bg_thres"),
    ("instance threshold 0", ["--ins_seg_bg_thres", "0"], "--ins_seg_bg_thres"),
    ("sweep outside (0, 1)", ["--cam_eval_sweep", "0.5", "1.2"], "--cam_eval_sweep"),
    ("crossing seed thresholds", ["--conf_fg_thres", "0.1", "--conf_bg_thres", "0.2"], "--conf_bg_thres"),
    ("zero CAM scale", ["--cam_scales", "0"], "--cam_scales must be positive"),
    ("negative CAM scale", ["--cam_scales", "-1", "1"], "--cam_scales"),
    ("zero DeepLab scale", ["--deeplab_eval_scales", "0"], "--deeplab_eval_scales"),
    ("zero resize", ["--cam_resize_long", "0", "160"], "--cam_resize_long"),
    ("zero CAM epochs", ["--cam_num_epoches", "0"], "--cam_num_epoches must be >= 1"),
    ("zero IRN epochs", ["--irn_num_epoches", "0"], "--irn_num_epoches"),
    ("zero DeepLab iterations", ["--deeplab_iters", "0"], "--deeplab_iters"),
    ("zero CAM batch", ["--cam_batch_size", "0"], "--cam_batch_size"),
    ("negative IRN batch", ["--irn_batch_size", "-2"], "--irn_batch_size"),
    ("zero DeepLab batch", ["--deeplab_batch_size", "0"], "--deeplab_batch_size"),
    ("zero CAM crop", ["--cam_crop_size", "0"], "--cam_crop_size"),
    ("IRN crop below the pair radius", ["--irn_crop_size", "16"], "--irn_crop_size 16 is too small"),
    ("negative workers", ["--num_workers", "-1"], "--num_workers must be >= 0"),
    ("negative seed", ["--seed", "-3"], "--seed"),
    ("negative walk length", ["--exp_times", "-1"], "--exp_times"),
    ("zero report images", ["--report_images", "0"], "--report_images"),
    ("bad demo sizes", ["--demo_size", "4", "8", "2"], "--demo_size"),
    ("unknown device", ["--device", "gpu7"], "--device 'gpu7'"),
    ("CUDA without a GPU", ["--device", "cuda"], "--device cpu"),
    ("CDA ratio bounds", ["--cda_min_ratio", "0.8", "--cda_max_ratio", "0.5"], "--cda_min_ratio"),
    ("weights and training together", ["--cam_weights", "{tmp}/w.pth", "--train_cam_pass", "true"], "contradict"),
    ("not a boolean", ["--train_cam_pass", "maybe"], "expected a boolean"),
    ("unknown dataset", ["--dataset", "imagenet"], "--dataset"),
    ("unknown backbone", ["--backbone", "vgg99"], "--backbone"),
    ("unknown flag", ["--cam_lerning_rate", "0.1"], "--cam_lerning_rate"),
    ("missing CAM weights", ["--cam_weights", "{tmp}/missing.pth"], "missing.pth"),
    ("text file as CAM weights", ["--cam_weights", "{tmp}/notes.txt"], "--cam_weights: cannot read checkpoint"),
    ("truncated CAM weights", ["--cam_weights", "{tmp}/truncated.pth"], "truncated.pth"),
    ("unknown registry name", ["--cam_weights", "resnet50_camm"], "resnet50_camm"),
    ("missing IRN weights", ["--irn_weights", "{tmp}/irn_typo.pth"], "irn_typo.pth"),
    ("missing backbone weights", ["--backbone_weights", "{tmp}/nothere.pth"], "nothere.pth"),
    ("garbage DeepLab weights", ["--deeplab_weights", "{tmp}/notes.txt"], "--deeplab_weights"),
    ("a list of tensors as weights", ["--cam_weights", "{tmp}/list.pth"], "not a state dict"),
    ("missing train list", ["--train_list", "{tmp}/nolist.txt"], "nolist.txt is missing"),
    ("empty train list", ["--train_list", "{tmp}/empty.txt"], "lists no image"),
    ("duplicate ids", ["--eval_list", "{tmp}/twice.txt"], "more than once"),
    ("list shorter than a batch", ["--train_list", "{tmp}/three.txt"], "fewer than one training batch"),
    ("ids without images", ["--val_list", "{tmp}/ghosts.txt"], "images are missing"),
    ("missing config", ["--config", "{tmp}/none.yaml"], "none.yaml"),
    ("config with a typo", ["--config", "{tmp}/typo.yaml"], "cam_lerning_rate"),
    ("missing dataset root", ["--voc12_root", "{tmp}/VOCdevkit/VOC2012"], "does not exist"),
    ("a folder that is not VOC", ["--voc12_root", "{tmp}"], "does not look like VOC2012"),
    ("Cityscapes without masks to learn", ["--dataset", "cityscapes", "--data_root", "{tmp}"], "--deeplab_gt"),
    ("work dir is a file", ["--work_dir", "{tmp}/notes.txt"], "notes.txt is a file"),
    ("work dir under a file", ["--work_dir", "{tmp}/notes.txt/run"], "notes.txt is a file"),
]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: its content hash and permission bits."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, tiny_run) -> Path:
    """Bad files for the cases: text and truncated weights, bad lists and configs."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "notes.txt").write_text("these are not weights\n")
    good = (tiny_run.work_dir / "baseline" / "sess" / "cam.pth").read_bytes()
    (tmp / "truncated.pth").write_bytes(good[: len(good) // 3])
    torch.save([torch.zeros(2)], tmp / "list.pth")
    (tmp / "w.pth").write_bytes(good)
    train = (tiny_run.work_dir / "demo_voc12" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (tmp / "empty.txt").write_text("\n")
    (tmp / "twice.txt").write_text("".join(f"{i}\n" for i in [*train[:5], train[0]]))
    (tmp / "three.txt").write_text("".join(f"{i}\n" for i in train[:3]))
    (tmp / "ghosts.txt").write_text("2100_999998\n2100_999999\n")
    (tmp / "typo.yaml").write_text("seed: 0\ncam_lerning_rate: 0.1\n")
    return tmp


@pytest.mark.parametrize(("name", "flags", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line_and_touches_nothing(tiny_run, scratch, capsys, name, flags, expected):
    if name == "CUDA without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = _snapshot(tiny_run.work_dir)
    scratch_before = _snapshot(scratch)
    flags = [f.replace("{tmp}", str(scratch)) for f in flags]
    assert run_sample.main([*tiny_run.flags, *flags]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], err
    assert _snapshot(tiny_run.work_dir) == before
    assert _snapshot(scratch) == scratch_before


def test_at_least_forty_cases():
    assert len(CASES) >= 40


def test_read_only_work_dir(tmp_path, capsys, monkeypatch):
    tmp_path.chmod(0o500)
    if os.geteuid() == 0:  # root writes into read-only folders; the check asks os.access, so let it answer no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    try:
        assert run_sample.main(["--work_dir", str(tmp_path / "run")]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert f"({tmp_path} is read-only)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_corrupt_photo_met_while_training_is_one_line_and_keeps_the_finished_run(tiny_run, tmp_path, capsys):
    """A JPEG that is only found broken in a loader worker, mid-training: one line naming it, and the finished
    run's files (weights, their log, every output) stay as they were. ``config.yaml``, ``log.txt`` and
    ``timings.jsonl`` record the latest invocation, and the failed training's own log is the only new file."""
    data = tmp_path / "voc"
    shutil.copytree(tiny_run.work_dir / "demo_voc12", data)
    work = tmp_path / "work"
    shutil.copytree(tiny_run.work_dir, work, ignore=shutil.ignore_patterns("demo_voc12"))
    train = (data / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    broken = data / "JPEGImages" / f"{train[5]}.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    flags = [*tiny_run.flags[2:], "--work_dir", str(work), "--voc12_root", str(data), "--preset", "demo",
             "--seed", "7", "--num_workers", "1"]
    before = _snapshot(work)
    assert run_sample.main(flags) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(broken) in errors[0]
    after = _snapshot(work)
    changed = [f for f in before if after.get(f) != before[f]]
    assert sorted(changed) == ["config.yaml", "log.txt", "timings.jsonl"], changed
    assert IN_PROGRESS in after  # the failed run is marked unfinished, so no benchmark counts it
    new = [f for f in after if f not in before and f != IN_PROGRESS]
    assert new == [] or (len(new) == 1 and new[0].startswith("baseline/sess/cam.") and new[0].endswith(".log.jsonl"))
