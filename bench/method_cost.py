"""Training and inference cost of the CAM methods against the plain CAM network, per step (ratios).

    python -m bench.method_cost            # EfficientNet-Lite0, a 16 x 128² batch, one thread

Prints the seconds of one optimiser step (forward + backward) and of one CAM inference for the plain CAM
network and PPL in each of its configurations; a progressive run's cost is the sum over its stages.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import methods
import run_sample


def _seconds(fn, reps: int) -> float:  # noqa: ANN001 - any callable
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = (torch.rand(args.batch, 20) > 0.8).float()
    configs = [("plain CAM", [], None), *((f"PPL progressive, stage {i + 1}", ["--cam_method", "ppl"], level)
                                         for i, level in enumerate((1, 2, 3))),
               ("PPL explicit", ["--cam_method", "ppl", "--ppl_variant", "explicit"], None)]
    base_train = base_infer = None
    for name, flags, level in configs:
        run_args = run_sample.make_args(["--work_dir", "unused", *flags])
        method = methods.cam_method(run_args)
        net = method.build(run_args, 20)
        if level is not None:
            net.set_patch_level(level)
        net.train()
        train = _seconds(lambda: method.losses(net, x, labels)["loss"].backward(), args.reps)  # noqa: B023
        net.eval()
        with torch.no_grad():
            infer = _seconds(lambda: method.cams(net, x[:2]), args.reps)  # noqa: B023
        base_train, base_infer = base_train or train, base_infer or infer
        print(f"{name:28s} train step {train:6.3f} s ({train / base_train:4.2f}x)   "
              f"CAM inference {infer:6.3f} s ({infer / base_infer:4.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
