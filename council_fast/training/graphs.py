"""The fused training iteration replayed as a CUDA graph.

One fused iteration still launches a few thousand kernels; at the official size (128x128, batch 3)
launching them takes longer than running them. :class:`GraphedTrainStep` captures the whole
iteration (the D, council-D and G updates: forward, backward and Adam) once and then replays it:

- everything an iteration reads from the host becomes a static device input, refreshed before each
  replay: the image batch, the z of every update (drawn by the trainer's own generator, in the
  reference order, so the values equal the eager engine's) and the council partner indices (drawn
  by the trainer's ``random.Random``);
- Adam runs with ``capturable=True`` (step counts and bias corrections on the device) and, inside the
  graph, with one device tensor per parameter group as its learning rate; the LR schedule keeps
  working on the groups' float values, which are copied into those tensors before a replay;
- the loss-matching histories are device tensors already (:mod:`council_fast.training.fused`);
- the council parts start at ``council_start_at_iter``, so there are two graphs (before and after),
  one per image shape as well; from the start on, the graph from before is dropped (its memory pool
  with it);
- each graph is captured after ``warmup`` eager iterations of its kind (real iterations, run on a side
  stream: they initialise the optimizer states, cuBLAS/cuDNN plans and Triton autotuning);
- the losses come back as copies (one ``torch.stack`` per dtype), valid after the next replay.

If a capture fails, that kind of iteration runs eagerly from then on, with one warning; strict mode
(``strict=True`` or COUNCIL_FAST_STRICT=1) raises :class:`~council_fast.cuda_graphs.CudaGraphError`.
One process only: the gradient all-reduce of data-parallel training is not captured.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..cuda_graphs import CudaGraphCapturer, CudaGraphError
from ..ops import strict_mode

__all__ = ["GraphedTrainStep"]


@dataclass
class _Slot:
    """One kind of iteration (council on/off, image shapes): static inputs, eager count, graph."""
    x_a: torch.Tensor
    x_b: torch.Tensor
    draws: object  # IterationDraws
    eager_runs: int = 0
    replay: Callable | None = None
    outputs: dict | None = None
    failed: str | None = None


class GraphedTrainStep:
    """Runs a :class:`~council_fast.training.fused.FusedCouncilTrainer` iteration as a CUDA graph."""

    def __init__(self, trainer, capturer=None, warmup: int = 2, strict: bool | None = None):
        self.trainer = trainer
        self.capturer = capturer or CudaGraphCapturer(trainer.device)
        self.warmup = max(int(warmup), 1)  # at least one: Adam creates its state on its first step
        self.strict = strict_mode(strict)
        self.captures = 0  # graphs captured so far
        self.replays = 0
        self._slots: dict[tuple, _Slot] = {}
        self._lr: list[torch.Tensor] = []  # one per parameter group, read by the graphs' Adam
        self._lr_loaded: list[float] = []

    def reset(self) -> None:
        """Forget every graph (after the optimizer states were replaced, e.g. by a checkpoint load)."""
        self._slots.clear()
        self._lr, self._lr_loaded = [], []

    def _param_groups(self) -> list[dict]:
        # Looked up each time: Optimizer.load_state_dict replaces the group dicts.
        return [g for opt in self.trainer.stacked_optimizers.values() for g in opt.param_groups]

    def run(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        trainer = self.trainer
        draws = trainer.draw_iteration(x_a, x_b)
        key = (draws.pairs is not None, trainer.council_gen_active(), tuple(x_a.shape), tuple(x_b.shape),
               x_a.dtype, x_b.dtype)
        slot = self._slots.get(key)
        if slot is None:
            if trainer.iteration >= trainer.config["council"]["council_start_at_iter"]:
                # From the council's start on, which council parts run no longer changes (the fused step has
                # no flipOnOff): graphs of other kinds are done. Dropped before this one warms up, so their
                # memory pools never coexist with it.
                self._slots = {k: v for k, v in self._slots.items() if k[:2] == key[:2]}
            slot = self._slots[key] = _Slot(x_a.clone(), x_b.clone(), draws.map(torch.clone))
        if slot.replay is None and (slot.failed or slot.eager_runs < self.warmup):
            slot.eager_runs += 1
            return self.capturer.run_eager(lambda: trainer.run_updates(x_a, x_b, draws))
        slot.x_a.copy_(x_a, non_blocking=True)
        slot.x_b.copy_(x_b, non_blocking=True)
        slot.draws.copy_from(draws)
        self._load_learning_rates()
        if slot.replay is None:
            if not self._capture(slot, key):
                return self.capturer.run_eager(lambda: trainer.run_updates(x_a, x_b, draws))
        slot.replay()
        self.replays += 1
        return _copy_losses(slot.outputs)

    def _capture(self, slot: _Slot, key: tuple) -> bool:
        trainer = self.trainer
        try:
            with self._tensor_learning_rates():
                slot.replay, slot.outputs = self.capturer.capture(
                    lambda: trainer.run_updates(slot.x_a, slot.x_b, slot.draws))
        except Exception as e:  # noqa: BLE001 - any capture failure means "run this kind eagerly"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            what = _describe(key)
            if self.strict:
                raise CudaGraphError(f"council-fast: CUDA graph capture of the training iteration ({what}) failed "
                                     f"({reason})") from e
            slot.failed, slot.replay, slot.outputs = reason, None, None
            warnings.warn(f"council-fast: CUDA graph capture of the training iteration ({what}) failed ({reason}); "
                          "running it eagerly", RuntimeWarning, stacklevel=4)
            return False
        self.captures += 1
        return True

    def _load_learning_rates(self) -> None:
        """The groups' float learning rates (the LR schedule's) into the graphs' lr tensors, when changed."""
        groups = self._param_groups()
        if not self._lr:
            self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.trainer.device) for g in groups]
            self._lr_loaded = [float(g["lr"]) for g in groups]
        for i, (group, t) in enumerate(zip(groups, self._lr)):
            lr = float(group["lr"])
            if lr != self._lr_loaded[i]:
                t.fill_(lr)
                self._lr_loaded[i] = lr

    @contextlib.contextmanager
    def _tensor_learning_rates(self):
        """Adam reads ``lr`` from the device tensors while a graph is captured; floats again afterwards."""
        groups = self._param_groups()
        saved = [g["lr"] for g in groups]
        for group, t in zip(groups, self._lr):
            group["lr"] = t
        try:
            yield
        finally:
            for group, lr in zip(groups, saved):
                group["lr"] = lr


def _copy_losses(outputs: dict) -> dict:
    """The graph's static loss tensors as fresh ones (one stack per dtype), in the same order."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in outputs.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    copied = {}
    for names in by_dtype.values():
        copied.update(zip(names, torch.stack([outputs[n] for n in names]).unbind(0)))
    return {name: copied[name] for name in outputs}


def _describe(key: tuple) -> str:
    council, council_gen, shape_a, shape_b = key[:4]
    return (f"council-D {'on' if council else 'off'}, council loss {'on' if council_gen else 'off'}, "
            f"images {list(shape_a)} / {list(shape_b)}")
