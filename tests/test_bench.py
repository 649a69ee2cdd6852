"""Smoke test of ``python -m bench --quick``: the markdown section is written in place, and the sparse
random walk agrees with the dense reference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import compare, demo_runs, saliency_quality
from bench.suite import COLUMNS, END, START
from misc.io import IN_PROGRESS

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_its_section_only(tmp_path):
    out = tmp_path / "benchmarks.md"
    others = "# Benchmarks\n\nkept above\n\n<!-- other:start -->\nsomeone else's section\n<!-- other:end -->\n"
    out.write_text(f"{others}\n{START}\nstale numbers\n{END}\n\nkept below\n")
    # One thread: a smoke test must not fight other work for the cores (OpenMP spin-waits degrade badly).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSSS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = out.read_text()
    assert text.startswith(others) and text.rstrip().endswith("kept below")
    assert "stale numbers" not in text and text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START):text.index(END)]
    assert "python -m bench --quick --device cpu --out" in section and "torch " in section
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")]
    assert rows[0][0] == "| " + COLUMNS[0]
    names = {r[0].lstrip("| ") for r in rows[1:]}
    assert names == {"make_cam", "random walk", "CRF (cam_to_ir_label)", "make_sem_seg", "train_cam", "train_irn",
                     "train_deeplab"}
    checks = [re.search(r"max abs diff (\S+) \(of max (\S+)\)", line) for line in section.splitlines()
              if line.startswith("| random walk |") and "dense" in line]
    assert len(checks) == 2 and all(checks)
    for m in checks:
        # fp32 round-off of 8 dense squarings vs 256 sparse steps (tests/test_indexing.py): ~1e-4 relative.
        assert float(m.group(1)) <= 1e-3 * float(m.group(2)), m.group(0)


def test_demo_report_keeps_arms_postprocessing_and_the_first_runs_times_apart(tmp_path):
    work = tmp_path / "seed0"
    work.mkdir()
    rows = [
        {"variant": "cda", "step": "eval_sem_seg", "miou": 50.0},
        {"variant": "cda", "step": "eval_sem_seg", "postprocess": "ignore_uncertain", "miou": 60.0, "ignored": 0.25},
        {"variant": "cda", "step": "eval_deeplab", "labels": "pseudo", "postprocess": "msf+crf", "miou": 53.0},
        {"variant": "cda", "step": "eval_deeplab", "labels": "pseudo", "postprocess": "msf", "miou": 47.0},
        {"variant": "baseline", "step": "eval_deeplab", "labels": "pseudo", "postprocess": "msf+crf", "miou": 44.0},
        {"variant": "baseline", "step": "eval_ir_label", "fg_precision": 70.0, "fg_recall": 30.0, "bg_precision": None,
         "bg_recall": 0.0},
    ]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A first run, then a resumed one that adds the baseline arm's DeepLab: only the first run's times count.
    times = [("baseline", "make_cls_labels", 0.5), ("cda", "train_deeplab", 100.0),
             ("baseline", "make_cls_labels", 0.1), ("baseline", "train_deeplab", 90.0)]
    (work / "timings.jsonl").write_text("".join(json.dumps({"variant": v, "step": s, "seconds": t}) + "\n"
                                                for v, s, t in times))
    values, seconds = demo_runs.summarise([work])
    assert values[("pseudo-mask mIoU", "cda")] == [50.0]
    assert values[("DeepLab's masks: mIoU of labelled pixels", "cda")] == [60.0]
    assert values[("DeepLab's masks: % of pixels ignored", "cda")] == [25.0]
    assert values[("DeepLab val mIoU, CRF", "cda")] == [53.0] and values[("DeepLab val mIoU", "cda")] == [47.0]
    assert values[("DeepLab val mIoU, CRF", "baseline")] == [44.0]
    assert values[("IR seeds: fg precision", "baseline")] == [70.0]
    assert values[("IR seeds: bg recall", "baseline")] == [0.0]
    assert ("IR seeds: bg precision", "baseline") not in values  # undefined (no bg seeds), not a zero
    assert seconds == {("baseline", "make_cls_labels"): 0.5, ("cda", "train_deeplab"): 100.0}


def test_demo_runs_sections_are_replaced_by_name(tmp_path):
    doc = tmp_path / "benchmarks.md"
    demo_runs.write_section(doc, "demo numbers")
    demo_runs.write_section(doc, "photo numbers", "photos", "Real photos")
    demo_runs.write_section(doc, "newer photo numbers", "photos", "Real photos")
    text = doc.read_text()
    assert "demo numbers" in text and "newer photo numbers" in text and "\nphoto numbers" not in text
    assert text.count("## Real photos") == 1 and text.count("<!-- photos:start -->") == 1
    assert text.index("<!-- demo:start -->") < text.index("<!-- photos:start -->")


def _finished_run(work: Path, miou: float) -> None:
    (work / "baseline" / "sem_seg").mkdir(parents=True)
    (work / "config.yaml").write_text("seed: 0\n")
    (work / "baseline" / "sem_seg" / "a.png").write_bytes(b"mask")
    rows = [{"step": "eval_sem_seg", "variant": "baseline", "split": "train", "miou": miou},
            {"step": "eval_cam", "variant": "cda", "split": "train", "miou": miou - 5, "best_threshold": 0.5,
             "sweep": {"0.5": miou - 3}}]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_derives_without_touching_the_base_and_reports_finished_seeds_only(tmp_path):
    base = tmp_path / "runs" / "demo"
    for seed, miou in ((0, 40.0), (1, 44.0)):
        _finished_run(base / f"seed{seed}", miou)
    work = tmp_path / "runs" / "demo_x" / "seed0"
    compare.derive_seed(base / "seed0", work)
    png, metrics = (work / "baseline" / "sem_seg" / "a.png"), work / "metrics.jsonl"
    assert os.path.samefile(png, base / "seed0" / "baseline" / "sem_seg" / "a.png")
    assert not os.path.samefile(metrics, base / "seed0" / "metrics.jsonl")  # appended to: a real copy
    assert (work / compare.BASE_CONFIG).read_text() == "seed: 0\n"
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": "eval_sem_seg", "variant": "baseline", "split": "train", "miou": 50.0}) + "\n")
    assert "50.0" not in (base / "seed0" / "metrics.jsonl").read_text()

    arms = [compare.parse_arm(a) for a in (f"plain={base}", f"plain CDA={base}:cda", f"x={work.parent}",
                                            f"x CDA={work.parent}:cda")]
    body = compare.report(arms, [0, 1], "cmd")
    assert "| pseudo-mask mIoU | 42.0 ± 2.8 | - | - | - |" in body  # the derived seed has no completion mark yet
    (base / "seed1" / IN_PROGRESS).write_text("running\n")  # a base seed still running (or stopped) is left out
    assert "| pseudo-mask mIoU | 40.0 | - | - | - |" in compare.report(arms, [0, 1], "cmd")
    (base / "seed1" / IN_PROGRESS).unlink()
    assert "| CAM mIoU (best thr) | - | 39.0 ± 2.8 | - | - |" in body
    (work / compare.DONE).write_text("flags\n")
    body = compare.report(arms, [0, 1], "cmd")
    # The derived arm recomputed the masks only: its CAM row is not its base's.
    assert "| pseudo-mask mIoU | 42.0 ± 2.8 | - | 50.0 | - |" in body
    assert "| CAM mIoU (best thr) | - | 39.0 ± 2.8 | - | - |" in body


def test_arm_tables_read_precision_at_the_best_threshold_and_segmenters_own_labels(tmp_path):
    """ORANDNet's rows (a map's precision and recall at its best threshold, OR and AND) and AGMM's (a segmenter
    trained on points, scribbles or the full ground truth)."""
    sweep = {"miou": 30.0, "best_threshold": 0.2, "sweep": {"0.10": 30.0, "0.20": 35.0},
             "sweep_precision": {"0.10": 40.0, "0.20": 60.0}, "sweep_recall": {"0.10": 90.0, "0.20": 70.0}}
    rows = [{"step": "eval_cam", "variant": "baseline", **sweep},
            {"step": "eval_and_cam", "variant": "baseline", **sweep, "best_threshold": 0.1},
            {"step": "eval_deeplab", "variant": "baseline", "labels": "scribbles", "postprocess": "msf", "miou": 55.0},
            {"step": "eval_deeplab", "variant": "baseline", "labels": "points", "postprocess": "msf+crf", "miou": 1.0}]
    values = demo_runs.stage_values(rows, "baseline", compare.ARM_STAGES)
    assert values["CAM mIoU (best thr)"] == 35.0
    assert (values["CAM precision (best thr)"], values["CAM recall (best thr)"]) == (60.0, 70.0)
    assert (values["AND map precision (best thr)"], values["AND map recall (best thr)"]) == (40.0, 90.0)
    assert "OR map mIoU (best thr)" not in values
    assert values["segmenter val mIoU, trained on the sparse labels"] == 55.0  # msf only, the CRF row not taken
    assert "segmenter val mIoU, trained on the full ground truth" not in values
    assert "CAM precision (best thr)" not in demo_runs.stage_values(rows, "baseline")  # the demo table's rows


def test_saliency_scores_match_a_hand_computed_image():
    # Background, two objects and a void pixel; the map finds one object fully and the other at 100 / 255.
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    saliency = np.array([[0, 255], [7, 100]], np.uint8)
    info = SimpleNamespace(read_mask=lambda _: mask, num_classes=20)
    shapes = []

    def maps(image_id: str, shape: tuple[int, int]) -> np.ndarray:
        shapes.append(shape)
        return saliency

    r = saliency_quality.score(maps, info, ["a"], "test")
    assert shapes == [(2, 2)]
    assert r["mae"] == pytest.approx((1 - 100 / 255) / 3)
    # Every threshold up to 100 keeps both objects and nothing else (F = 1), so the first one wins.
    assert (r["max_f"], r["threshold"]) == (pytest.approx(100), 1)
    assert r["iou"] == pytest.approx(50)  # at 128: one object of two, no background
    prior = saliency_quality.centre_prior((5, 7))
    assert prior.shape == (5, 7) and prior[2, 3] == 255 and prior[0, 0] < prior[2, 0] < 255
