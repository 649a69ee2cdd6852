"""DDP on CPU (gloo): 2 processes reproduce 1 process, for train_cam's loss trajectory and make_cam's files.

The real driver is launched with ``python -m torch.distributed.run`` (torchrun) on a tiny demo dataset
that is generated once and shared by all runs through ``--voc12_root`` and explicit lists.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed

from voc12.demo import make_demo_dataset

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

REPO = Path(__file__).resolve().parent.parent
LATER_PASSES = ("make_cam", "eval_cam", "cam_to_ir_label", "eval_ir_label", "train_irn", "make_sem_seg",
                "eval_sem_seg", "make_ins_seg", "eval_ins_seg", "make_aug_fg", "train_deeplab", "eval_deeplab")
# The preset's learning rate (0.1, head 1.0) makes the 12-step trajectory chaotic: float rounding of
# ~1e-7 grows to a few percent by the end, and a single process run with 2 threads instead of 1
# drifts from itself just as much as 2 processes do. At 0.01 the same rounding stays below 1e-4.
LEARNING_RATE = "0.01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, flags: list[str]) -> None:
    """Run ``run_sample.py flags`` in ``nproc`` processes (torchrun for 2+), one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # One thread per process keeps the run deterministic and leaves the cores to the other process.
    env.update(OMP_NUM_THREADS="1", WSSS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    cmd += ["run_sample.py", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def demo_flags(tmp_path_factory) -> list[str]:
    """Flags shared by every run: the demo dataset (generated once), tiny CAM settings, CPU, no workers."""
    root = make_demo_dataset(tmp_path_factory.mktemp("data") / "demo_voc12", n_train_aug=24, n_train=8, n_val=8)
    lists = root / "ImageSets" / "Segmentation"
    return [
        "--preset", "demo", "--voc12_root", str(root), "--device", "cpu", "--num_workers", "0", "--cda", "false",
        "--train_list", str(lists / "train_aug.txt"), "--val_list", str(lists / "val.txt"),
        "--infer_list", str(lists / "train.txt"), "--eval_list", str(lists / "train.txt"),
        "--cam_crop_size", "96", "--cam_resize_long", "80", "112", "--cam_batch_size", "4",
        "--cam_num_epoches", "2", "--cam_learning_rate", LEARNING_RATE, "--cam_scales", "1.0", "0.5",
    ]


@pytest.fixture(scope="module")
def trained(demo_flags, tmp_path_factory) -> dict[int, Path]:
    """Work dirs of train_cam run with 1 and with 2 processes (same global batch of 4)."""
    later = [x for step in LATER_PASSES for x in (f"--{step}_pass", "false")]
    works = {}
    for nproc in (1, 2):
        works[nproc] = tmp_path_factory.mktemp(f"train{nproc}")
        _launch(nproc, [*demo_flags, "--work_dir", str(works[nproc]), *later])
    return works


def test_train_cam_two_processes_follow_one_process(trained):
    logs = {n: [json.loads(line) for line in (w / "baseline" / "sess" / "cam.pth.log.jsonl").read_text().splitlines()]
            for n, w in trained.items()}
    one, two = logs[1], logs[2]
    assert len(one) == 12, "24 images / batch 4 x 2 epochs"
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    # Same samples per step; only the summation order differs (per-rank halves, then the gloo all-reduce).
    # The log keeps 6 decimals; measured: equal to the last digit for 6 steps, then <= 2e-5 relative.
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4, atol=2e-6)
    w1, w2 = (torch.load(w / "baseline" / "sess" / "cam.pth", map_location="cpu") for w in trained.values())
    assert w1.keys() == w2.keys()
    # Measured: max |difference| ~1e-6 on weights of magnitude up to ~10.
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert worst < 1e-4, worst


def test_make_cam_sharded_over_two_processes_writes_the_same_files(trained, demo_flags):
    # Both runs use the 1-process weights, so any difference would come from the sharding.
    weights = trained[1] / "baseline" / "sess" / "cam.pth"
    passes = [x for step in LATER_PASSES if step != "make_cam" for x in (f"--{step}_pass", "false")]
    flags = [*demo_flags, "--cam_weights", str(weights), *passes]
    for nproc, work in trained.items():
        _launch(nproc, [*flags, "--work_dir", str(work)])
    one, two = (trained[n] / "baseline" / "cam" for n in (1, 2))
    names = sorted(p.name for p in one.glob("*.npz"))
    assert len(names) == 24
    assert sorted(p.name for p in two.glob("*.npz")) == names
    # Each image is computed whole by one rank with the same weights and one thread: bit-identical (measured).
    for name in names:
        with np.load(one / name) as a, np.load(two / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
