"""Check that the fused training engine computes the reference engine's iteration.

Builds both engines from the same seed, feeds them the same batch and compares the initial weights,
one full iteration (D, council-D, G updates) before council_start_at_iter and one at it (the fused
engine resumed from the reference's state): every loss, every gradient just before its optimizer step
and every parameter after it (what is compared and why: :mod:`council_fast.parity`). With
``--precision bf16`` only the losses are held to the bf16 tolerance (2e-2); gradients and parameters
are printed for information.

Exit status 0 when every checked figure is within tolerance (fp32: 1e-4; bf16: 2e-2), 1 otherwise, 2 when
it cannot start (no CUDA device, a bad config, or a config the fused engine does not implement).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from ..config import ConfigError, load_config
from ..lowering import UnsupportedForFusion
from ..parity import TOLERANCES, Comparison, check_parity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config YAML or packaged name (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--precision", choices=tuple(TOLERANCES), default="fp32",
                        help="fused engine precision (default: %(default)s)")
    parser.add_argument("--iters-before", type=int, default=None, metavar="N",
                        help="iteration counter of the first checked step (default: 0, before the council starts)")
    parser.add_argument("--iters-after", type=int, default=None, metavar="N",
                        help="iteration counter of the second checked step (default: council_start_at_iter)")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's batch_size)")
    parser.add_argument("--size", type=int, help="image size (default: the config's crop size)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--tolerance", type=float, help="override the tolerance of the loss, gradient and parameter checks (the "
                             "parameter-update check keeps 1e-2 and the normalised-away bias checks keep theirs)")
    parser.add_argument("--verbose", action="store_true", help="print every compared tensor, not only the worst")


def _print(comparison: Comparison, verbose: bool) -> None:
    print(f"== {comparison.label}")
    for c in comparison.checks:
        status = "info" if math.isinf(c.tolerance) else ("ok" if c.ok else "FAIL")
        tol = "" if math.isinf(c.tolerance) else f" (tolerance {c.tolerance:.0e})"
        print(f"  {status:4s} {c.name}: worst {c.worst:.3e} at {c.where}{tol}")
    if verbose:
        for name, key, value in sorted(comparison.details):
            print(f"       {name.split(' (')[0]}: {key}: {value:.3e}")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("council-fast parity: error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"council-fast parity: error: {e}", file=sys.stderr)
        return 2
    try:
        report = check_parity(config, args.device, args.precision, args.iters_before, args.iters_after, args.batch,
                              args.size, args.seed, args.tolerance)
    except UnsupportedForFusion as e:  # nothing to compare: could not start
        print(f"council-fast parity: error: {e}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}")
    print(f"parity: fused ({args.precision}) vs reference, config {args.config}, device {args.device}, "
          f"batch {report.batch}, size {report.size}, seed {args.seed}")
    for r in report.results:
        _print(r, args.verbose)
    print("PASS" if report.ok else "FAIL: the fused engine does not reproduce the reference iteration")
    return 0 if report.ok else 1
