"""`council-fast` command line: each subcommand lives in its own module of this package.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status) and holds
only argument handling and calls into the library.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..runtime import tune_cudnn
from ..version import __version__

# name -> (module, one-line help); modules are imported when the parser is built
COMMANDS = {
    "demo": ("council_fast.cli.demo", "train a small council on built-in synthetic shapes, then convert with it"),
    "train": ("council_fast.cli.train", "train a council (reference or fused engine) on an official data folder"),
    "convert": ("council_fast.cli.convert", "translate image files or folders with trained generators"),
    "parity": ("council_fast.cli.parity", "check that the fused training engine reproduces the reference iteration"),
    "bench": ("council_fast.cli.bench", "benchmark reference eager, torch.compile and the fused engine"),
    "serve": ("council_fast.cli.serve", "serve translations over HTTP with dynamic batching, a page and metrics"),
    "info": ("council_fast.cli.info", "print versions, devices and which kernel back-ends are available"),
    "eval": ("council_fast.cli.eval", "score each council member: FID and KID of its translations vs the target domain"),
    "report": ("council_fast.cli.report", "plot a training run's loss and metric curves to one PNG, with a summary"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="council-fast",
                                     description="council-fast: fast, faithful Council-GAN training and conversion.")
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
