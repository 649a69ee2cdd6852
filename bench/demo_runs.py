"""Run the default demo pipeline for several seeds and report every stage in docs/benchmarks.md.

    python -m bench.demo_runs --seeds 0 1 2            # ~10 min a seed on 2 CPU cores; resumable
    python -m bench.demo_runs --data_root ../shared/data/voc12_photos --section photos --root runs/photos \
        --no_upper_bound -- --preset demo             # the same table on a VOC-layout folder of real photos

Each seed is one ``run_sample.py`` run (baseline round, CDA round, DeepLab) in ``<root>/seed<N>``, then
a ``--cda false`` run in the same folder that reuses the baseline round and trains DeepLab on its masks
(the baseline column's DeepLab rows; eval_deeplab records the raw ``msf`` and the ``msf+crf`` rows from one
inference); the first seed also trains DeepLab on ground truth (the fully supervised upper
bound). The report gives mean and standard deviation over seeds for both arms, the trivial baselines on
the same evaluation split, and the wall time of every step of seed 0's first run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np

from dataset.base import read_id_list
from dataset.voc12 import VOC12
from misc.io import read_metrics
from misc.metrics import confusion_matrix, segmentation_scores

REPO = Path(__file__).resolve().parent.parent


def run_seed(root: Path, seed: int, extra: list[str]) -> Path:
    work = root / f"seed{seed}"
    cmd = [sys.executable, str(REPO / "run_sample.py"), "--work_dir", str(work), "--seed", str(seed), *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return work


def trivial_baselines(voc12_root: Path, eval_list: Path) -> dict[str, float]:
    """mIoU of labelling everything background, and of labelling every pixel with its image's class.

    For an image with several classes the second baseline gives each pixel the image's first class.
    """
    info = VOC12(voc12_root)
    n = info.num_labels
    conf_bg, conf_cls = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    for image_id in read_id_list(eval_list):
        gt = info.read_mask(image_id)
        classes = sorted(set(np.unique(gt).tolist()) - {0, info.ignore})
        conf_bg += confusion_matrix(gt, np.zeros_like(gt), n)
        conf_cls += confusion_matrix(gt, np.full_like(gt, classes[0] if classes else 0), n)
    return {
        "all background": segmentation_scores(conf_bg, info.label_names)["miou"],
        "image class everywhere": segmentation_scores(conf_cls, info.label_names)["miou"],
    }


def latest(rows: list[dict], step: str, variant: str, **match: object) -> dict | None:
    """The last row of ``step`` in round ``variant`` whose fields equal ``match`` (a tuple: one of its values)."""
    found = [r for r in rows if r["step"] == step and r.get("variant") == variant
             and all(r.get(k) in v if isinstance(v, tuple) else r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


# The rows of every stage table: (stage, metrics step, field, fields the row must match). "sweep" is the
# best value of eval_cam's threshold sweep, "sweep_precision" / "sweep_recall" the value at that best
# threshold; "ignored" a fraction, reported in percent.
Stage = tuple[str, str, str, dict[str, object]]
STAGES: tuple[Stage, ...] = (
    ("best CAM threshold", "eval_cam", "best_threshold", {}),
    ("CAM mIoU (thr 0.15)", "eval_cam", "miou", {}),
    ("CAM mIoU (best thr)", "eval_cam", "sweep", {}),
    ("IR seeds: fg precision", "eval_ir_label", "fg_precision", {}),
    ("IR seeds: fg recall", "eval_ir_label", "fg_recall", {}),
    ("IR seeds: bg precision", "eval_ir_label", "bg_precision", {}),
    ("IR seeds: bg recall", "eval_ir_label", "bg_recall", {}),
    ("pseudo-mask mIoU", "eval_sem_seg", "miou", {"postprocess": None}),
    ("DeepLab's masks: mIoU of labelled pixels", "eval_sem_seg", "miou", {"postprocess": "ignore_uncertain"}),
    ("DeepLab's masks: % of pixels ignored", "eval_sem_seg", "ignored", {"postprocess": "ignore_uncertain"}),
    ("instance mAP@0.5", "eval_ins_seg", "map", {}),
    ("DeepLab val mIoU", "eval_deeplab", "miou", {"labels": "pseudo", "postprocess": "msf"}),
    ("DeepLab val mIoU, CRF", "eval_deeplab", "miou", {"labels": "pseudo", "postprocess": "msf+crf"}),
)


def stage_values(rows: list[dict], variant: str, stages: tuple[Stage, ...] = STAGES) -> dict[str, float]:
    """The latest value of every stage of ``stages`` that round ``variant`` of a run recorded."""
    out = {}
    for stage, step, key, match in stages:
        row = latest(rows, step, variant, **match)
        if row is None or row.get(key) is None:
            continue
        if key == "sweep":
            value = max(row["sweep"].values())
        elif key in ("sweep_precision", "sweep_recall"):
            value = row[key][f"{row['best_threshold']:.2f}"]
        else:
            value = row[key]
        out[stage] = 100 * value if key == "ignored" else value
    return out


def summarise(works: list[Path]) -> tuple[dict, dict]:
    """{(stage, variant): [value per seed]} and {(variant, step): seconds} of the first seed's first run."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for work in works:
        rows = read_metrics(work)
        for variant in ("baseline", "cda"):
            for stage, value in stage_values(rows, variant).items():
                values[(stage, variant)].append(value)
        gt_rows = [r for r in rows if r["step"] == "eval_deeplab" and r.get("labels") == "gt"]
        if gt_rows:
            gt_row = gt_rows[-1]
            values[("DeepLab val mIoU", "ground truth (upper bound)")].append(gt_row["miou"])
    times: dict[tuple[str, str], float] = {}
    for line in (works[0] / "timings.jsonl").read_text().splitlines():
        t = json.loads(line)
        key = (t["variant"], t["step"])
        # The first run's times only: a step seen again is the start of a later run in the same work dir
        # (baseline-arm DeepLab, raw evaluation, upper bound), which resumes and adds steps of its own.
        if key in times:
            break
        times[key] = t["seconds"]
    return values, times


def fmt(vals: list[float], digits: int = 1) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def report(works: list[Path], seeds: list[int], baselines: dict[str, float], command: str,
           data: str = "the demo's") -> str:
    values, times = summarise(works)
    lines = [
        f"Measured {date.today().isoformat()} on this repository's CI machine type (2 CPU cores), "
        f"seeds {seeds}, with `{command}`. Mean ± standard deviation over seeds; evaluation on {data} "
        "`train` split (CAMs, pseudo masks, instances) and `val` split (DeepLab).",
        "",
        "| stage | baseline (IRNet) | CDA |",
        "| --- | --- | --- |",
    ]
    for stage, *_ in STAGES:
        if not any((stage, variant) in values for variant in ("baseline", "cda")):
            continue
        digits = 2 if stage == "best CAM threshold" else 1
        base, cda = (fmt(values.get((stage, variant), []), digits) for variant in ("baseline", "cda"))
        lines.append(f"| {stage} | {base} | {cda} |")
    gt = values.get(("DeepLab val mIoU", "ground truth (upper bound)"))
    if gt:
        lines.append(f"| DeepLab val mIoU, trained on ground truth | {fmt(gt)} | |")
    lines += ["", "Trivial baselines on the same `train` split: "
              + ", ".join(f"{k} {v:.1f} mIoU" for k, v in baselines.items()) + ".", "",
              "Per-seed values: `" + json.dumps({f"{s} / {v}": [round(x, 2) for x in vals]
                                                  for (s, v), vals in values.items()}) + "`",
              "", "Wall time of every step (seed 0, seconds):", "", "| round | step | seconds |", "| --- | --- | --- |"]
    lines += [f"| {variant} | {step} | {seconds:.1f} |" for (variant, step), seconds in times.items()]
    lines.append(f"| all | total | {sum(times.values()):.1f} |")
    return "\n".join(lines)


def write_section(doc: Path, body: str, name: str = "demo",
                  title: str = "Demo pipeline, every stage, baseline vs CDA") -> None:
    """Replace the ``<!-- name:start -->`` .. ``<!-- name:end -->`` section of ``doc`` (appended under ``title``
    if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    section = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + section + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", type=Path, default=REPO / "runs" / "demo")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no_upper_bound", action="store_true", help="skip the GT-trained DeepLab of the first seed")
    p.add_argument("--no_baseline_deeplab", action="store_true", help="skip DeepLab on the baseline round's masks")
    p.add_argument("--report_only", action="store_true", help="report the existing runs under --root; run nothing")
    p.add_argument("--data_root", type=Path, default=None,
                   help="a VOC-layout folder with its own ImageSets/Segmentation train/val lists (default: the demo)")
    p.add_argument("--section", default="demo", help="the docs section (markers) the table replaces")
    p.add_argument("--title", default="Demo pipeline, every stage, baseline vs CDA",
                   help="the heading of a new section")
    p.add_argument("extra", nargs="*", help="flags passed to run_sample.py (after --)")
    args = p.parse_args(argv)
    if args.data_root is not None:
        args.extra = ["--voc12_root", str(args.data_root.resolve()), *args.extra]
    if args.report_only:
        works = [args.root / f"seed{seed}" for seed in args.seeds]
    else:
        works = [run_seed(args.root, seed, args.extra) for seed in args.seeds]
        if not args.no_baseline_deeplab:
            for seed in args.seeds:
                run_seed(args.root, seed, [*args.extra, "--cda", "false"])
        if not args.no_upper_bound:
            run_seed(args.root, args.seeds[0], [*args.extra, "--deeplab_gt", "true"])
    data_root = args.data_root or works[0] / "demo_voc12"
    baselines = trivial_baselines(data_root, data_root / "ImageSets" / "Segmentation" / "train.txt")
    command = "python -m bench.demo_runs " + " ".join(argv if argv is not None else sys.argv[1:])
    body = report(works, args.seeds, baselines, command, "the demo's" if args.data_root is None else
                  f"`{args.data_root.name}`'s")
    print(body)
    write_section(args.out, body, args.section, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
