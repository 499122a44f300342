"""The `bench serve` part of the bench command: its arguments and its run (the load test is in loadtest.py)."""
from __future__ import annotations

import sys
import tempfile
from typing import Callable

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, load_config
from ..fileio import atomic_write_bytes
from ..inference import ConvertError
from ..runtime import SetupError, resolve_device
from . import loadtest

__all__ = ["add_serve_arguments", "run_serve_bench"]


def add_serve_arguments(group) -> None:
    group.add_argument("--checkpoint", default=None,
                       help="serve: the checkpoint to serve (default: random weights of --config, written to a "
                            "temporary folder)")
    group.add_argument("--clients", type=int, default=16, help="serve: concurrent clients (default: %(default)s)")
    group.add_argument("--requests", type=int, default=200, help="serve: requests per run (default: %(default)s)")
    group.add_argument("--duration", type=float, default=120.0,
                       help="serve: at most this many seconds per run (default: %(default)s)")
    group.add_argument("--max-wait-ms", type=float, default=5.0, help="serve: the server's --max-wait-ms "
                       "(default: %(default)s)")
    group.add_argument("--bad-fraction", type=float, default=0.0,
                       help="serve: share of bad inputs mixed in, each must get a 4xx (default: %(default)s)")


def _check(args) -> None:
    if args.clients < 1 or args.requests < 1 or args.duration <= 0:
        raise ConvertError("--clients and --requests must be at least 1, --duration positive")
    if not 0 <= args.bad_fraction < 1:
        raise ConvertError(f"--bad-fraction must be in [0, 1), got {args.bad_fraction}")
    for flag, value in (("--batch", args.batch), ("--size", args.size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ConvertError(f"{flag} must be at least 1, got {value}")


def run_serve_bench(args, environment: Callable[[torch.device], dict]) -> int:
    try:
        _check(args)
        device = resolve_device(args.device)
        config = load_config(args.config)
        size = args.size or int(config["new_size"])
        if size % 2 ** config["gen"]["n_downsample"]:
            raise ConvertError(f"--size {size} must be a multiple of {2 ** config['gen']['n_downsample']}")
    except (SetupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server_args = ["--device", str(device), "--precision", args.precision, "--backend", args.backend,
                   *(["--threads", str(args.threads)] if args.threads else [])]
    batch = args.batch or 32
    with tempfile.TemporaryDirectory(prefix="council-fast-bench-serve-") as tmp:
        checkpoint = args.checkpoint or loadtest.random_checkpoint(config, tmp, args.seed)
        try:
            report = loadtest.bench_serve(checkpoint, args.config, max_batch=batch, max_wait_ms=args.max_wait_ms,
                                          clients=args.clients, requests=args.requests, duration=args.duration,
                                          bad_fraction=args.bad_fraction, size=size, server_args=server_args,
                                          progress=lambda m: print(m, file=sys.stderr))
        except (RuntimeError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    settings = {"config": args.config, "device": str(device), "precision": args.precision, "max_batch": batch,
                "max_wait_ms": args.max_wait_ms, "size": size, "clients": args.clients, "requests": args.requests,
                "duration_s": args.duration, "bad_fraction": args.bad_fraction, "backend": args.backend,
                "server_threads": args.threads, "checkpoint": args.checkpoint or "random weights"}
    env = environment(device)
    print(f"council-fast bench serve: {env['device_name']}, torch {env['torch']}, {args.precision}, {size}x{size}, "
          f"{args.clients} clients, {env['date']}")
    print(loadtest.format_table(report))
    if args.json:
        atomic_write_bytes(args.json, loadtest.json_text({"benchmark": "serve", "settings": settings,
                                                          "environment": env, **report}).encode())
        print(f"wrote {args.json}")
    return 0 if loadtest.passed(report) else 1
