"""How good are the targets AGMM's unlabelled loss pulls the prediction toward?

``L_gmm,u`` trains the prediction ``P`` toward the Gaussian responses ``G`` of the decoder features to the
labelled pixels' class centroids (spec agmm 6.4-6.5). It can only help where ``G`` labels the unlabelled
pixels better than ``P`` already does. For each finished sparse-label run (``--segmenter agmm``), over its
training images (whole image, one scale, the image's labelled classes only), this measures on the
unlabelled pixels whose ground truth is known (void excluded): the accuracy of ``argmax P`` and of
``argmax G``, and where the two disagree, how often each is right.

    python -m bench.agmm_probe runs/agmm/demo/points_full/seed0 runs/agmm/demo/points_pce/seed0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dataset
import run_sample
from dataset.base import read_id_list
from dataset.sparse import SparseLabels, image_classes
from misc.imutils import hwc_to_chw, normalize
from net.agmm import class_prototypes, gmm_responses, present_classes
from step.eval_deeplab import load_model


@torch.no_grad()
def probe(work_dir: Path, max_images: int | None = None) -> dict[str, float]:
    """Accuracies (percent) of ``P`` and ``G`` on the unlabelled pixels of ``work_dir``'s training images."""
    args = run_sample.round_args(run_sample.make_args(["--config", str(work_dir / "config.yaml"),
                                                       "--work_dir", str(work_dir)]), "baseline")
    info = dataset.from_args(args)
    model, _ = load_model(args, info, torch.device("cpu"))
    labels = SparseLabels(info, args.supervision, args.sparse_dir, args.sparse_clicks)
    k = info.num_labels
    counts = dict(pixels=0, p_right=0, g_right=0, disagree=0, p_wins=0, g_wins=0)
    for image_id in tqdm(read_id_list(args.deeplab_train_list)[:max_images], desc="agmm_probe", mininterval=2):
        img = info.read_photo(image_id)
        x = torch.from_numpy(hwc_to_chw(normalize(img)))[None]
        mask = torch.from_numpy(labels.read(image_id).astype(np.int64))[None]
        feat, logits = model(x, features=True)
        feat, logits = feat.float(), logits.float()
        y_cur = present_classes(mask, k)
        # The responses as the run's loss made them (fixed or adaptive width).
        cls_label = torch.from_numpy(image_classes(mask[0].numpy(), k))[None]
        g = gmm_responses(feat, class_prototypes(feat, mask, k), y_cur, mask, logits.softmax(1), cls_label,
                          args.agmm_adaptive_sigma)
        present = y_cur[0].bool()
        p_label = torch.where(present[:, None, None], logits[0], -torch.inf).argmax(0).numpy()
        g_label = torch.where(present[:, None, None], g[0], -torch.inf).argmax(0).numpy()
        gt = info.read_mask(image_id)
        scored = (mask[0].numpy() == k) & (gt < k)
        p_ok, g_ok = (p_label == gt)[scored], (g_label == gt)[scored]
        counts["pixels"] += int(scored.sum())
        counts["p_right"] += int(p_ok.sum())
        counts["g_right"] += int(g_ok.sum())
        counts["disagree"] += int((p_ok != g_ok).sum())
        counts["p_wins"] += int((p_ok & ~g_ok).sum())
        counts["g_wins"] += int((g_ok & ~p_ok).sum())
    n = max(counts["pixels"], 1)
    return {"P accuracy": 100 * counts["p_right"] / n, "G accuracy": 100 * counts["g_right"] / n,
            "disagree": 100 * counts["disagree"] / n, "P right where they disagree":
            100 * counts["p_wins"] / max(counts["disagree"], 1), "unlabelled pixels": counts["pixels"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dirs", type=Path, nargs="+", help="finished --segmenter agmm runs")
    p.add_argument("--max_images", type=int, default=None)
    args = p.parse_args(argv)
    for work in args.work_dirs:
        stats = probe(work, args.max_images)
        print(work, " ".join(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}"
                             for key, value in stats.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
