"""Benchmark the reference engine (eager and torch.compile) and the fused engine side by side.

``bench convert``: translate (encode content + decode) a batch of B images at S x S with each engine.
Its ``reference-official-flow`` row is the official test flow, which also runs the style encoder
and throws its output away; every other row skips it. On CUDA a ``fused (...)+cudagraph`` row
replays the fused translation as one CUDA graph (:mod:`council_fast.cuda_graphs`) and a
``fused (...)+channels_last`` row runs it on NHWC activations.
``bench train``: one full training iteration (D, council-D and G updates) of the reference trainer
and of the fused engine. ``bench ops``: forward and forward+backward of the generator's fusable ops
(AdaIN, instance norm, the decoder tail, the Winograd 3x3 conv), reference and (where council_fast.ops
has them) fused.

Every timing is the median over --repeats runs after --warmup untimed runs (the first of which
includes any compilation), the device synchronised around each run. On the CPU, ``bench convert``
times its engines round-robin (one run of each per round), so the load drifts of a shared machine
hit every engine alike; on a GPU it times one engine after the other, so that each row's peak
memory is its own. A failing engine (a compile
error, say) is reported in the table, not raised. ``--json F`` writes every field below.

JSON fields. Top level: ``benchmark`` (convert | train | ops); ``settings`` (config, device,
precision, batch, size, repeats, warmup, compile, backend); ``environment`` (date, council_fast,
python, torch, triton, cuda, device, device_name, cpu_model, cpu_threads, cpu_count, platform,
load_average); ``results``, one row per engine (per op, pass and engine for ops) with: name,
engine, status (ok | failed | not available | skipped), reason, median_ms, min_ms, mean_ms,
times_ms, img_per_s, speedup (vs the reference eager row of the same name), peak_mem_mib (GPU
only, else null; everything allocated, model weights included), first_call_s and max_rel_diff
(max |out - reference| / max |reference|, on the output for fwd and on the first input's
gradient for fwd+bwd; null for the reference itself and for train).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from ..bench import bench_convert, bench_ops, bench_train, environment, format_table
from ..bench.measure import REFERENCE
from ..config import ConfigError, load_config
from ..fileio import atomic_write_bytes
from ..inference import KERNEL_BACKENDS
from ..runtime import PRECISIONS, SetupError, check_precision, cpu_threads, resolve_device

SETTINGS_FIELDS = ("config", "device", "precision", "batch", "size", "repeats", "warmup", "compile", "backend")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("convert", "train", "ops"), help="what to benchmark")
    parser.add_argument("--config", default="selfie2anime",
                        help="YAML config or packaged name (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per call (default: 32 for convert, the config's batch_size for train, "
                             "8 for ops)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side (default: 256 for convert, the config's crop size for train, 64 for ops)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first, at least 1 (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=KERNEL_BACKENDS,
                        help="kernel back-end of the fused engine and ops (default: %(default)s; 'reference' "
                             "runs the fused code paths with plain PyTorch kernels)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile column (compiling can take minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; fewer than the cores is steadier "
                             "on a busy host)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--json", default=None, metavar="F", help="also write every field as JSON to F")


_DEFAULTS = {"convert": (32, 256), "train": (None, None), "ops": (8, 64)}


def _settings(args, config: dict) -> tuple[torch.device, int | None, int | None]:
    """(device, batch, size) from the arguments, or raises SetupError / ConfigError."""
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    if args.repeats < 1 or args.warmup < 1:
        raise SetupError("--repeats and --warmup must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise SetupError(f"--threads must be at least 1, got {args.threads}")
    batch = args.batch if args.batch is not None else _DEFAULTS[args.what][0]
    size = args.size if args.size is not None else _DEFAULTS[args.what][1]
    for value, label in ((batch, "--batch"), (size, "--size")):
        if value is not None and value < 1:
            raise SetupError(f"{label} must be positive, got {value}")
    if size is not None and size % 2 ** config["gen"]["n_downsample"]:
        raise SetupError(f"--size {size} must be a multiple of {2 ** config['gen']['n_downsample']}")
    return device, batch, size


def run(args) -> int:
    try:
        config = load_config(args.config)
        device, batch, size = _settings(args, config)
    except (SetupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # could not start: as argparse and every other council-fast command
    with cpu_threads(args.threads):
        return _run(args, device, config, batch, size)


def _run(args, device: torch.device, config: dict, batch: int | None, size: int | None) -> int:
    common = dict(precision=args.precision, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    if args.what == "convert":
        rows = bench_convert(config, device, batch=batch, size=size, compile=args.compile, backend=args.backend,
                             **common)
    elif args.what == "train":
        rows = bench_train(config, device, batch=batch, size=size, **common)
        batch = batch or config["batch_size"]
        size = size or config["crop_image_height"]
    else:
        rows = bench_ops(config, device, batch=batch, size=size, backend=args.backend, **common)
    settings = {"config": args.config, "device": str(device), "precision": args.precision, "batch": batch,
                "size": size, "repeats": args.repeats, "warmup": args.warmup, "compile": args.compile,
                "backend": args.backend}
    env = environment(device)
    print(f"council-fast bench {args.what}: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['cpu_threads']} threads, {args.precision}, {env['date']}")
    print(format_table(rows))
    if args.json:
        report = {"benchmark": args.what, "settings": settings, "environment": env,
                  "results": [asdict(r) for r in rows]}
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    # A failing compile or fused engine is a finding shown in the table; a failing reference is an error.
    return 1 if any(r.engine == REFERENCE and r.status != "ok" for r in rows) else 0
