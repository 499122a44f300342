"""Serve translations over HTTP with dynamic batching (needs the serve extra: pip install "council-fast[serve]").

POST /v1/translate takes a multipart form (image, member, styles, seed, size, format, face_crop) and
answers JSON with base64 PNGs (or format=png: the image itself); GET / is a page to try it from a
browser or phone; /healthz, /readyz and /metrics (Prometheus) are for operators. Requests wait in one
bounded queue (--max-queue; a full queue answers 503 with Retry-After); a worker forms batches of up
to --max-batch requests, waiting at most --max-wait-ms for the batch to fill. The same seed and file
name give the same images as `council-fast convert`. SIGINT / SIGTERM stop taking requests and finish
the queued ones before exiting.
"""
from __future__ import annotations

import argparse
import sys


from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..inference import KERNEL_BACKENDS, ConvertError
from ..runtime import PRECISIONS, SetupError
from ..serving.engine import ServingEngine
from ..facecrop import FaceCropError, check_available
from ..threads import add_threads_argument, set_threads

__all__ = ["add_arguments", "run", "build_app"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="any checkpoint convert accepts (official member file or prefix, folder, full state)")
    parser.add_argument("--config", default=None, help="YAML config or packaged name (needed for official files)")
    parser.add_argument("--direction", choices=("a2b", "b2a"), default=None)
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s (this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="default: %(default)s")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, default="auto", help="default: %(default)s")
    parser.add_argument("--max-batch", type=int, default=32, help="requests per model batch (default: %(default)s)")
    parser.add_argument("--cpu-batch", type=_cpu_batch, default="auto",
                        help="on the CPU, requests per model batch at most: a number, or 'auto' (the default): "
                             "the warm-up times batches of 1, 2, 4, ... up to --max-batch and keeps the one with "
                             "the least time per image (at 256x256 on a few cores that is often 1)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the oldest request waits for its batch to fill (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting at most; more get 503 + Retry-After (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="images with more pixels are refused before decoding (default: %(default)s)")
    parser.add_argument("--max-styles", type=int, default=16, help="styles per request at most (default: %(default)s)")
    parser.add_argument("--max-size", type=int, default=1024,
                        help="largest 'size' a request may ask (default: %(default)s)")
    parser.add_argument("--face-crop", action="store_true",
                        help="crop every photo to its largest face first (a request's face_crop field overrides; "
                             "needs the face extra: opencv-python-headless)")
    parser.add_argument("--face-margin", type=float, default=2.0,
                        help="face crop side / detected face side (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run batches eagerly on cuda instead of replaying one CUDA graph per batch-size bucket")
    add_threads_argument(parser)
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _cpu_batch(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _settings(args):
    from ..serving.app import ServeSettings

    checks = {"--max-batch": args.max_batch, "--max-queue": args.max_queue, "--max-pixels": args.max_pixels,
              "--max-styles": args.max_styles, "--max-size": args.max_size}
    for flag, value in checks.items():
        if value < 1:
            raise ConvertError(f"{flag} must be at least 1, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.face_margin < 1:
        raise ConvertError("--max-wait-ms must not be negative, --max-upload-mb must be positive, "
                           "--face-margin at least 1")
    if not 0 <= args.port <= 65535:
        raise ConvertError(f"--port {args.port}: not a port number")
    return ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_upload_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels,
                         max_styles=args.max_styles, max_size=args.max_size, face_crop=args.face_crop,
                         face_margin=args.face_margin)


def build_app(args):
    """(app, engine) from parsed arguments; raises SetupError / CheckpointError / ConfigError / ImportError."""
    from ..serving.app import create_app  # the serve extra (starlette), only when serving

    settings = _settings(args)
    if args.face_crop:
        check_available()  # fail at start, not at the first request
    engine = ServingEngine(args.checkpoint, args.config, args.direction, args.device, args.precision, args.backend,
                           max_batch=args.max_batch, cuda_graphs=None if args.cuda_graphs else False,
                           cpu_batch=args.cpu_batch)
    return create_app(engine, settings), engine


def run(args) -> int:
    set_threads(args.threads)
    try:
        import uvicorn  # the serve extra
        app, engine = build_app(args)
    except ImportError as e:
        print(f'error: {e}. Serving needs the serve extra: pip install "council-fast[serve]"', file=sys.stderr)
        return 2
    except (SetupError, CheckpointError, ConfigError, FaceCropError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"council-fast serve: members {','.join(map(str, engine.members))}, engine {engine.engine}, "
          f"{engine.device}, {args.precision}, {engine.size}x{engine.size}, max batch {args.max_batch}, "
          f"max wait {args.max_wait_ms} ms, on http://{args.host}:{args.port}/", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None, access_log=args.log_level == "debug")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
