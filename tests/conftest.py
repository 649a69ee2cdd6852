"""Shared fixtures: one tiny run of the whole pipeline (both rounds + DeepLab), trained once per session."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

import run_sample

TINY_FLAGS = [
    "--demo_size", "64", "24", "16",
    "--num_workers", "0",
    "--cam_batch_size", "8", "--cam_num_epoches", "3", "--cam_crop_size", "128", "--cam_resize_long", "112", "160",
    "--cam_scales", "1.0", "0.5",
    "--irn_batch_size", "8", "--irn_num_epoches", "2", "--irn_crop_size", "128",
    "--exp_times", "6",
    "--deeplab_iters", "30", "--deeplab_batch_size", "4", "--deeplab_crop_size", "128", "--deeplab_ckpt_every", "15",
    "--deeplab_eval_scales", "1.0",
]


class TinyRun:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.flags = ["--work_dir", str(work_dir), *TINY_FLAGS]

    def args(self, variant: str = "baseline", *extra: str) -> argparse.Namespace:
        return run_sample.round_args(run_sample.make_args([*self.flags, *extra]), variant)

    def rerun(self, work_dir: Path, *flags: str) -> list[dict]:
        """A copy of the tiny run in ``work_dir`` run again with ``flags`` (other plug-ins: only what they change
        reruns), both rounds, no instances, DeepLab or report; returns the copy's metrics rows."""
        shutil.copytree(self.work_dir, work_dir)
        quiet = ("--make_ins_seg_pass", "false", "--eval_ins_seg_pass", "false", "--train_deeplab_pass", "false",
                 "--eval_deeplab_pass", "false", "--report_pass", "false")
        assert run_sample.main([*self.flags[2:], "--work_dir", str(work_dir), *quiet, *flags]) == 0
        return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.work_dir / "metrics.jsonl").read_text().splitlines()]

    def metric(self, step: str, variant: str = "baseline", **match: object) -> dict:
        """The latest row of ``step`` in ``variant`` whose fields equal ``match`` (None: field absent)."""
        rows = [r for r in self.metrics() if r["step"] == step and r["variant"] == variant
                and all(r.get(k) == v for k, v in match.items())]
        assert rows, f"no {step} row for {variant}"
        return rows[-1]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    run = TinyRun(tmp_path_factory.mktemp("tiny_run"))
    assert run_sample.main(run.flags) == 0
    return run
