"""Training a council: one step interface, two engines side by side, one factory.

- :mod:`.common`: the step interface (:class:`~.common.TrainerBase`) and what both engines share
  (config checks, official initialisation, Adam + LR schedule, random streams, full-state layout);
- :mod:`.reference`: the reference engine (the official per-member loops, every config switch);
- :mod:`.fused`: the fused engine (the council as stacked networks, :mod:`council_fast.lowering`);
- :mod:`.discriminators`: the stacked discriminators and their per-member losses;
- :mod:`.graphs`: the fused step as a CUDA graph; :mod:`.distributed`: data-parallel hooks;
- :mod:`.loop`: the training loop (data, snapshots, contact sheets, resume, Ctrl-C).

:func:`make_trainer` decides once which engine runs a config; :func:`why_not_fused` says why the
fused engine does not cover one.
"""
from __future__ import annotations

import warnings

import torch

from .common import TrainerBase
from .distributed import DataParallelHooks
from .fused import PRECISIONS, FusedCouncilTrainer, why_not_fused
from .reference import CouncilTrainer

__all__ = ["make_trainer", "why_not_fused", "ENGINES", "PRECISIONS", "TrainerBase", "CouncilTrainer",
           "FusedCouncilTrainer", "DataParallelHooks"]

ENGINES = ("auto", "fused", "reference")


def choose_engine(config: dict, engine: str = "auto", precision: str = "fp32", hooks=None,
                  cuda_graphs: bool = False, warn=None) -> str:
    """'fused' or 'reference' for ``config``: ``auto`` takes the fused engine where it covers the config
    (else the reference one, saying why once through ``warn``); ``fused`` on a config it does not cover,
    or a fused-only option (bf16, CUDA graphs, data parallel) on the reference engine, is an error."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    fused_only = [what for what, wanted in (("--precision bf16", precision != "fp32"), ("--cuda-graphs", cuda_graphs),
                                            ("data-parallel training (torchrun)", _parallel(hooks))) if wanted]
    if engine == "reference":
        if fused_only:
            raise ValueError(f"{', '.join(fused_only)} needs the fused engine (the reference engine runs fp32, "
                             "eagerly, in one process)")
        return "reference"
    reasons = why_not_fused(config)
    if not reasons:
        return "fused"
    switches = "; ".join(reasons)
    if engine == "fused" or fused_only:
        wanted = "--engine fused" if engine == "fused" else ", ".join(fused_only)
        raise NotImplementedError(f"{wanted}: the fused engine does not implement {switches} "
                                  "(use --engine reference, or turn those switches off)")
    (warn or _note)(f"engine auto: running the reference engine because the fused engine does not implement: "
                    f"{switches}")
    return "reference"


def _parallel(hooks) -> bool:
    return hooks is not None and type(hooks) is not DataParallelHooks


def _note(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def make_trainer(config: dict, engine: str = "auto", device: str | torch.device = "cpu", seed: int | None = None,
                 precision: str = "fp32", hooks: DataParallelHooks | None = None, cuda_graphs: bool = False,
                 warn=None, **fused_options) -> TrainerBase:
    """The trainer of ``config`` on ``engine`` (see :func:`choose_engine`); ``fused_options`` go to the
    fused engine (``graph_capturer``, ``strict``, ``upsample_conv``, ``winograd``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    chosen = choose_engine(config, engine, precision, hooks, cuda_graphs, warn)
    if chosen == "reference":
        return CouncilTrainer(config, device, seed=seed)
    return FusedCouncilTrainer(config, device, seed=seed, precision=precision, hooks=hooks, cuda_graphs=cuda_graphs,
                               **fused_options)
