"""The built-in end-to-end job: no downloads, under a minute on 2 CPU cores.

Writes a small synthetic two-domain dataset (A: soft 'photos', B: flat-shaded 'anime' drawings, the
layout of the public selfie2anime set), trains a tiny council on it with the reference trainer in
the b2a direction (as the official anime config does), then converts the domain-B test images with
every member and writes a contact sheet. Everything lands under --out.
"""
from __future__ import annotations

import argparse
import os

import torch

from ..checkpoint import latest_full_state_path
from ..data import make_synthetic_dataset
from . import main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=40,
                        help="training iterations of the tiny council (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")


def run(args) -> int:
    if args.iters < 1:
        raise SystemExit("council-fast demo: error: --iters must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("council-fast demo: error: --device cuda: no CUDA device is available")
    data = os.path.join(args.out, "data")
    if not os.path.isdir(os.path.join(data, "testB")):
        print(f"writing a synthetic two-domain dataset to {data}")
        make_synthetic_dataset(data, seed=args.seed)
    run_dir = os.path.join(args.out, "run")
    # A second demo into the same folder continues the first run (to --iters) instead of mixing two runs.
    resume = ["--resume"] if latest_full_state_path(os.path.join(run_dir, "checkpoints")) else []
    status = main(["train", "--config", "tiny", "--data", data, "--out", run_dir, "--iters", str(args.iters),
                   "--device", args.device, "--seed", str(args.seed)] + resume)
    if status:
        return status
    converted = os.path.join(args.out, "converted")
    status = main(["convert", "--checkpoint", os.path.join(run_dir, "checkpoints"), "--config", "tiny",
                   "--input", os.path.join(data, "testB"), "--output", converted, "--member", "all",
                   "--styles", "2", "--seed", str(args.seed), "--device", args.device, "--grid"])
    if status == 0:
        print(f"done: training samples in {os.path.join(run_dir, 'images')}, "
              f"translations and contact sheet in {converted}")
    return status
