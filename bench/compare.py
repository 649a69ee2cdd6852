"""Variant studies: derive runs that differ from finished ones by a few flags, and tabulate arms side by side.

    # A finished 3-seed study (python -m bench.demo_runs --root runs/demo ...), then an arm that changes only
    # the refiner: its CAMs are reused (same fingerprints), everything after them is recomputed.
    python -m bench.compare derive --base runs/demo --name affinitynet --seeds 0 1 2 -- --refiner affinitynet
    # A derived run resumes with its base's last settings: bench.demo_runs' last run of a seed is --cda false,
    # so an arm's CDA round is one more derivation, of the arm itself (only the CDA round runs).
    python -m bench.compare derive --base runs/demo_affinitynet --name cda --seeds 0 1 2 -- --cda true
    # One table, one column per arm (LABEL=RUN_ROOT[:ROUND]), mean +- std over the seeds, into docs/benchmarks.md.
    python -m bench.compare report --seeds 0 1 2 --section refiners --title "IRN vs AffinityNet" \
        --arm "IRNet=runs/demo" --arm "AffinityNet=runs/demo_affinitynet" \
        --arm "AffinityNet + CDA=runs/demo_affinitynet_cda:cda"

``derive`` makes ``<base>_<name>/seed<N>`` from ``<base>/seed<N>``: images, arrays and weights are hard
links (nothing is copied twice, and a step that rewrites a file replaces the link), every other file
(metrics, logs, manifests, anything appended or rewritten in place) a real copy, so the base run is never
touched. It then resumes the copy with the base run's settings plus the given flags, so only the steps
whose inputs change run again. In ``report`` a derived arm shows only the stages it recomputed (``-``
for the others), and only its seeds whose run finished count.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bench.demo_runs import REPO, STAGES, Stage, fmt, stage_values, write_section
from misc.io import IN_PROGRESS, read_metrics

# Files a step only ever replaces whole (atomically) or never touches (the demo's photos): safe to share
# with the base run as hard links.
LINKED_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz", ".pth")
# The arm tables' stages: the demo table's, plus the CAMs' precision and recall (ORANDNet is about precision),
# the OR and AND maps of an ensemble, and a segmenter trained on labels of its own (AGMM's points or
# scribbles, and the same network on the full ground truth, its upper bound); msf, the sparse methods' protocol.
ARM_STAGES: tuple[Stage, ...] = (
    *STAGES[:3],
    ("CAM precision (best thr)", "eval_cam", "sweep_precision", {}),
    ("CAM recall (best thr)", "eval_cam", "sweep_recall", {}),
    *((f"{name} map {what}", f"eval_{name.lower()}_cam", key, {}) for name in ("OR", "AND")
      for what, key in (("mIoU (best thr)", "sweep"), ("precision (best thr)", "sweep_precision"),
                        ("recall (best thr)", "sweep_recall"))),
    *STAGES[3:],
    ("segmenter val mIoU, trained on the sparse labels", "eval_deeplab", "miou",
     {"labels": ("points", "scribbles"), "postprocess": "msf"}),
    ("segmenter val mIoU, trained on the full ground truth", "eval_deeplab", "miou",
     {"labels": "gt", "postprocess": "msf"}),
)
BASE_CONFIG = "config.base.yaml"
BASE_ROWS = "compare.base_metrics.jsonl"
DONE = "compare.done"


def derive_seed(base: Path, work: Path) -> None:
    """``work``: a copy of the finished run ``base`` that shares its images, arrays and weights (hard links)."""
    if not (base / "config.yaml").is_file():
        raise SystemExit(f"{base} is not a finished run (no config.yaml): run it first")
    for src in base.rglob("*"):
        dst = work / src.relative_to(base)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix in LINKED_SUFFIXES:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    # config.yaml is rewritten by every run; the base's settings are kept aside for every resumption, and the
    # metrics rows the copy inherited, so that the arm reports only what it recomputed.
    shutil.copy2(base / "config.yaml", work / BASE_CONFIG)
    shutil.copy2(base / "metrics.jsonl", work / BASE_ROWS)


def derive(base_root: Path, name: str, seeds: list[int], flags: list[str]) -> list[Path]:
    """Derive and run ``<base_root>_<name>/seed<N>`` for each seed; returns the finished work dirs."""
    root = base_root.with_name(f"{base_root.name}_{name}")
    works = []
    for seed in seeds:
        work = root / f"seed{seed}"
        if not work.exists():
            derive_seed(base_root / f"seed{seed}", work)
        (work / DONE).unlink(missing_ok=True)
        cmd = [sys.executable, str(REPO / "run_sample.py"), "--config", str(work / BASE_CONFIG), "--work_dir",
               str(work), *flags]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        (work / DONE).write_text(" ".join(flags) + "\n")
        works.append(work)
    return works


def parse_arm(text: str) -> tuple[str, Path, str]:
    """``LABEL=RUN_ROOT[:ROUND]`` -> (label, run root, round; default baseline)."""
    label, sep, where = text.partition("=")
    if not sep or not label or not where:
        raise argparse.ArgumentTypeError(f"an arm is LABEL=RUN_ROOT[:ROUND], got {text!r}")
    root, _, variant = where.partition(":")
    return label, Path(root), variant or "baseline"


def finished(work: Path) -> bool:
    """A base run has its config and no in-progress mark (``misc.io.IN_PROGRESS``: running, or stopped
    midway); a derived run also its completion mark."""
    derived = (work / BASE_ROWS).is_file()
    return ((work / "config.yaml").is_file() and not (work / IN_PROGRESS).exists()
            and (not derived or (work / DONE).is_file()))


def own_rows(work: Path) -> list[dict]:
    """The metrics rows of a run; of a derived run, only those it wrote itself (a stage it did not recompute
    reports nothing, rather than its base's value)."""
    rows = read_metrics(work)
    if not (work / BASE_ROWS).is_file():
        return rows
    # A step that reruns replaces its row (misc.io.record_metrics); a row still equal to an inherited one was
    # not recomputed.
    inherited = set((work / BASE_ROWS).read_text().splitlines())
    return [r for r in rows if json.dumps(r) not in inherited]


def report(arms: list[tuple[str, Path, str]], seeds: list[int], command: str) -> str:
    """One row per stage any arm recorded, one column per arm: mean +- std over its finished seeds."""
    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for label, root, variant in arms:
        works = [root / f"seed{s}" for s in seeds if finished(root / f"seed{s}")]
        counts[label] = len(works)
        per_stage: dict[str, list[float]] = {}
        for work in works:
            for stage, value in stage_values(own_rows(work), variant, ARM_STAGES).items():
                per_stage.setdefault(stage, []).append(value)
        values[label] = per_stage
    labels = [label for label, _, _ in arms]
    lines = [f"With `{command}`; mean ± standard deviation over the finished seeds of {seeds}.", "",
             "| stage | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for stage, *_ in ARM_STAGES:
        if any(stage in values[label] for label in labels):
            digits = 2 if stage == "best CAM threshold" else 1
            lines.append(f"| {stage} | " + " | ".join(fmt(values[label].get(stage, []), digits) for label in labels)
                         + " |")
    lines += ["", "Seeds: " + ", ".join(f"{label} {counts[label]}" for label in labels) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("derive", help="derive runs from finished ones with a few flags changed, and run them")
    d.add_argument("--base", type=Path, required=True, help="a run root holding seed<N> folders")
    d.add_argument("--name", required=True, help="the derived root is <base>_<name>")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    d.add_argument("flags", nargs="*", help="run_sample.py flags that differ from the base runs (after --)")
    r = sub.add_parser("report", help="tabulate arms side by side into docs/benchmarks.md")
    r.add_argument("--arm", type=parse_arm, action="append", required=True, help="LABEL=RUN_ROOT[:ROUND]")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    r.add_argument("--section", required=True, help="the docs section (markers) the table replaces")
    r.add_argument("--title", default=None, help="the heading of a new section (default: the section name)")
    args = p.parse_args(argv)
    if args.command == "derive":
        derive(args.base, args.name, args.seeds, args.flags)
        return 0
    command = "python -m bench.compare " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = report(args.arm, args.seeds, command)
    print(body)
    write_section(args.out, body, args.section, args.title or args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
