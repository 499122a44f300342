"""What a training run reports while it runs: the run log (every scalar, sample sheets) and the
periodic FID/KID evaluation (``train --eval-every N``), behind one small interface the training loop
calls. Nothing here reads a device value per iteration: :meth:`TrainMonitor.record` keeps the
iteration's loss tensors, and :meth:`TrainMonitor.display` (called where the progress bar already
reads the losses, about once a second) converts them and writes them out.

Logged scalars: every loss the trainer returns (``{direction}/{loss}/{member}``, ``total/{member}``,
loss-matching factors ``{direction}/match/{member}``), ``lr/{kind}``, ``perf/img_per_s``,
``perf/gpu_mem_gb`` (peak allocated, CUDA only) and, when evaluating, ``eval/fid/{member}``,
``eval/kid_mean/{member}``, ``eval/kid_std/{member}`` (``source``: the untranslated test images).
"""
from __future__ import annotations

import os
import time

import torch

from .data import load_test_images
from .evalrecord import EVAL_STATE_KEY, EvalRecord
from .metrics import Evaluator, load_inception
from .runlog import RunLog

__all__ = ["TrainMonitor", "learning_rates", "member_translator"]


def learning_rates(trainer) -> dict:
    """``lr/{kind}`` of the trainer's optimizers (every member shares its kind's schedule). Values may be
    device tensors (CUDA-graph training keeps them on the device): they are cloned, not read."""
    optimizers = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else \
        getattr(trainer, "stacked_optimizers", {})
    out = {}
    for kind, opt in optimizers.items():
        lr = opt.param_groups[0]["lr"]
        out[f"lr/{kind}"] = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
    return out


def member_translator(trainer, direction: str):
    """translate(member, x, z) through ``trainer.sample``; a trainer that computes all members at once
    (the fused engine) does so once per batch: the last batch's outputs are reused for the next member."""
    last: dict = {}

    def translate(member: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if last.get("x") is not x or last.get("z") is not z:
            last.update(x=x, z=z, out=trainer.sample(x, direction, z=z))
        return last["out"][member]

    return translate


class TrainMonitor:
    """``out``: the run folder. ``eval_every`` 0/None: no evaluation. ``state``: the resumed full state."""

    def __init__(self, out: str, trainer, config: dict, *, images_per_iter: int, eval_every: int | None = None,
                 inception_weights: str | None = None, eval_images: int = 100, state: dict | None = None,
                 tensorboard: bool | None = None):
        self.trainer, self.images_per_iter = trainer, images_per_iter
        self.log = RunLog(out, tensorboard=tensorboard)
        self.direction = trainer.directions[-1]
        self.record = EvalRecord.from_state((state or {}).get(EVAL_STATE_KEY))
        self.evaluator = self._evaluator(config, eval_every, inception_weights, eval_images) if eval_every else None
        self._window = (time.perf_counter(), trainer.iteration)

    def _evaluator(self, config: dict, every: int, weights: str | None, count: int) -> Evaluator:
        source, target = ("A", "B") if self.direction == "a2b" else ("B", "A")
        model = load_inception(weights, self.trainer.device, option="--inception-weights")
        images = {d: load_test_images(config["data_root"], d, config["new_size"], count) for d in (source, target)}
        return Evaluator(model, images[source], images[target], range(self.trainer.size),
                         config["gen"]["style_dim"], every, record=self.record)

    def record_step(self, iteration: int, losses: dict) -> None:
        """Every iteration: keep its losses and learning rates (no device read)."""
        self.log.record(iteration, losses | learning_rates(self.trainer))

    def display(self, iteration: int) -> float:
        """Where the progress bar reads the losses: log speed (and peak GPU memory), write everything
        pending. Returns img/s since the previous call."""
        now = time.perf_counter()
        start, start_iter = self._window
        rate = (iteration - start_iter) * self.images_per_iter / max(now - start, 1e-9)
        perf = {"perf/img_per_s": rate}
        if self.trainer.device.type == "cuda":
            perf["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.trainer.device) / 2 ** 30
        self.log.record(iteration, perf)
        self.log.flush()
        self._window = (now, iteration)
        return rate

    def maybe_evaluate(self, iteration: int) -> dict:
        """The FID/KID evaluation when ``iteration`` is a multiple of --eval-every; logged; {} otherwise."""
        if self.evaluator is None or not self.evaluator.due(iteration):
            return {}
        scalars = self.evaluator.run(iteration, member_translator(self.trainer, self.direction))
        self.log.scalars(iteration, scalars)
        self._window = (time.perf_counter(), iteration)  # the evaluation's time is not training speed
        return scalars

    def image(self, iteration: int, path: str) -> None:
        if os.path.isfile(path):
            self.log.image(iteration, "samples", path)

    def state(self) -> dict:
        """What the full-state checkpoint keeps: the latest evaluation and each member's best iteration."""
        return {EVAL_STATE_KEY: self.record.state() | {"direction": self.direction}}

    def flush(self) -> None:
        self.log.flush()

    def close(self) -> None:
        self.log.close()
