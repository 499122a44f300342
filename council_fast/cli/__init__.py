"""`council-fast` command line: each subcommand lives in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("council_fast.demo", "train a tiny council on built-in synthetic data, then convert with it"),
    "train": ("council_fast.cli.train", "train a council (reference or fused engine) on an official data folder"),
    "convert": ("council_fast.convert", "translate image files or folders with trained generators"),
    "parity": ("council_fast.parity", "check that the fused training engine reproduces the reference iteration"),
    "bench": ("council_fast.bench", "benchmark reference eager, torch.compile and the fused engine"),
    "info": ("council_fast.info", "print versions, devices and which kernel back-ends are available"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="council-fast",
                                     description="council-fast: fast, faithful Council-GAN training and conversion.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"council-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def tune_cudnn() -> None:
    """The commands run static shapes: cuDNN may time its convolution algorithms once per shape and keep
    the fastest (torch.backends.cudnn.benchmark). COUNCIL_FAST_CUDNN_BENCHMARK=0 keeps torch's heuristics."""
    import os

    import torch

    if os.environ.get("COUNCIL_FAST_CUDNN_BENCHMARK", "1") != "0":
        torch.backends.cudnn.benchmark = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cudnn()
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
