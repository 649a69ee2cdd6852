"""run_sample flags: real booleans, presets, contradictions, per-round paths, summary table."""

import json

import pytest

import run_sample


def test_bool_flags_mean_what_they_say():
    args = run_sample.make_args(["--train_cam_pass", "false", "--eval_cam_pass", "True", "--cda", "0"])
    assert args.train_cam_pass is False
    assert args.eval_cam_pass is True
    assert args.cda is False


def test_bad_bool_is_rejected(capsys):
    with pytest.raises(SystemExit):
        run_sample.make_args(["--train_cam_pass", "maybe"])
    assert "expected a boolean" in capsys.readouterr().err


def test_preset_fills_only_unset_flags(tmp_path):
    demo = run_sample.make_args(["--work_dir", str(tmp_path)])
    assert demo.preset == "demo" and demo.backbone == "efficientnet_lite0"
    assert demo.voc12_root == str(tmp_path / "demo_voc12")
    assert demo.train_list.endswith("demo_voc12/ImageSets/Segmentation/train_aug.txt")
    voc = run_sample.make_args(["--voc12_root", str(tmp_path), "--cam_batch_size", "4"])
    assert voc.preset == "voc" and voc.backbone == "resnet50" and voc.cam_crop_size == 512
    assert voc.cam_batch_size == 4
    assert voc.train_list.endswith("voc12/data/train_aug.txt")


def test_round_paths_are_separate(tmp_path):
    args = run_sample.make_args(["--work_dir", str(tmp_path)])
    cda = run_sample._round_paths(args, "cda")
    assert args.variant == "baseline" and cda.variant == "cda"
    assert args.cam_out_dir != cda.cam_out_dir and cda.cam_aug and not args.cam_aug
    assert args.cda_bank_dir == cda.cda_bank_dir


def test_given_weights_skip_training_and_contradiction_is_an_error(capsys):
    args = run_sample.make_args(["--cam_weights", "w.pth"])
    assert args.train_cam_pass is False and args.train_irn_pass is True
    with pytest.raises(SystemExit):
        run_sample.make_args(["--cam_weights", "w.pth", "--train_cam_pass", "true"])
    assert "contradict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_sample.make_args(["--conf_fg_thres", "0.1", "--conf_bg_thres", "0.2"])


def test_summary_table_shows_latest_rows(tmp_path):
    rows = [
        {"step": "eval_cam", "variant": "baseline", "split": "train", "miou": 10.0, "threshold": 0.15},
        {"step": "eval_cam", "variant": "baseline", "split": "train", "miou": 42.5, "threshold": 0.15},
        {"step": "eval_ins_seg", "variant": "cda", "split": "train", "map": 12.25},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = run_sample.summary_table(tmp_path)
    assert "42.50" in table and "10.00" not in table and "12.25" in table


def test_eval_released_uses_registry_weights_and_skips_training(tmp_path, capsys):
    args = run_sample.make_args(["--voc12_root", str(tmp_path), "--eval_released", "true"])
    assert args.cam_weights == "cda_irnet_resnet50_cam" and args.irn_weights == "cda_irnet_resnet50_irn"
    assert not (args.train_cam_pass or args.train_irn_pass or args.cda or args.train_deeplab_pass)
    with pytest.raises(SystemExit):
        run_sample.make_args(["--eval_released", "true"])
    assert "--voc12_root" in capsys.readouterr().err
