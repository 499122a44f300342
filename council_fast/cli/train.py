"""Train a council on an official data folder (reference or fused engine; same step, same checkpoints).

Usage: council-fast train --config C --data D --out O [--resume] [--iters N]
       [--engine reference|fused] [--precision fp32|bf16] [--device cpu|cuda] [--seed S]
Files keep the official numbering: the official per-member files and sample images after N
iterations are named N + 1 (so `--iters 40` ends with b2a_gen_*_00000041.pt), while the full-state
checkpoint state_<N>.pt is named by the iterations it holds.
"""
from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..fileio import DiskFullError
from ..metrics import InceptionWeightsError
from ..retention import DEFAULT_KEEP_LAST
from ..threads import add_threads_argument, set_threads
from ..training.loop import NonFiniteLoss, TrainError, TrainRequest, train

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config YAML (official format) or a packaged name: tiny, selfie2anime "
                                         "(optional with --resume: the checkpoint's config is used)")
    parser.add_argument("--data", help="data folder with trainA, trainB, testA, testB (overrides data_root)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints/ and images/ go here)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints' latest full state")
    parser.add_argument("--iters", type=int, help="train until this many iterations are done (default: the config's "
                                                  "max_iter + 1, as the official loop runs iterations 0..max_iter)")
    parser.add_argument("--engine", choices=("reference", "fused", "auto"), default="reference",
                        help="reference: the official per-member loops; fused: the council as one batched "
                             "network (same step, same checkpoints); auto: fused where it covers the config. "
                             "Default: %(default)s")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fused engine only: bf16 autocast with fp32 master weights. Default: %(default)s")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="fused engine on a GPU, one process: replay each iteration as a CUDA graph (the "
                             "first two of each kind, before and after council_start_at_iter, run eagerly)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's random_seed)")
    parser.add_argument("--keep-last", type=int, default=DEFAULT_KEEP_LAST, metavar="N",
                        help="keep the snapshot files (official per-member files, full states) of the newest N "
                             "snapshot iterations, delete older ones; 0 keeps all (default: %(default)s)")
    add_threads_argument(parser)
    # --- run log and evaluation (council_fast.train_monitor)
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="every N iterations: FID/KID of each member on a fixed subset of the test images, "
                             "logged; the full state remembers each member's best iteration (needs "
                             "--inception-weights). Default: off")
    parser.add_argument("--inception-weights", metavar="F", help="the FID Inception weights file "
                        "pt_inception-2015-12-05-6726825d.pth (for --eval-every)")
    parser.add_argument("--eval-images", type=int, default=100, metavar="N",
                        help="test images per domain for --eval-every (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    request = TrainRequest(out=args.out, config=args.config, data=args.data, resume=args.resume, iters=args.iters,
                           engine=args.engine, precision=args.precision, cuda_graphs=args.cuda_graphs,
                           device=args.device, seed=args.seed, keep_last=args.keep_last,
                           eval_every=args.eval_every, inception_weights=args.inception_weights,
                           eval_images=args.eval_images)
    try:
        return train(request)
    except (TrainError, ConfigError, CheckpointError, DataError, NotImplementedError, InceptionWeightsError) as e:
        print(f"council-fast train: error: {e}", file=sys.stderr)
        return 2
    except (DiskFullError, NonFiniteLoss) as e:  # ran, then failed: the last complete checkpoint stands
        print(f"council-fast train: error: {e}", file=sys.stderr)
        return 1
