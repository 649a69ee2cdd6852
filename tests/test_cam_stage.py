"""CAM stage: multi-scale/flip fusion, make_cam resume, eval_cam numbers, tiny end-to-end CAM run."""

import numpy as np
import pytest
import torch

import run_sample
from bench.demo_runs import trivial_baselines
from methods.cam import PlainCAM
from misc.cam_store import normalise, strided_size
from misc.io import load_cam, save_cam
from misc.labels import scores_to_label
from misc.pipeline import prepare_output_dir
from step import eval_cam, make_cam
from step.make_cam import multiscale_cam


class ConstantCAM(torch.nn.Module):
    """cam(x) = a fixed (C, h, w) map per input, with h, w = ceil(size/4): lets fusion be checked by hand."""

    def __init__(self, maps: dict[tuple[int, int], torch.Tensor]) -> None:
        super().__init__()
        self.maps = maps

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape[-2:])
        return torch.stack([self.maps[key], self.maps[key].flip(-1) * 0 + 1])


def test_multiscale_fusion_sums_flips_and_normalises():
    h, w = 8, 12
    base = torch.zeros(3, 2, 3)
    base[1, 0, 0] = 4.0  # class 1 fires at the top-left of the scale-1 map
    model = ConstantCAM({(h, w): base, (4, 6): torch.zeros(3, 1, 2)})
    pairs = [torch.zeros(2, 3, h, w), torch.zeros(2, 3, 4, 6)]
    cam, high = multiscale_cam(PlainCAM(), model, pairs, (h, w), torch.tensor([1, 2]))
    assert cam.shape == (2, *strided_size(h, w)) and high.shape == (2, h, w)
    # Each class is divided by its own max: values lie in [0, 1) and the max is 1 - tiny.
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(2), atol=1e-4)
    # The flipped twin contributes a constant 1 per scale, so class 2 (no activation) is flat everywhere.
    assert torch.allclose(cam[1], cam[1].flatten()[0].expand_as(cam[1]))
    # Class 1 peaks where its scale-1 map fired.
    assert cam[0].argmax() == 0


def test_huge_photos_are_scaled_down_within_max_side_and_cams_keep_full_size():
    huge, small = np.zeros((3000, 2000, 3), np.uint8), np.zeros((300, 200, 3), np.uint8)
    images = [{"name": n, "label": np.ones(2, np.float32), "img": img} for n, img in (("huge", huge), ("small", small))]
    dataset = make_cam.MultiScaleDataset(images, (1.0, 0.5, 2.0), max_side=1200)
    huge_item, small_item = dataset[0], dataset[1]
    # The largest scale's long side lands on 1200; every scale shrinks by the same factor 1200 / 6000.
    assert [tuple(p.shape[-2:]) for p in huge_item["pairs"]] == [(600, 400), (300, 200), (1200, 800)]
    assert [tuple(p.shape[-2:]) for p in small_item["pairs"]] == [(300, 200), (150, 100), (600, 400)]
    assert tuple(huge_item["size"]) == (3000, 2000)
    model = ConstantCAM({(600, 400): torch.rand(3, 150, 100), (300, 200): torch.rand(3, 75, 50),
                         (1200, 800): torch.rand(3, 300, 200)})
    cam, high = multiscale_cam(PlainCAM(), model, huge_item["pairs"], (3000, 2000), torch.tensor([0]))
    assert cam.shape == (1, 750, 500) and high.shape == (1, 3000, 2000)


def test_scores_to_label_by_hand():
    scores = np.array([[[0.1, 0.9], [0.5, 0.2]], [[0.3, 0.1], [0.6, 0.1]]], np.float32)  # classes 4 and 11
    label = scores_to_label(scores, np.array([4, 11]), 0.25)
    assert label.tolist() == [[12, 5], [12, 0]]


def test_tiny_cam_run_beats_trivial_baselines(tiny_run):
    row = tiny_run.metric("eval_cam")
    assert row["split"] == "train" and row["threshold"] == 0.15
    assert set(row["sweep"]) >= {"0.15", "0.05", "0.60"}
    demo = tiny_run.work_dir / "demo_voc12"
    baselines = trivial_baselines(demo, demo / "ImageSets" / "Segmentation" / "train.txt")
    # ~8.6 (all background) and ~18.6 (each image's class everywhere) on this split; three epochs of
    # CAM training on 64 images reach ~26.
    assert row["miou"] > max(baselines.values()) + 4, (row["miou"], baselines)


def test_make_cam_files_and_resume(tiny_run, monkeypatch):
    args = tiny_run.args()
    files = sorted((tiny_run.work_dir / "baseline" / "cam").glob("*.npz"))
    assert len(files) == 64
    cams = load_cam(files[0])
    k = len(cams["keys"])
    assert k >= 1 and cams["cam"].shape[0] == k and cams["high_res"].shape[0] == k
    assert 0.99 < cams["high_res"].max() <= 1.0

    # Interrupt: delete two outputs, then re-run. Only those two are recomputed, the others untouched.
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    files[3].unlink()
    files[7].unlink()
    seen = []
    real = make_cam.save_cam
    monkeypatch.setattr(make_cam, "save_cam", lambda path, *a: (seen.append(path.name), real(path, *a)))
    make_cam.run(args)
    assert sorted(seen) == sorted([files[3].name, files[7].name])
    for f in files:
        if f.name not in seen:
            assert f.stat().st_mtime_ns == mtimes[f.name]
    np.testing.assert_allclose(load_cam(files[0])["cam"], cams["cam"])


def test_changed_inputs_clear_stale_outputs(tmp_path):
    out = prepare_output_dir(tmp_path / "cam", "fp-a", "*.npz")
    save_cam(out / "x.npz", np.array([1]), np.ones((1, 2, 2)), np.ones((1, 5, 5)))
    prepare_output_dir(tmp_path / "cam", "fp-a", "*.npz")
    assert (out / "x.npz").is_file()
    prepare_output_dir(tmp_path / "cam", "fp-b", "*.npz")
    assert not (out / "x.npz").exists()


def test_eval_cam_requires_cams(tmp_path):
    flags = ["--work_dir", str(tmp_path), "--eval_list", str(tmp_path / "ids.txt")]
    args = run_sample.round_args(run_sample.make_args(flags), "baseline")
    (tmp_path / "ids.txt").write_text("2100_000001\n")
    with pytest.raises(Exception, match="make_cam"):
        eval_cam.run(args)


def test_an_image_without_classes_gets_empty_cams():
    model = ConstantCAM({(8, 12): torch.ones(3, 2, 3)})
    pairs = [torch.zeros(2, 3, 8, 12)]
    cam, high = multiscale_cam(PlainCAM(), model, pairs, (8, 12), torch.zeros(0, dtype=torch.long))
    assert cam.shape == (0, 2, 3) and high.shape == (0, 8, 12)
    assert (scores_to_label(high.numpy(), np.zeros(0, np.int64), 0.15) == 0).all()


def test_normalise_divides_by_the_max_or_maps_min_to_max_onto_0_to_1():
    maps = torch.tensor([[[2.0, 3.0], [4.0, 6.0]], [[0.0, 0.0], [0.0, 0.0]]])
    plain = normalise(maps)
    assert torch.allclose(plain[0], maps[0] / (6 + 1e-5)) and plain[1].abs().max() == 0
    shifted = normalise(maps, subtract_min=True)  # SEAM (spec 4.5): (S - m) / (M - m)
    assert torch.allclose(shifted[0], (maps[0] - 2) / (4 + 1e-5)) and shifted.min() == 0
