"""Print versions, devices and which kernel back-ends can run here (and why not, when they cannot)."""
from __future__ import annotations

import argparse
import os
import platform

import torch

from ..ops import _backend
from ..version import __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build", action="store_true",
                        help="also load the C++ extensions, JIT-building them if needed (a minute or two the "
                             "first time); without it, info only says whether they are built already")


def _versions() -> dict:
    out = {"council-fast": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "cuda (torch)": torch.version.cuda or "none"}
    try:  # an optional extra
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"unavailable ({type(e).__name__})"
    return out


def run(args) -> int:
    for key, value in _versions().items():
        print(f"{key:>14}: {value}")
    print(f"{'cpu':>14}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"{'gpus':>14}: {', '.join(gpus) if gpus else 'none'}")
    devices = ["cpu"] + (["cuda"] if gpus else [])
    for device in devices:
        for backend in _backend.BACKENDS:
            if backend in ("cpu", "cuda") and backend == device and not args.build:
                built = _backend.cached_build(backend)
                status = (f"built ({built}); loads on first use" if built else
                          "not built yet: JIT-built on first use (pass --build to build it now)")
            else:
                reason = _backend._why_unavailable(backend, torch.device(device))
                status = "available" if reason is None else f"unavailable: {reason}"
            print(f"{device + '/' + backend:>14}: {status}")
    return 0
