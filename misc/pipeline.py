"""Plumbing the steps share: resumable output folders, training loaders, segmentation evaluation.

Resume rule: every per-image step writes into an output folder stamped with a fingerprint of what
produced it (the step's settings and the fingerprints of its inputs). Re-running with the same inputs
skips images already done; re-running after an input changed (new weights, other thresholds) clears the
stale outputs first, so a resumed run never mixes results of two configurations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dataset
from dataset.base import read_id_list
from misc import dist
from misc.errors import UserError
from misc.io import TMP_SUFFIX, atomic_write, load_cam, record_metrics, save_json
from misc.labels import scores_to_label
from misc.metrics import choose_threshold, confusion_matrix, headline, segmentation_scores

if TYPE_CHECKING:
    from dataset.base import DatasetInfo
    from misc.train import TrainData

log = logging.getLogger("wsss")

MANIFEST = ".manifest.json"

# IRNet's flag names for the steps whose module names differ.
_PASS_FLAG = {"make_sem_seg_labels": "make_sem_seg", "make_ins_seg_labels": "make_ins_seg"}


def how_to_run(step: str) -> str:
    """The advice an error gives for a missing output of ``step``."""
    return f"run {step} first (--{_PASS_FLAG.get(step, step)}_pass true)"


def fingerprint(**parts: Any) -> str:
    """A short stable hash of settings and upstream fingerprints."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a weights file: size and modification time (cheap, changes whenever it is rewritten)."""
    stat = Path(path).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def content_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a small input file (list, labels, bank index) by content: rewriting it unchanged keeps it."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def weights_fingerprint(spec: str | os.PathLike) -> str:
    """A weights file's fingerprint, or the registry name itself (a registry entry is pinned by its hash)."""
    return file_fingerprint(spec) if Path(spec).is_file() else str(spec)


def dir_fingerprint(out_dir: str | os.PathLike, producer: str) -> str:
    """Fingerprint of a finished step's output folder; tells the user what to run when there is none."""
    manifest = Path(out_dir) / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{out_dir} has no outputs of {producer}: {how_to_run(producer)}.")
    return json.loads(manifest.read_text())["fingerprint"]


def prepare_output_dir(out_dir: str | os.PathLike, fp: str, *patterns: str) -> Path:
    """Create ``out_dir`` for outputs of fingerprint ``fp``; delete the files matching ``patterns`` (e.g.
    ``*.png``) that another fingerprint produced, and temporary files an interrupted run left. Call it only
    once the step's inputs are known to be valid."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(f".*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        old = json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None
        if old != fp:
            stale = [f for pattern in patterns for f in out_dir.glob(pattern)]
            if stale:
                log.info("inputs changed since %s was written: removing %d stale files", out_dir, len(stale))
                for f in stale:
                    f.unlink()
            save_json(manifest, {"fingerprint": fp})
    dist.barrier()
    return out_dir


def _stamp(output: Path) -> Path:
    return output.with_name(output.name + ".fingerprint")


def up_to_date(output: str | os.PathLike, fp: str) -> bool:
    """True when ``output`` exists and was produced from inputs with fingerprint ``fp`` (``mark_done``)."""
    output = Path(output)
    return output.is_file() and _stamp(output).is_file() and _stamp(output).read_text() == fp


def mark_done(output: str | os.PathLike, fp: str) -> None:
    with atomic_write(_stamp(Path(output)), "w") as f:
        f.write(fp)


def pending(ids: Iterable[str], out_dir: str | os.PathLike, suffix: str) -> list[str]:
    """This rank's share of ``ids`` whose output file does not exist yet (per-image resume)."""
    out_dir = Path(out_dir)
    return [i for i in dist.shard(list(ids)) if not (out_dir / f"{i}{suffix}").is_file()]


def prepare_outputs(ids: list[str], outputs: dict[str, dict[str, Any]], base: str, suffix: str
                    ) -> tuple[list[Path], list[str]]:
    """Output folders of a per-image step that writes one file per image into each of several folders.

    ``outputs`` maps each folder to its own settings; each is stamped with ``base`` (the fingerprint of
    the inputs they share) and those (``prepare_output_dir``). Returns the folders in the order given and
    this rank's share of ``ids`` that some folder still lacks.
    """
    dirs = [prepare_output_dir(d, fingerprint(base=base, **settings), f"*{suffix}") for d, settings in outputs.items()]
    missing = set().union(*(pending(ids, d, suffix) for d in dirs))
    return dirs, [i for i in dist.shard(ids) if i in missing]


def map_images(job: Callable[[str], object], ids: Sequence[str], desc: str, num_workers: int) -> None:
    """Run ``job(image_id)`` for every id, in this process or over a pool of ``num_workers`` processes (CPU work
    per image: CRFs, fusions), with a progress bar on rank 0. ``job`` must pickle (a module-level function or a
    ``functools.partial`` of one)."""
    bar = tqdm(total=len(ids), desc=desc, disable=not dist.is_main(), mininterval=2)
    if num_workers <= 1:
        for image_id in ids:
            job(image_id)
            bar.update()
    else:
        # spawn, not fork: forking a process that already runs torch's thread pools can deadlock.
        with mp.get_context("spawn").Pool(num_workers) as pool:
            for _ in pool.imap_unordered(job, ids, chunksize=4):
                bar.update()
    bar.close()


def trained_weights(given: str | None, trained: str, step: str, flag: str) -> str:
    """The weights a step uses: those given by ``flag`` (a path or registry name), else the file ``step``
    trained; ``UserError`` if neither exists."""
    if given:
        return given
    if not Path(trained).is_file():
        raise UserError(f"weights {trained} are missing: run {step} first (--{step}_pass true) or pass {flag}.")
    return trained


def require_files(out_dir: str | os.PathLike, ids: list[str], suffix: str, producer: str, fix: str = "") -> None:
    """``UserError`` unless ``out_dir/<id><suffix>`` exists for every id; ``fix`` replaces the default advice
    (run ``producer`` on this list)."""
    missing = [i for i in ids if not (Path(out_dir) / f"{i}{suffix}").is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(ids)} outputs of {producer} are missing in {out_dir} "
            f"(first: {missing[0]}{suffix}): {fix or how_to_run(producer) + ' on this list'}."
        )


def epoch_loader(data: TrainData, epoch: int, skip: int, stop: int) -> DataLoader:
    """This rank's batches ``skip..stop-1`` of ``epoch`` of ``data`` (a ``misc.train.TrainData``).

    One seeded permutation per epoch, dealt round-robin to the ranks (``perm[r::world]``), so global batch
    ``k`` is ``perm[k*b:(k+1)*b]`` for any number of processes; with per-sample seeded augmentation and
    frozen BN statistics the averaged gradient is the same. Skipping the batches done before a resume
    costs nothing: the indices are cut before any image is read. A dataset with ``needs_step`` is indexed
    by ``(index, global step)`` pairs.
    """
    world = dist.world_size()
    rank_batch = data.batch_size // world
    sampler = DistributedSampler(data.dataset, num_replicas=world, rank=dist.rank(), shuffle=True, seed=data.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    data.dataset.set_epoch(epoch)
    indices: list = list(sampler)[skip * rank_batch : stop * rank_batch]
    if getattr(data.dataset, "needs_step", False):
        # A dataset whose augmentation follows the iteration (misc.curriculum) gets each sample's global
        # step with it: batch k of the epoch is step epoch * steps_per_epoch + k on every rank.
        first = epoch * data.steps_per_epoch + skip
        indices = [(i, first + n // rank_batch) for n, i in enumerate(indices)]
    return DataLoader(
        data.dataset,
        batch_size=rank_batch,
        sampler=indices,
        num_workers=data.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        # Workers hold copies of the dataset: only fresh workers each epoch see its set_epoch(). Their base
        # seed comes from this generator, not from the global RNG, so building a loader mid-epoch after a
        # resume leaves the global RNG (dropout) exactly where the original run had it.
        persistent_workers=False,
        generator=torch.Generator().manual_seed(data.seed),
    )


class TrainLog:
    """Per-step training record (rank 0): step, learning rates, losses averaged over ranks.

    While a run trains, its rows go to ``path`` (``misc.train`` names it after the run's checkpoint), so a
    retraining that fails leaves the finished weights' own log ``<weights>.log.jsonl`` untouched; the final
    save moves it there. A run resumed at step ``resume_step`` keeps the rows up to that step (the steps an
    interrupted run took after its last checkpoint are taken again, and logged once), so the log equals an
    uninterrupted run's.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        if dist.is_main():
            kept = []
            if resume_step and self.path.is_file():
                rows = [line for line in self.path.read_text().splitlines() if line.strip()]
                kept = [line for line in rows if json.loads(line)["step"] <= resume_step]
            with atomic_write(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))

    def write(self, step: int, optimizer: torch.optim.Optimizer, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average ``losses`` over ranks (collective), append a row on rank 0, return the averaged values."""
        values = {k: round(dist.all_reduce_mean(v.detach().float()).item(), 6) for k, v in losses.items()}
        if dist.is_main():
            row = {"step": step, "lr": [g["lr"] for g in optimizer.param_groups], **values}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return values


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def gt_confusions(info: DatasetInfo, image_id: str, preds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """(L, L) confusion matrices (L = ``info.num_labels``) of (H, W) label maps of one image against its
    ground-truth mask."""
    gt = info.read_mask(image_id)
    bad = np.unique(gt[(gt >= info.num_labels) & (gt != info.ignore)])
    if bad.size:
        raise UserError(f"ground truth {info.seg_class(image_id)} has values {bad[:5].tolist()} that are neither a "
                        f"label (0..{info.num_labels - 1}) nor void ({info.ignore}): fix the mask, or check --dataset.")
    for pred in preds:
        if pred.shape != gt.shape:
            raise UserError(
                f"prediction for {image_id} is {pred.shape} but its ground truth {info.seg_class(image_id)} is "
                f"{gt.shape}: the outputs of an earlier step were made for other images (or the mask is of "
                "another size than its image); delete them and re-run that step."
            )
    return [confusion_matrix(gt, pred, info.num_labels, info.ignore) for pred in preds]


def evaluate_segmentation(
    info: DatasetInfo,
    ids: list[str],
    predict: Callable[[str], np.ndarray | list[np.ndarray]],
    desc: str,
) -> list[dict[str, Any]]:
    """Score label maps against the dataset's ground truth (the caller records the rows).

    ``predict(id)`` returns one (H, W) label map, or a list of them (one per setting being swept, e.g.
    thresholds); the confusion matrices accumulate over all images (dataset-level IoU, spec 5).
    Returns one score dict per setting (``misc.metrics.segmentation_scores``).
    """
    require_gt(info, ids)
    totals: list[np.ndarray] = []
    for image_id in tqdm(ids, desc=desc, disable=not dist.is_main(), mininterval=2):
        preds = predict(image_id)
        confusions = gt_confusions(info, image_id, preds if isinstance(preds, list) else [preds])
        totals = confusions if not totals else [t + c for t, c in zip(totals, confusions, strict=True)]
    return [segmentation_scores(conf, info.label_names) for conf in totals]


def score_cam_store(args: argparse.Namespace, cam_dir: str | os.PathLike, step: str, producer: str) -> dict[str, Any]:
    """The metrics row of a CAM store scored on ``args.eval_list`` (eval_cam; ORANDNet's OR / AND stores).

    Background is a constant plane at each threshold of ``args.cam_eval_sweep`` and ``args.cam_eval_thres``;
    the row holds the scores at ``cam_eval_thres`` (mIoU, mean precision / recall, ...), the sweep's mIoU
    (``sweep``), mean precision and recall per threshold (``sweep_precision`` / ``sweep_recall``), the best
    threshold, and the precision-aware one (``precision_threshold``: the first whose precision exceeds its
    recall, orandnet spec 9; None when none does). ``producer`` names the step that writes the store.
    """
    ids = read_id_list(args.eval_list)
    require_files(cam_dir, ids, ".npz", producer)
    thresholds = sorted({*args.cam_eval_sweep, args.cam_eval_thres})

    def predict(image_id: str) -> list[np.ndarray]:
        cams = load_cam(Path(cam_dir) / f"{image_id}.npz")
        return [scores_to_label(cams["high_res"], cams["keys"], t) for t in thresholds]

    scores = evaluate_segmentation(dataset.from_args(args), ids, predict, step)
    sweep = {f"{t:.2f}": s["miou"] for t, s in zip(thresholds, scores, strict=True)}
    precision = [s["mean_precision"] for s in scores]
    recall = [s["mean_recall"] for s in scores]
    best = max(sweep, key=sweep.get)
    chosen = scores[thresholds.index(args.cam_eval_thres)]
    return {"step": step, "split": split_name(args.eval_list), "threshold": args.cam_eval_thres, **chosen,
            "sweep": sweep, "best_threshold": float(best),
            "sweep_precision": {f"{t:.2f}": p for t, p in zip(thresholds, precision, strict=True)},
            "sweep_recall": {f"{t:.2f}": r for t, r in zip(thresholds, recall, strict=True)},
            "precision_threshold": choose_threshold(thresholds, precision, recall)}


def require_gt(info: DatasetInfo, ids: list[str]) -> None:
    missing = [i for i in ids if not info.has_mask(i)]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(ids)} evaluation images have no ground truth (first: "
            f"{info.seg_class(missing[0])}): pass --eval_list / --val_list with ids that have masks. A dataset "
            "without any masks: turn the evaluations off (--eval_cam_pass false, ...) and "
            "--calibrate_thresholds false, which needs them."
        )


def record(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Append a metrics row (rank 0 only) tagged with this round's variant and the plug-ins' labels
    (``metrics_tags``, set by the driver's ``round_args``), and log its headline number."""
    row = {"variant": args.variant, **row, **getattr(args, "metrics_tags", {})}
    if dist.is_main():
        record_metrics(args.work_dir, row)
        metric, value = headline(row)
        log.info("%s %s %.2f (%s, %s split)", row["step"], metric, value, row["variant"], row.get("split", "-"))


def split_name(list_file: str | os.PathLike) -> str:
    """``.../train.txt`` -> ``train``: the split named in metrics rows."""
    return Path(list_file).stem
