"""A run killed with SIGKILL in several steps and resumed ends with exactly the files of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLAGS = [
    "--demo_size", "32", "16", "8", "--cda", "false", "--num_workers", "0",
    "--cam_batch_size", "8", "--cam_num_epoches", "2", "--cam_crop_size", "96", "--cam_resize_long", "96", "128",
    "--cam_scales", "1.0", "0.5",
    "--irn_batch_size", "8", "--irn_num_epoches", "2", "--irn_crop_size", "96", "--exp_times", "5",
    "--deeplab_iters", "20", "--deeplab_batch_size", "4", "--deeplab_crop_size", "96", "--deeplab_ckpt_every", "10",
    "--deeplab_eval_scales", "1.0", "--deeplab_crf", "false",
]  # fmt: skip
# Differ between two runs by nature: wall times (the log, timings, the report that shows them), the settings
# file (it names its own work dir) and the records that identify an input file by its modification time
# (output folders' manifests, weights' stamps, labels' sources); every output itself must be equal.
VOLATILE = {"log.txt", "timings.jsonl", "report.html", "config.yaml", ".manifest.json",
            "cls_labels.tsv.sources.json"}


def _command(work: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_sample.py"), "--work_dir", str(work), *FLAGS]


def _env() -> dict[str, str]:
    return {**os.environ, "WSSS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _files(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(work.rglob("*")) if p.is_file() and p.name not in VOLATILE and p.suffix != ".fingerprint"}


def _kill_when(work: Path, ready: Callable[[Path], bool], what: str) -> None:
    """Start the run and SIGKILL it as soon as ``ready(work)`` holds (it must happen before the run ends)."""
    proc = subprocess.Popen(_command(work), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ready(work):
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _count(pattern: str, n: int) -> Callable[[Path], bool]:
    return lambda work: len(list(work.glob(pattern))) >= n


def test_sigkill_in_five_steps_then_resume_equals_an_uninterrupted_run(tmp_path: Path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(straight), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)

    kill_points = [
        ("train_cam after its first epoch", _count("baseline/sess/cam.*.ckpt", 1)),
        ("make_cam after 5 images", _count("baseline/cam/*.npz", 5)),
        ("cam_to_ir_label after 5 images", _count("baseline/ir_label/*.png", 5)),
        ("train_irn after its first epoch", _count("baseline/sess/irn.*.ckpt", 1)),
        ("train_deeplab at its checkpoint", _count("deeplab/baseline/deeplab.*.ckpt", 1)),
    ]
    for what, ready in kill_points:
        _kill_when(killed, ready, what)
    subprocess.run(_command(killed), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)

    expected, got = _files(straight), _files(killed)
    assert sorted(got) == sorted(expected)  # no checkpoint or temporary file left behind either
    differing = [name for name in expected if got[name] != expected[name]]
    assert not differing, differing
    assert "metrics.jsonl" in expected and "baseline/sess/irn.pth" in expected
