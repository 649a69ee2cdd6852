"""run_sample flags: real booleans, presets, contradictions, per-round paths, summary table."""

import argparse
import json

import pytest

import run_sample
from misc.errors import UserError
from misc.flags import out_of_bounds


def test_bool_flags_mean_what_they_say():
    args = run_sample.make_args(["--train_cam_pass", "false", "--eval_cam_pass", "True", "--cda", "0"])
    assert args.train_cam_pass is False
    assert args.eval_cam_pass is True
    assert args.cda is False


def test_bad_bool_is_rejected():
    with pytest.raises(UserError, match="expected a boolean"):
        run_sample.make_args(["--train_cam_pass", "maybe"])


def test_out_of_bounds_names_the_first_bad_flag_and_leaves_unset_ones():
    args = argparse.Namespace(a=None, b=0, c=-1, d=0.5)
    assert out_of_bounds(args, ("a", "b", "c"), 0) == "--c must be >= 0, got -1"
    assert out_of_bounds(args, ("a", "b", "c"), 0, strict=True) == "--b must be positive, got 0"
    assert out_of_bounds(args, ("d",), 1) == "--d must be >= 1, got 0.5"
    assert out_of_bounds(args, ("a", "d"), 0, strict=True) is None


def test_preset_fills_only_unset_flags(tmp_path):
    demo = run_sample.make_args(["--work_dir", str(tmp_path)])
    assert demo.preset == "demo" and demo.backbone == "efficientnet_lite0" and demo.dataset == "voc12"
    assert demo.data_root == str(tmp_path / "demo_voc12")
    assert demo.train_list is None  # resolved once the demo is generated
    voc = run_sample.make_args(["--voc12_root", str(tmp_path / "VOC2012"), "--cam_batch_size", "4"])
    assert voc.preset == "voc" and voc.backbone == "resnet50" and voc.cam_crop_size == 512
    assert voc.cam_batch_size == 4 and voc.dataset == "voc12" and voc.data_root == str(tmp_path / "VOC2012")
    photos = run_sample.make_args(["--voc12_root", str(tmp_path / "photos"), "--preset", "photos",
                                   "--exp_times", "4"])
    # The demo's networks and walk, the CAM network trained longer on larger crops; given flags still win.
    assert photos.backbone == "efficientnet_lite0" and photos.calibrate_thresholds and photos.rw_normalize
    assert (photos.cam_num_epoches, photos.cam_crop_size, photos.deeplab_iters, photos.exp_times) == (15, 224, 800, 4)


def _voc_folder(root, lists):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def test_a_voc_layout_folder_runs_on_its_own_lists(tmp_path):
    # Not VOC itself: the shipped train_aug (VOC's ids) does not fit it, so its own train list trains too.
    _voc_folder(tmp_path / "photos", {"train": ["x1", "x2"], "val": ["y1"]})
    args = run_sample.make_args(["--voc12_root", str(tmp_path / "photos"), "--work_dir", str(tmp_path / "w")])
    own = tmp_path / "photos" / "ImageSets" / "Segmentation"
    assert (args.train_list, args.val_list, args.eval_list) == (str(own / "train.txt"), str(own / "val.txt"),
                                                                 str(own / "train.txt"))
    assert args.test_list.endswith("voc12/data/test.txt") and args.deeplab_train_list == args.train_list
    _voc_folder(tmp_path / "bare", {})
    with pytest.raises(UserError, match="--val_list"):
        run_sample.make_args(["--voc12_root", str(tmp_path / "bare"), "--train_list", str(own / "train.txt")])


def test_a_demo_whose_generation_was_interrupted_is_regenerated(tmp_path):
    # What a kill during the demo's generation leaves: its folders, some files, no lists and no manifest.
    (tmp_path / "demo_voc12" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "demo_voc12" / "ImageSets" / "Segmentation").mkdir(parents=True)
    steps = [x for step in run_sample.STEP_PASSES for x in (f"--{step}_pass", "false")]
    assert run_sample.main(["--work_dir", str(tmp_path), "--demo_size", "6", "3", "3", *steps]) == 0
    lists = tmp_path / "demo_voc12" / "ImageSets" / "Segmentation"
    assert len((lists / "train_aug.txt").read_text().split()) == 6 and len(list((tmp_path / "demo_voc12" /
                                                                                 "JPEGImages").iterdir())) == 9


def test_round_paths_are_separate(tmp_path):
    args = run_sample.make_args(["--work_dir", str(tmp_path)])
    base, cda = run_sample.round_args(args, "baseline"), run_sample.round_args(args, "cda")
    assert base.variant == "baseline" and cda.variant == "cda" and not hasattr(args, "variant")
    assert base.cam_out_dir != cda.cam_out_dir and cda.cam_aug and not base.cam_aug
    assert base.cda_bank_dir == cda.cda_bank_dir and cda.bank_masks_dir == base.sem_seg_out_dir
    # The baseline round makes masks for CDA's bank (every training image), the last round for DeepLab.
    assert base.infer_list == args.train_list and cda.infer_list == args.deeplab_train_list


def test_a_dataset_without_background_trains_the_segmenter_on_its_masks(tmp_path):
    (tmp_path / "cs" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(UserError, match="--deeplab_gt true"):
        run_sample.make_args(["--dataset", "cityscapes", "--data_root", str(tmp_path / "cs")])
    with pytest.raises(UserError, match="no demo dataset for cityscapes"):
        run_sample.make_args(["--dataset", "cityscapes"])


def test_given_weights_skip_training_and_contradiction_is_an_error():
    args = run_sample.make_args(["--cam_weights", "w.pth"])
    assert args.train_cam_pass is False and args.train_irn_pass is True
    with pytest.raises(UserError, match="contradict"):
        run_sample.make_args(["--cam_weights", "w.pth", "--train_cam_pass", "true"])
    with pytest.raises(UserError):
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


def test_eval_released_uses_registry_weights_and_skips_training(tmp_path):
    args = run_sample.make_args(["--voc12_root", str(tmp_path / "VOC2012"), "--eval_released", "true"])
    assert args.cam_weights == "cda_irnet_resnet50_cam" and args.irn_weights == "cda_irnet_resnet50_irn"
    assert not (args.train_cam_pass or args.train_irn_pass or args.cda or args.train_deeplab_pass)
    with pytest.raises(UserError, match="--voc12_root"):
        run_sample.make_args(["--eval_released", "true"])


def test_eval_released_psa_walks_cda_s_resnet38_files_with_psa_s_settings(tmp_path, capsys):
    args = run_sample.make_args(["--voc12_root", str(tmp_path / "VOC2012"), "--eval_released", "psa",
                                 "--affinity_weights", "mine.pth"])
    assert (args.backbone, args.backbone_weights, args.refiner) == ("resnet38", None, "affinitynet")
    assert args.cam_weights == "cda_resnet38_psa_cam" and args.affinity_weights == "mine.pth"  # given weights win
    assert (args.aff_rw_alpha, args.aff_logt, tuple(args.cam_scales)) == (16.0, 8, (1.0, 0.5, 1.5, 2.0))
    assert not (args.train_cam_pass or args.train_affinity_pass or args.cda or args.train_deeplab_pass)
    seam = run_sample.make_args(["--voc12_root", str(tmp_path / "VOC2012"), "--eval_released", "seam"])
    assert (seam.cam_method, seam.cam_weights, seam.affinity_weights) == (
        "seam", "cda_resnet38_seam_cam", "cda_resnet38_seam_aff")
    assert (seam.aff_rw_alpha, seam.aff_logt, tuple(seam.cam_scales)) == (6.0, 6, (0.5, 1.0, 1.5, 2.0))
    assert run_sample.main(["--voc12_root", str(tmp_path / "VOC2012"), "--eval_released", "psx",
                            "--work_dir", str(tmp_path / "w")]) == 2
    assert "--eval_released" in capsys.readouterr().err and not (tmp_path / "w").exists()
