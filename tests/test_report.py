"""The visual report: palette PNGs, report.html of the tiny run, and the side-by-side page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dataset.base import voc_palette
from misc.io import latest_metrics, load_png, save_png
from misc.metrics import headline
from misc.report import write_comparison


def test_palette_pngs_store_the_class_ids(tmp_path: Path):
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    save_png(tmp_path / "m.png", label, voc_palette())
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.getpalette()[3 * 15: 3 * 16] == [192, 128, 128]  # VOC's person
    np.testing.assert_array_equal(load_png(tmp_path / "m.png"), label)


def test_every_label_png_of_the_run_is_a_palette_png(tiny_run):
    for folder in ("baseline/ir_label", "baseline/sem_seg", "cda/sem_seg_ignore", "deeplab/cda/pred_val_crf"):
        first = next((tiny_run.work_dir / folder).glob("*.png"))
        with Image.open(first) as img:
            assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0], folder


def test_report_shows_the_runs_numbers_and_pictures(tiny_run):
    page = (tiny_run.work_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) > 20 and all((tiny_run.work_dir / s).is_file() for s in sources)
    assert "http" not in page and "<script" not in page  # self-contained
    # Every summary row's value is the latest metrics.jsonl row, to the digits shown.
    cells = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>([^<]*)</td><td>[^<]*</td><td>[^<]*</td>"
                       r'<td class="num">([\d.]+)</td><td>', page)
    latest = latest_metrics(tiny_run.work_dir)
    assert {(v, s, p or None) for v, s, p, _ in cells} == set(latest)
    for variant, step, post, shown in cells:
        row = latest[(variant, step, post or None)]
        assert shown == f"{headline(row)[1]:.2f}"
    for section in ("Per-class IoU", "Training curves", "Gallery", "Best pseudo masks", "Worst pseudo masks",
                    "Segmenter on val", "Step times", "Settings"):
        assert section in page, section
    # The sample is fixed: six gallery images plus three best and three worst, each with its photo.
    assert len(re.findall(r"_image\.png", page)) == 6 + 3 + 3 + 6
    assert "pseudo mask · IoU" in page and "CAM " in page
    assert "published" not in page  # the papers' VOC numbers are not the demo's


def _fake_run(root: Path, name: str, seed: int, cda: bool, miou: float) -> Path:
    work = root / name
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "cda": cda, "work_dir": str(work),
                                                       "dataset": "voc12", "_versions": {"torch": "x"}}))
    rows = [{"step": "eval_sem_seg", "variant": "baseline", "miou": miou - 10},
            {"step": "eval_sem_seg", "variant": "baseline", "miou": miou}]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work


def test_comparison_groups_seeds_of_one_configuration(tmp_path: Path):
    runs = [_fake_run(tmp_path, "a", 0, True, 40.0), _fake_run(tmp_path, "b", 1, True, 44.0),
            _fake_run(tmp_path, "c", 0, False, 30.0)]
    page = write_comparison(runs, tmp_path / "cmp.html").read_text()
    # cda=true: mean 42, sample std of (40, 44) = 2.83; cda=false: one run, its value.
    assert "cda=True (2 runs)" in page and "cda=False (1 run)" in page
    assert "<td>42.00 ± 2.83</td><td>30.00</td>" in page
    # Told to disregard the setting, all three are one configuration.
    page = write_comparison(runs, tmp_path / "all.html", ignore=["cda"]).read_text()
    assert "same settings (3 runs)" in page and "<td>38.00 ± 7.21</td>" in page
