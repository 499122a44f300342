"""Where and how a job runs: device names, precisions, autocast, cuDNN tuning and CPU threads.

Shared by the library (inference, conversion, benchmarks) and every command; it imports nothing
of council-fast, so any layer may use it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["SetupError", "PRECISIONS", "resolve_device", "check_precision", "autocast_context", "tune_cudnn",
           "cpu_threads", "ProcessGroup", "launched_by_torchrun", "join_process_group", "shutdown_process_group"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SetupError(ValueError):
    """A job cannot start as asked (device, precision or another setting); the message says why."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: cuda when available, else cpu; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SetupError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise SetupError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise SetupError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise SetupError("fp16 runs on CUDA only; on the CPU use --precision bf16 or fp32")


def autocast_context(device: torch.device, precision: str):
    """Autocast to bf16/fp16 (fp32 runs as is)."""
    device = torch.device(device)
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def tune_cudnn() -> None:
    """The commands run static shapes: cuDNN may time its convolution algorithms once per shape and keep
    the fastest (torch.backends.cudnn.benchmark). COUNCIL_FAST_CUDNN_BENCHMARK=0 keeps torch's heuristics."""
    if os.environ.get("COUNCIL_FAST_CUDNN_BENCHMARK", "1") != "0":
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave torch's choice), then restore."""
    if threads is not None and threads < 1:
        raise SetupError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Processes launched by torchrun (data-parallel training, sharded conversion)


@dataclass
class ProcessGroup:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(device_type: str | None = None, timeout_s: float = 1800.0,
                       command: str = "train") -> ProcessGroup:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    ``device_type``: 'cuda' (NCCL, GPU LOCAL_RANK) or 'cpu' (gloo); default cuda when available.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"running across processes needs the torchrun environment; missing {', '.join(missing)} "
                           f"(launch with: torchrun --nproc_per_node=N -m council_fast {command} ...)")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
