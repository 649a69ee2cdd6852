"""``python -m bench [--device auto|cpu|cuda] [--quick] [--out docs/benchmarks.md] [--threads N]``.

Only argument parsing lives here: spawned worker processes re-import this module, and should not pay
for torch and the networks.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and run the benchmarks (see ``bench.suite.run_all``)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time the pipeline's hot spots against their reference-style formulations, print a table and "
                    "rewrite the bench section of a markdown file.",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed call each: a smoke test")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose bench section is rewritten")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core); 1 is far less disturbed "
                             "by other processes on a shared machine")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    from bench.suite import run_all

    run_all(args.device, args.quick, args.out, command=shlex.join(["python", "-m", "bench", *argv]),
            threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
