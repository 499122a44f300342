"""The training loop: data, the iterations, snapshots, contact sheets, resume and stop requests.

:func:`train` runs a :class:`TrainRequest` (what the ``train`` command parsed) to the end or to a
stop request and returns the exit status (0 done, 130 or 143 stopped by Ctrl-C or SIGTERM before the target).
A loss gone NaN/inf raises :class:`NonFiniteLoss` (nothing of that iteration saved). Problems
found before training starts raise :class:`TrainError` (or a config / checkpoint / data error).

Files keep the official numbering: the official per-member files and sample images after N
iterations are named N + 1 (so ``iters=40`` ends with b2a_gen_*_00000041.pt), while the full-state
checkpoint state_<N>.pt is named by the iterations it holds.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import yaml
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import ConfigError, load_config, official_keys_notice
from ..data import TrainPairLoader, load_test_images
from ..fileio import atomic_write_bytes, report_stale_temp_files
from ..images import save_labelled_sheet
from ..retention import DEFAULT_KEEP_LAST, prune_snapshots
from ..train_monitor import TrainMonitor
from . import distributed as dp
from . import make_trainer
from .common import TrainerBase, seed_everything

__all__ = ["TrainRequest", "TrainError", "train", "StopRequest", "NonFiniteLoss", "check_finite_losses"]


class TrainError(ValueError):
    """A training request that cannot start (the message says why)."""


@dataclass
class TrainRequest:
    out: str
    config: str | None = None  # a YAML path or a packaged name; optional with resume
    data: str | None = None
    resume: bool = False
    iters: int | None = None  # train until this many iterations are done (default max_iter + 1)
    engine: str = "reference"
    precision: str = "fp32"
    cuda_graphs: bool = False
    device: str | None = None  # default: cuda when available
    seed: int | None = None
    keep_last: int = DEFAULT_KEEP_LAST  # snapshot iterations kept on disk; 0 keeps all
    # --- run log and evaluation (council_fast.train_monitor)
    eval_every: int = 0  # FID/KID of each member every N iterations (0: off); needs inception_weights
    inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth
    eval_images: int = 100  # test images per domain for the evaluation


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the iteration, save, stop (exit 130 or 143). Second: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this iteration and saving (Ctrl-C again to stop now)", file=sys.stderr)

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: training stops without saving the poisoned weights."""


def check_finite_losses(losses: dict, iteration: int) -> None:
    """NonFiniteLoss naming the iteration and the first non-finite loss (reads the losses: a GPU sync)."""
    for name, value in losses.items():
        if not math.isfinite(float(value)):
            raise NonFiniteLoss(f"iteration {iteration}: loss {name!r} is {float(value)}; training stopped, "
                                f"nothing of this iteration saved (the last good checkpoint is kept); a lower "
                                f"lr or loss weights may help")


def train(request: TrainRequest) -> int:
    """Check the request, join torchrun's process group when launched by it, train."""
    check_engine_options(request, dp.launched_by_torchrun())
    check_eval_options(request)
    if request.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    ctx = dp.setup(request.device) if dp.launched_by_torchrun() else None
    try:
        return _train_on(request, ctx)
    finally:
        if ctx is not None:
            dp.shutdown()


def check_engine_options(request: TrainRequest, parallel: bool) -> None:
    """The options only the fused engine has, named as the command names them."""
    if request.precision != "fp32" and request.engine == "reference":
        raise TrainError("--precision bf16 needs --engine fused (the reference engine runs fp32)")
    if request.cuda_graphs and request.engine == "reference":
        raise TrainError("--cuda-graphs needs --engine fused")
    if parallel and request.engine == "reference":
        raise TrainError("data-parallel training (torchrun) needs --engine fused")


def check_eval_options(request: TrainRequest) -> None:
    """The run log and evaluation's options (--eval-every), named as the command names them."""
    if request.eval_every < 0 or request.eval_images < 2:
        raise TrainError("--eval-every must be >= 0 and --eval-images >= 2")
    if request.eval_every and request.inception_weights is None:
        raise TrainError("--eval-every needs --inception-weights F (the FID Inception weights "
                         "pt_inception-2015-12-05-6726825d.pth; see the README)")


def _resolve_config(request: TrainRequest, checkpoint_dir: str):
    state = None
    if request.resume:
        path = ckpt.latest_full_state_path(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
        if path is None:
            raise ckpt.CheckpointError(f"{checkpoint_dir}: nothing to resume (no state_<n>.pt or latest.txt)")
        state = ckpt.load_resume_state(path)
        config = state["config"]
        if request.config is not None and load_config(request.config) | {"data_root": None} != config | {"data_root": None}:
            print(f"note: --config {request.config} differs from the config saved in {path}; resuming with the "
                  "saved one (drop --config when resuming)", file=sys.stderr)
        state["_path"] = path
    elif request.config is None:
        raise ConfigError("--config is required (a YAML path, or a packaged name: tiny, selfie2anime)")
    else:
        config = load_config(request.config)
    if request.data is not None:
        config["data_root"] = request.data
    return config, state


def _build_trainer(request: TrainRequest, config: dict, device: str, seed: int, hooks) -> TrainerBase:
    try:
        return make_trainer(config, request.engine, device=device, seed=seed, precision=request.precision,
                            hooks=hooks, cuda_graphs=request.cuda_graphs)
    except (ValueError, NotImplementedError) as e:
        if not request.cuda_graphs:
            raise
        raise TrainError(f"--cuda-graphs: {e}") from None


def _resume(trainer: TrainerBase, loader: TrainPairLoader, state: dict) -> None:
    if state.get("engine", "reference") != trainer.engine:
        print(f"note: {state['_path']} was written by the {state.get('engine', 'reference')} engine; "
              f"continuing with the {trainer.engine} engine (--engine)", file=sys.stderr)
    trainer.load_state_dict(state, state["_path"])
    if "data" in state:
        loader.load_state(state["data"])
    else:
        warnings.warn(f"{state['_path']}: no data-pipeline position saved; starting a new epoch")
    print(f"resumed from {state['_path']} at iteration {trainer.iteration}", file=sys.stderr)


@dataclass
class _Run:
    """One training run's trainer, data and output places."""
    trainer: TrainerBase
    loader: TrainPairLoader
    config: dict
    checkpoint_dir: str
    image_dir: str
    test_images: dict
    hooks: object
    writer: bool
    keep_last: int
    monitor: TrainMonitor | None = None  # run log and evaluation: the writer process only

    def next_batch(self):
        x_a, x_b = self.loader.next_batch()
        return (dp.shard(x_a, self.hooks), dp.shard(x_b, self.hooks)) if self.hooks is not None else (x_a, x_b)

    def save_official(self) -> None:
        if self.writer:
            self.trainer.save_official(self.checkpoint_dir)

    def save_full(self) -> None:
        if self.writer:
            save_full_state(self.trainer, self.loader, self.checkpoint_dir, self.keep_last,
                            self.monitor.state() if self.monitor else None)

    def save_images(self) -> None:
        if self.writer:
            path = os.path.join(self.image_dir, f"test_{self.trainer.iteration + 1:08d}.png")
            save_contact_sheet(self.trainer, self.test_images, path)
            if self.monitor:
                self.monitor.image(self.trainer.iteration, path)


def _prepare(request: TrainRequest, ctx) -> _Run:
    device = str(ctx.device) if ctx else (request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hooks = ctx.hooks if ctx else None
    out = os.fspath(request.out)
    checkpoint_dir, image_dir = os.path.join(out, "checkpoints"), os.path.join(out, "images")
    if request.iters is not None and request.iters < 1:
        raise TrainError(f"--iters {request.iters}: must be at least 1")
    if request.keep_last < 0:
        raise TrainError(f"--keep-last {request.keep_last}: must not be negative (0 keeps every snapshot)")
    if not request.resume and ckpt.latest_full_state_path(checkpoint_dir) is not None:
        raise TrainError(f"{out} already holds a training run ({checkpoint_dir}): pass --resume to continue it, "
                         "or choose another --out")
    config, state = _resolve_config(request, checkpoint_dir)
    notice = official_keys_notice(config, request.config or "the resumed run's config")
    if notice and dp.is_writer(hooks):
        print(notice, file=sys.stderr)
    seed = request.seed if request.seed is not None else config["random_seed"]
    if state is not None:
        seed = int(state.get("seed", seed))
    seed_everything(seed)
    world = ctx.world if ctx else 1
    # config batch_size is per process; the loader yields the global batch and each rank keeps its slice
    loader = TrainPairLoader(config["data_root"], dict(config, batch_size=config["batch_size"] * world), seed)
    trainer = _build_trainer(request, config, device, seed, hooks)
    if state is not None:
        _resume(trainer, loader, state)
    writer = dp.is_writer(hooks)
    if writer:
        for folder in (out, checkpoint_dir, image_dir):
            report_stale_temp_files(folder)
        os.makedirs(checkpoint_dir, exist_ok=True)
        write_config(config, os.path.join(out, "config.yaml"))
    test_images = {d: load_test_images(config["data_root"], "A" if d == "a2b" else "B", config["new_size"],
                                       config["display_size"]) for d in trainer.directions}
    # --- run log and evaluation: the writer process only
    monitor = TrainMonitor(out, trainer, config, images_per_iter=config["batch_size"] * world,
                           eval_every=request.eval_every, inception_weights=request.inception_weights,
                           eval_images=request.eval_images, state=state) if writer else None
    return _Run(trainer, loader, config, checkpoint_dir, image_dir, test_images, hooks, writer, request.keep_last,
                monitor)


def _train_on(request: TrainRequest, ctx) -> int:
    run = _prepare(request, ctx)
    trainer, config = run.trainer, run.config
    target = request.iters if request.iters is not None else config["max_iter"] + 1
    start_iter = trainer.iteration
    with StopRequest() as stop:
        saved_at, losses = _iterate(run, target, stop)
        # Only at an iteration boundary: a second Ctrl-C mid-iteration leaves the last checkpoint as is.
        if trainer.iteration != start_iter and saved_at != trainer.iteration:
            check_finite_losses(losses, trainer.iteration)
            run.save_official()
            run.save_full()
            run.save_images()
        if run.monitor:
            run.monitor.close()
    if trainer.iteration != start_iter:
        print(f"saved iteration {trainer.iteration} to {run.checkpoint_dir}", file=sys.stderr)
    else:
        print(f"nothing to do: already at iteration {trainer.iteration} (--iters {target})", file=sys.stderr)
    return stop.exit_status if stop.requested and trainer.iteration < target else 0


def _iterate(run: _Run, target: int, stop: StopRequest) -> tuple[int | None, dict | None]:
    """Iterations until ``target`` or a stop request; returns the iteration last saved in full (or None)
    and the last iteration's losses (None when none ran)."""
    trainer, config = run.trainer, run.config
    rel = max(config["dis"]["numberOf_dis_relative_iteration"], 1)
    saved_at, losses = None, None
    bar = tqdm(total=target, initial=min(trainer.iteration, target), unit="it", dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr, disable=not run.writer)
    shown_at = -math.inf
    try:
        while trainer.iteration < target and not stop.requested:
            for _ in range(rel - 1):  # official: extra D-only updates, each on its own batch
                trainer.dis_update(*(t.to(trainer.device) for t in run.next_batch()))
            losses = trainer.step(*run.next_batch(), update_lr=False)
            done = trainer.iteration
            if run.monitor:
                run.monitor.record_step(done, losses)  # keeps the loss tensors: no device read here
            snapshot = (done + 1) % config["snapshot_save_iter"] == 0
            if snapshot:
                check_finite_losses(losses, done)
            if (done + 1) % config["image_save_iter"] == 0:
                run.save_images()
            if snapshot:  # official order: save, then step the LR schedule
                run.save_official()
            trainer.update_learning_rate()
            if snapshot:
                run.save_full()
                saved_at = done
            now = time.perf_counter()
            # Reading losses syncs the GPU: at most about once a second, whatever log_iter says.
            if (done % config["log_iter"] == 0 and now - shown_at >= 1.0) or done == target:
                shown_at = now
                check_finite_losses(losses, done)
                rate = run.monitor.display(done) if run.monitor else 0.0  # the log's values are read here
                bar.set_postfix(summarise_losses(losses) | {"img/s": f"{rate:.2f}"}, refresh=False)
            if run.monitor and run.monitor.maybe_evaluate(done):
                bar.write(f"iteration {done}: FID " + ", ".join(
                    f"member {k} {v:.2f}" for k, v in sorted(run.monitor.record.latest["fid"].items())))
            bar.update(1)
    finally:
        bar.close()
        run.loader.close()
        if run.monitor:  # whatever stopped the loop (a NaN loss too), what was recorded reaches the log
            run.monitor.flush()
    return saved_at, losses


def save_full_state(trainer: TrainerBase, loader, checkpoint_dir: str, keep_last: int = DEFAULT_KEEP_LAST,
                    extra: dict | None = None) -> None:
    """state_<n>.pt with the data position (and ``extra``: the evaluation record), latest.txt pointing at it;
    then the snapshots of the newest ``keep_last`` iterations are kept
    (:func:`council_fast.retention.prune_snapshots`)."""
    path = ckpt.full_state_path(checkpoint_dir, trainer.iteration)
    ckpt.save_full_state(path, trainer.state_dict() | {"data": loader.state()} | (extra or {}))
    ckpt.write_latest(checkpoint_dir, path)
    prune_snapshots(checkpoint_dir, keep_last, trainer.size)


def save_contact_sheet(trainer: TrainerBase, test_images: dict, path: str) -> None:
    """One row per test image: the input, then each member's translation (display style r for row r)."""
    rows, row_labels = [], []
    for d, x in test_images.items():
        outs = trainer.sample(x, d)
        rows += [[x[r]] + [o[r] for o in outs] for r in range(x.size(0))]
        row_labels += [f"{d}: test{d[0].upper()} {r}\nstyle {r}" for r in range(x.size(0))]
    col_labels = ["input"] + [f"member {i}" for i in range(trainer.size)]
    save_labelled_sheet(rows, path, row_labels=row_labels, col_labels=col_labels)


def summarise_losses(losses: dict) -> dict:
    """Mean of each loss kind over members, for the progress bar."""
    groups: dict[str, list[float]] = {}
    for key, value in losses.items():
        parts = key.split("/")
        name = parts[1] if len(parts) == 3 else parts[0]
        groups.setdefault(name, []).append(float(value))
    return {k: f"{sum(v) / len(v):.3f}" for k, v in groups.items() if k in ("dis", "dis_council", "adv", "council")}


def write_config(config: dict, path: str) -> None:
    atomic_write_bytes(path, yaml.safe_dump(config, sort_keys=False).encode())

