"""Translate image files and folders with trained Council-GAN generators.

Inputs are files, folders (searched recursively) or glob patterns of jpg/jpeg/png/webp/bmp images.
Each input is resized (shorter side to --size, default the config's new_size) and centre-cropped
as the official test transform does, encoded once per council member, and decoded once per style
code z ~ N(0, I). Outputs go to --output as ``<name>_m<member>_s<style>.png``, keeping the
sub-folders of folder inputs. Decoding and resizing run in worker threads ahead of the model and
PNG encoding behind it. An input's style codes (and, with --member random, its member) depend only
on --seed and its output name, so a run repeats exactly. An unreadable input is reported by name
and skipped; the others still convert and the exit status is 1 (2 when nothing could start: bad
arguments, config or checkpoint, as for every council-fast command).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..fileio import report_stale_temp_files
from ..conversion import GRID_NAME, check_size, convert_paths, default_batch, find_inputs
from ..inference import KERNEL_BACKENDS, ConvertError, Converter, load_generators
from ..runtime import PRECISIONS, SetupError, check_precision, resolve_device

EXIT_FATAL = 2  # nothing could start (bad arguments, config, checkpoint, inputs): as argparse, train, parity
EXIT_SOME_FAILED = 1  # it ran, but some inputs failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config, or a packaged name (selfie2anime, tiny); required unless the "
                             "checkpoint is a council-fast full state, which carries its config")
    parser.add_argument("--checkpoint", required=True,
                        help="official member file (b2a_gen_3_01000000.pt), official prefix naming all "
                             "members (checkpoints/01000000), checkpoint folder, or council-fast full state")
    parser.add_argument("--direction", choices=("a2b", "b2a"), default=None,
                        help="which generators, when the checkpoint holds both")
    parser.add_argument("--input", nargs="+", required=True, metavar="IN",
                        help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder (created if needed)")
    parser.add_argument("--member", default="all", help="member index, 'all', or 'random' (one per input; "
                        "the official test script's choice) (default: %(default)s)")
    parser.add_argument("--styles", type=int, default=1, help="outputs per input and member, each with a "
                        "fresh style code z ~ N(0, I) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="makes the style codes and member choices repeatable (default: random, printed)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per model call (default: 8 on cpu; on cuda as many as half the free GPU "
                             "memory holds, at most 32; halved automatically if the GPU runs out of memory)")
    parser.add_argument("--size", type=int, default=None,
                        help="shorter side is resized to this, then centre-cropped square (default: new_size)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="autocast precision: bf16 on cpu or cuda, fp16 on cuda only (default: %(default)s)")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, default="auto",
                        help="auto = the fused engine when available, else the reference (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run every batch eagerly instead of replaying CUDA graphs (cuda only; graphs are "
                             "used where no autocast is involved: fp32, or the fused engine at any precision)")
    parser.add_argument("--save-masks", action="store_true", help="also write each output's attention masks")
    parser.add_argument("--grid", action="store_true",
                        help=f"also write {GRID_NAME}: one row per input, the input then its outputs "
                             "(kept in memory until the end: for small sets)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads decoding/resizing inputs and encoding outputs (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _validate_args(args) -> torch.device:
    for name in ("styles", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConvertError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ConvertError(f"--workers must not be negative, got {args.workers}")
    if args.size is not None and args.size < 1:
        raise ConvertError(f"--size must be positive, got {args.size}")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConvertError(f"--output {args.output}: exists and is not a folder")
    output = os.path.realpath(args.output)
    if any(os.path.isdir(spec) and os.path.realpath(spec) == output for spec in args.input):
        raise ConvertError(f"--output {args.output} is also an input folder: its outputs would be taken as "
                           "inputs next time; choose another --output")
    return device


def _engine(backend: str) -> tuple[str, str]:
    """--backend as (engine, kernel back-end): 'auto' and 'reference' name engines, the rest kernels."""
    return (backend, "auto") if backend in ("auto", "reference") else ("fused", backend)


def _load(args):
    """(device, inputs, generators, size), or raises the error that stops the run before it starts."""
    device = _validate_args(args)
    report_stale_temp_files(args.output, recursive=True)
    items, problems = find_inputs(args.input, exclude_dirs=[args.output])
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not items:
        raise ConvertError("no input images found in: " + ", ".join(args.input))
    engine, backend = _engine(args.backend)
    gens = load_generators(args.checkpoint, args.config, args.member, engine, device, args.precision,
                           args.direction, backend)
    size = args.size or gens.config["new_size"]
    check_size(size, gens.config)
    return device, items, gens, size


def run(args) -> int:
    try:
        device, items, gens, size = _load(args)
    except (SetupError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    if args.batch is None:
        args.batch = default_batch(device, size, args.precision)
    if not args.quiet:
        print(f"council-fast convert: {len(items)} inputs, {gens.direction} members "
              f"{','.join(map(str, gens))}, engine {gens.engine}, {device}, {args.precision}, "
              f"{size}x{size}, batch {args.batch}, seed {seed}", file=sys.stderr)
    converter = Converter(gens, device, args.precision, style_dim=gens.style_dim,
                          cuda_graphs=args.cuda_graphs and device.type == "cuda", graph_batch=args.batch)
    try:
        report = convert_paths(items, converter, args.output, size=size, member_mode=args.member,
                               styles=args.styles, seed=seed, batch=args.batch, workers=args.workers,
                               save_masks=args.save_masks, grid=args.grid, input_dim=gens.input_dim,
                               progress=not args.quiet)
    except OSError as e:  # the output folder or the contact sheet cannot be written
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    rate = report.converted / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.summary()} ({rate:.1f} inputs/s) -> {args.output}"
          + (f"; contact sheet {report.grid}" if report.grid else "")
          + (f" (random seed {seed}: pass --seed {seed} to repeat)" if args.seed is None else ""))
    return EXIT_SOME_FAILED if report.failed else 0
