"""CPU thread settings of the commands: never more compute threads than the cores the process may use.

torch sizes its intra-op pool from the machine's cores; on a shared host, or in a container or job
limited to a few cores (``taskset``, cgroups cpusets), that oversubscribes them and an iteration can take
tens of times longer. ``--threads N`` sets the pool; the default is the number of cores this process may
run on (``os.sched_getaffinity``; under torchrun shared among the host's processes), or
``OMP_NUM_THREADS`` when that is set and smaller.
"""
from __future__ import annotations

import argparse
import os

import torch

__all__ = ["usable_cores", "default_threads", "set_threads", "add_threads_argument"]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The usable cores (shared out among torchrun's processes on this host: LOCAL_WORLD_SIZE), or
    OMP_NUM_THREADS when it is a smaller positive number."""
    cores = usable_cores()
    try:
        cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    except ValueError:
        pass
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return cores
    return min(cores, omp) if omp > 0 else cores


def set_threads(threads: int | None = None) -> int:
    """Size torch's intra-op pool (``threads``, default :func:`default_threads`) and its inter-op pool
    (1: the commands run one op at a time); returns the intra-op count. OMP_NUM_THREADS is set too, for
    the OpenMP kernels and any child process."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work; keep what is there
        pass
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive, default=None,
                        help=f"CPU compute threads (default: the cores this process may use, {usable_cores()} "
                             "here, or OMP_NUM_THREADS when smaller)")
