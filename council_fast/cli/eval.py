"""Score each council member: FID and KID of its translations against the target domain.

Translates the source domain's test split (testA for a2b, testB for b2a; the official test transform
at the config's new_size) with every chosen member, --styles times per image with style codes drawn
from --seed (the same codes for every member), and compares the Inception features of the
translations, rounded to 8 bits as a PNG would hold them, with those of the target domain's test
images. The untranslated source images are scored the same way: the distance a translator starts from.

Features come from the FID Inception-v3 (council_fast.metrics) with the standard weights file
pt_inception-2015-12-05-6726825d.pth, which --inception-weights names (download it from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
Exit status: 0 done; 1 the scores could not be computed; 2 nothing could start (options, checkpoint, data, weights).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError, load_test_images
from ..fileio import atomic_write_bytes
from ..inference import KERNEL_BACKENDS, ConvertError, Converter, load_generators, split_backend
from ..metrics import InceptionWeightsError, evaluate_members, format_table, load_inception
from ..runtime import PRECISIONS, SetupError, check_precision, resolve_device

__all__ = ["add_arguments", "run", "load_translator"]

EXIT_FAILED, EXIT_FATAL = 1, 2
ALL_IMAGES = 10 ** 9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="any checkpoint convert takes (official member "
                        "files, prefix or folder, or a council-fast full state)")
    parser.add_argument("--data", default=None, help="official data folder with testA/ and testB/ "
                        "(default: the config's data_root)")
    parser.add_argument("--config", default=None, help="YAML config or packaged name (optional for full states)")
    parser.add_argument("--members", default="all", help="'all' or a comma-separated list of member indices "
                        "(default: %(default)s)")
    parser.add_argument("--styles", type=int, default=1, help="translations per test image and member, each "
                        "with its own style code (default: %(default)s)")
    parser.add_argument("--inception-weights", metavar="F", default=None,
                        help="the FID Inception weights file pt_inception-2015-12-05-6726825d.pth (required)")
    parser.add_argument("--batch", type=int, default=16, help="images per model call (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="the generators' precision; Inception always runs fp32 (default: %(default)s)")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, default="auto",
                        help="generator engine, as for convert (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the style codes and KID subsets "
                        "(default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many test images per domain")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: %(default)s)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size, capped at the smaller set's size (default: %(default)s)")
    parser.add_argument("--json", metavar="F", default=None, help="also write the results to this JSON file")


def _members(spec: str) -> str | list[int]:
    if spec == "all":
        return "all"
    try:
        members = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConvertError(f"--members must be 'all' or comma-separated member indices, not {spec!r}") from None
    if not members:
        raise ConvertError("--members: no member given")
    return members


def load_translator(checkpoint: str, config: str | None, members, device: torch.device, precision: str,
                    backend: str = "auto"):
    """The one place generators are loaded (council_fast.inference): (translate(member, x, z), member list,
    config, direction, engine)."""
    engine, kernels = split_backend(backend)
    gens = load_generators(checkpoint, config, "all", engine, device, precision, backend=kernels)
    available = sorted(gens)
    chosen = available if members == "all" else members
    unknown = [k for k in chosen if k not in available]
    if unknown:
        raise ConvertError(f"--members {','.join(map(str, unknown))}: the checkpoint holds members "
                           f"{', '.join(map(str, available))}")
    converter = Converter({k: gens[k] for k in chosen}, device, precision, style_dim=gens.style_dim,
                          cuda_graphs=False)
    return converter.translate_batch, chosen, gens.config, gens.direction, gens.engine


def _validate(args) -> torch.device:
    for name in ("styles", "batch", "max_images", "kid_subsets", "kid_subset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConvertError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    return device


def _test_images(data_root: str, direction: str, config: dict, limit: int | None):
    source, target = ("A", "B") if direction == "a2b" else ("B", "A")
    count = limit or ALL_IMAGES
    return (load_test_images(data_root, source, config["new_size"], count),
            load_test_images(data_root, target, config["new_size"], count))


def _setup(args):
    device = _validate(args)
    members = _members(args.members)
    inception = load_inception(args.inception_weights, device)
    translate, chosen, config, direction, engine = load_translator(args.checkpoint, args.config, members, device,
                                                                   args.precision, args.backend)
    data_root = args.data or config.get("data_root")
    if not data_root:
        raise ConvertError("--data is required (the config names no data_root)")
    source, target = _test_images(data_root, direction, config, args.max_images)
    return device, inception, translate, chosen, config, direction, engine, source, target


def run(args) -> int:
    try:
        device, inception, translate, members, config, direction, engine, source, target = _setup(args)
    except (SetupError, CheckpointError, ConfigError, DataError, InceptionWeightsError) as e:
        print(f"council-fast eval: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    print(f"council-fast eval: {direction}, members {','.join(map(str, members))}, engine {engine}, {device}, "
          f"{args.precision}; {source.shape[0]} source x {args.styles} style(s) vs {target.shape[0]} target "
          "test images", file=sys.stderr)
    try:
        result = evaluate_members(inception, translate, members, source, target, config["gen"]["style_dim"],
                                  args.styles, args.seed, args.batch, args.kid_subsets, args.kid_subset_size)
    except ValueError as e:  # e.g. a matrix square root that cannot be taken
        print(f"council-fast eval: error: the scores could not be computed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_table(result))
    if args.json:
        meta = {"checkpoint": args.checkpoint, "direction": direction, "engine": engine, "device": str(device),
                "precision": args.precision, "inception_weights": args.inception_weights}
        payload = meta | result | {"members": {str(k): v for k, v in result["members"].items()}}
        atomic_write_bytes(args.json, (json.dumps(payload, indent=2) + "\n").encode())
    return 0
