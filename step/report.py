"""Step: the run's visual report, ``<work_dir>/report.html`` (``misc.report``); the driver's last step."""

from __future__ import annotations

import argparse
import logging

from misc import dist

log = logging.getLogger("wsss")


def run(args: argparse.Namespace) -> None:
    if dist.is_main():
        # Imported here: matplotlib is needed by this step alone.
        from misc.report import write_report

        log.info("report: %s (open it in a browser)", write_report(args.work_dir, args.report_images, args.seed))
    dist.barrier()
