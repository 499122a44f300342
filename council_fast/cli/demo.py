"""The built-in end-to-end job: no downloads, a minute or two on 2 CPU cores (once the kernels are built).

Writes the built-in shapes set (domain B: cool-coloured circles, squares and triangles on a light
background; domain A: the same kinds of shapes in warm colours on the same background), trains the
packaged `demo` council (3 members, 32x32) on it in the b2a direction (B -> A, the direction the
official anime config trains), then converts the domain-B test images with
every member and writes a labelled contact sheet. It prints a number that shows the council learned:
the colour distance between the members' translations of the test B images and the test A images
(:mod:`council_fast.colour_distance`: 0 when their colours are distributed like those of real A
images, 1 for all black against all white), before and after training.
Everything lands under --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import checkpoint as ckpt
from ..colour_distance import colour_distance
from ..config import packaged_config
from ..data import SHAPES_B_TO_A, load_test_images, make_shapes_dataset
from ..training import why_not_fused
from ..threads import add_threads_argument, set_threads
from ..training.reference import CouncilTrainer
from . import main

DEMO_CONFIG = "demo"
DEMO_ITERS = 600
_SCORE_SEED = 12345  # style codes of the score: the same before and after training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS,
                        help="training iterations of the demo council (default: %(default)s)")
    parser.add_argument("--engine", choices=("fused", "reference"), default="fused",
                        help="training engine (default: %(default)s, the faster one on the CPU too)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    add_threads_argument(parser)


def council_colour_distance(trainer: CouncilTrainer, x_b: torch.Tensor, x_a: torch.Tensor) -> float:
    """Mean over members of the colour distance between their b2a translations of ``x_b``
    (fixed style codes) and the real domain-A images ``x_a``."""
    z = torch.randn(x_b.size(0), trainer.config["gen"]["style_dim"], 1, 1,
                    generator=torch.Generator().manual_seed(_SCORE_SEED))
    outs = trainer.sample(x_b, "b2a", z=z)
    return sum(colour_distance(o, x_a) for o in outs) / len(outs)


def _council_at(config: dict, checkpoint_dir: str, seed: int) -> CouncilTrainer:
    """The council of the run's latest full state, or a fresh one as training starts it (same seed)."""
    trainer = CouncilTrainer(config, "cpu", seed=seed)
    path = ckpt.latest_full_state_path(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    if path is not None:
        trainer.load_state_dict(ckpt.load_full_state(path), path)
    return trainer


def _test_sets(data: str, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(os.listdir(os.path.join(data, "testB")))
    return (load_test_images(data, "B", config["new_size"], count),
            load_test_images(data, "A", config["new_size"], count))


def run(args) -> int:
    if args.iters < 1:
        raise SystemExit("council-fast demo: error: --iters must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("council-fast demo: error: --device cuda: no CUDA device is available")
    config = packaged_config(DEMO_CONFIG)
    threads = ["--threads", str(set_threads(args.threads))]
    engine = args.engine if not why_not_fused(config) else "reference"
    data = os.path.join(args.out, "shapes")
    if not os.path.isdir(os.path.join(data, "testB")):
        print(f"writing the synthetic shapes set to {data} ({SHAPES_B_TO_A})")
        make_shapes_dataset(data, size=config["new_size"], seed=args.seed)
    run_dir = os.path.join(args.out, "run")
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    x_b, x_a = _test_sets(data, config)
    before_trainer = _council_at(config, checkpoint_dir, args.seed)
    before, start_iter = council_colour_distance(before_trainer, x_b, x_a), before_trainer.iteration
    # A second demo into the same folder continues the first run (to --iters) instead of mixing two runs.
    resume = ["--resume"] if start_iter else []
    status = main(["train", "--config", DEMO_CONFIG, "--data", data, "--out", run_dir, "--iters", str(args.iters),
                   "--engine", engine, "--device", args.device, "--seed", str(args.seed)] + resume + threads)
    if status:
        return status
    after_trainer = _council_at(config, checkpoint_dir, args.seed)
    after = council_colour_distance(after_trainer, x_b, x_a)
    converted = os.path.join(args.out, "converted")
    status = main(["convert", "--checkpoint", checkpoint_dir, "--input", os.path.join(data, "testB"),
                   "--output", converted, "--member", "all", "--styles", "2", "--seed", str(args.seed),
                   "--device", args.device, "--grid"] + threads)
    if status == 0:
        _report(args, run_dir, converted, (start_iter, before), (after_trainer.iteration, after),
                colour_distance(x_b, x_a))
    return status


def _report(args, run_dir: str, converted: str, before: tuple[int, float], after: tuple[int, float],
            untranslated: float) -> None:
    print(f"\nthe demo council translates b2a: {SHAPES_B_TO_A}")
    print("colour distance of its translations of the test B images to the test A images (per-channel "
          "earth mover's distance of pixel values; 0 = coloured like real A images; council_fast/colour_distance.py):")
    print(f"  iteration {before[0]:>5}: {before[1]:.3f}\n  iteration {after[0]:>5}: {after[1]:.3f}"
          f"   (the untranslated B images: {untranslated:.3f})")
    if after[1] >= before[1]:
        print("  (it has not improved: train longer with --iters)", file=sys.stderr)
    print(f"look at: {os.path.join(converted, 'contact_sheet.png')} (each test B image, then every member's "
          f"translation with 2 styles)\n         {os.path.join(run_dir, 'images')} (training samples every "
          "100 iterations: input, then one column per member)")
