"""Plot a training run: one PNG (RUN/report.png, or --output) with the loss curves (a panel per loss,
a line per council member), the FID/KID curves of --eval-every evaluations, learning rates and speed,
from RUN/log.jsonl; and a short text summary. Needs matplotlib: pip install 'council-fast[report]'.
Exit status: 0 done; 2 no run log, or matplotlib missing."""
from __future__ import annotations

import argparse
import os
import sys

from ..report import REPORT_NAME, plot_report, summarize
from ..runlog import LOG_NAME, read_log

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a training output folder (holding log.jsonl)")
    parser.add_argument("--output", default=None, help=f"the PNG to write (default: RUN/{REPORT_NAME})")


def run(args) -> int:
    log = os.path.join(args.run, LOG_NAME) if os.path.isdir(args.run) else args.run
    if not os.path.isfile(log):
        print(f"council-fast report: error: {log}: no run log (train writes it into its --out folder)",
              file=sys.stderr)
        return 2
    try:
        series, images = read_log(log)
        output = args.output or os.path.join(os.path.dirname(os.path.abspath(log)), REPORT_NAME)
        if series:
            plot_report(series, output, title=os.path.basename(os.path.dirname(os.path.abspath(log))))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"council-fast report: error: {e}", file=sys.stderr)
        return 2
    print(summarize(series, images))
    if series:
        print(f"plot: {output}")
    return 0
