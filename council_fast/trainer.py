"""Train a council: the published Council-GAN training step, exactly (reference engine, or the
fused engine that batches the council and computes the same step).

One iteration is the D update, the council-D update, then the G update (the official
trainer_council.py); the official code's quirks are kept where they change the
numbers (the b2a D loss is not multiplied by gan_w; the council-D loss divides by
numberOfCouncil_dis_relative_iteration even when fewer comparisons run; the G-side loss matching
factor is computed after appending the current losses). Every random choice comes from a
generator that is part of the saved state, so a resumed run continues bit for bit on the CPU (on a GPU,
non-deterministic cuDNN algorithms and atomics make it continue to rounding, not bit for bit).

Usage: council-fast train --config C --data D --out O [--resume] [--iters N]
       [--engine reference|fused] [--precision fp32|bf16] [--device cpu|cuda] [--seed S]
Files keep the official numbering: the official per-member files and sample images after N
iterations are named N + 1 (so `--iters 40` ends with b2a_gen_*_00000041.pt), while the full-state
checkpoint state_<N>.pt is named by the iterations it holds.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections import deque

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, load_config, official_keys_notice
from .fileio import DiskFullError, report_stale_temp_files
from .metrics import InceptionWeightsError
from .retention import DEFAULT_KEEP_LAST, prune_snapshots
from .threads import add_threads_argument, set_threads
from .reference import AdaINGen, MsImageDis, MsImageDisCouncil
from .train_monitor import TrainMonitor

__all__ = ["CouncilTrainer", "add_arguments", "run", "init_weights", "UNSUPPORTED_WEIGHTS"]

# Loss weights the reference trainer does not implement: non-zero is a clear error.
UNSUPPORTED_WEIGHTS = ("recon_x_w", "recon_s_w", "recon_c_w", "recon_x_cyc_w", "vgg_w")
KINDS = ("gen", "dis", "dis_council")
_HISTORIES = ("gan", "council", "focus", "focus_zero_one")


def init_weights(module: nn.Module, init_type: str) -> None:
    """The official weights_init: every Conv*/Linear* weight by ``init_type``, biases 0."""
    def init_one(m):
        name = type(m).__name__
        if (name.startswith("Conv") or name.startswith("Linear")) and hasattr(m, "weight"):
            if init_type == "gaussian":
                nn.init.normal_(m.weight.data, 0.0, 0.02)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight.data, gain=math.sqrt(2))
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(m.weight.data, gain=math.sqrt(2))
            elif init_type != "default":
                raise ValueError(f"unsupported init {init_type!r}")
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias.data, 0.0)
    module.apply(init_one)


def _gray(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The official do_Dis_only_gray view: channel sum / input dim, repeated over channels."""
    return torch.sum(x, 1).unsqueeze(1).repeat(1, dim, 1, 1) / dim


def _flip_on(council: dict, iteration: int) -> bool:
    """The official flipOnOff schedule: on for On iterations, off for Off (or the reverse)."""
    cycle = council["flipOnOff_On_iteration"] + council["flipOnOff_Off_iteration"]
    start_with = council["flipOnOff_start_with"]
    first = council["flipOnOff_On_iteration"] if start_with else council["flipOnOff_Off_iteration"]
    return start_with if iteration % cycle < first else not start_with


class CouncilTrainer:
    """N council members per direction: generators, discriminators, council discriminators."""

    engine = "reference"

    def __init__(self, config: dict, device: str | torch.device = "cpu", seed: int | None = None):
        self.config = config
        self.device = torch.device(device)
        self.seed = int(config["random_seed"] if seed is None else seed)
        self._check_supported(config)
        self.directions = [d for d in ckpt.DIRECTIONS if config[f"do_{d}"]]
        self.size = config["council"]["council_size"]
        self.do_dis_council = config["council_w"] != 0
        self.iteration = 0
        self.abs_beginning_end_w = float(config["abs_beginning_end"])
        torch.manual_seed(self.seed)
        self.nets = {d: {k: nn.ModuleList() for k in self._kinds()} for d in self.directions}
        self._build_networks()
        self._build_optimizers()
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(self.seed)
        self.choices = random.Random(self.seed)  # council pairs, random D / G picks, abs partners
        n = config["loss_matching_hist_size"]
        self.history = {d: {h: [deque([1.0] * n, maxlen=n) for _ in range(self.size)] for h in _HISTORIES}
                        for d in self.directions}
        display = torch.Generator().manual_seed(self.seed + 1)
        self.display_z = torch.randn(config["display_size"], config["gen"]["style_dim"], 1, 1,
                                     generator=display).to(self.device)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_supported(config: dict) -> None:
        for key in UNSUPPORTED_WEIGHTS:
            if config[key] != 0:
                raise NotImplementedError(f"config key {key!r} = {config[key]}: this loss is not implemented by "
                                          "council-fast's reference trainer (the shipped configs use 0)")
        if config["mask_total_w"] != 0 and not (config["focus_loss"]["mask_small_use_abs"]
                                                or config["focus_loss"]["mask_small_use_square"]):
            raise ConfigError("config key 'mask_total_w' is non-zero but neither 'focus_loss.mask_small_use_abs' "
                              "nor 'focus_loss.mask_small_use_square' is true")
        if config["gen"]["num_of_mask_dim_to_add"] < 1:
            raise NotImplementedError("config key 'gen.num_of_mask_dim_to_add' must be at least 1")

    def _kinds(self) -> tuple[str, ...]:
        return KINDS if self.do_dis_council else KINDS[:2]

    def _input_dim(self, direction: str) -> int:
        return self.config["input_dim_a"] if direction == "a2b" else self.config["input_dim_b"]

    def _build_networks(self) -> None:
        c = self.config
        for i in range(self.size):  # the official construction and init order
            for d in self.directions:
                dim = self._input_dim(d)
                nets = self.nets[d]
                nets["gen"].append(AdaINGen(dim, c["gen"]).to(self.device))
                nets["dis"].append(MsImageDis(dim, c["dis"]).to(self.device))
                if self.do_dis_council:
                    nets["dis_council"].append(MsImageDisCouncil(dim, c["dis"]).to(self.device))
        for i in range(self.size):
            for d in self.directions:
                init_weights(self.nets[d]["gen"][i], c["init"])
                init_weights(self.nets[d]["dis"][i], "gaussian")
                if self.do_dis_council:
                    init_weights(self.nets[d]["dis_council"][i], "gaussian")

    def _build_optimizers(self) -> None:
        c = self.config
        self.optimizers = []
        self.schedulers = []
        for i in range(self.size):
            opts, scheds = {}, {}
            for kind in self._kinds():
                params = [p for d in self.directions for p in self.nets[d][kind][i].parameters() if p.requires_grad]
                opts[kind] = torch.optim.Adam(params, lr=c["lr"], betas=(c["beta1"], c["beta2"]),
                                              weight_decay=c["weight_decay"])
                scheds[kind] = (torch.optim.lr_scheduler.StepLR(opts[kind], step_size=c["step_size"], gamma=c["gamma"])
                                if c["lr_policy"] == "step" else None)
            self.optimizers.append(opts)
            self.schedulers.append(scheds)

    def gen(self, direction: str, i: int) -> AdaINGen:
        return self.nets[direction]["gen"][i]

    def parameters(self, kind: str):
        """All parameters of one network kind (gen / dis / dis_council), every direction and member."""
        return [p for d in self.directions for net in self.nets[d].get(kind, []) for p in net.parameters()]

    def _randn(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.config["gen"]["style_dim"], 1, 1, generator=self.noise, device=self.device)

    @staticmethod
    def _source(direction: str, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return x_a if direction == "a2b" else x_b

    @staticmethod
    def _target(direction: str, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return x_b if direction == "a2b" else x_a

    # ------------------------------------------------------------------ the three updates

    def dis_update(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        """D_i learns real (target domain) vs G_i's translations; b2a's loss is not scaled by gan_w."""
        c = self.config
        gray = c["dis"]["do_Dis_only_gray"]
        for opts in self.optimizers:
            opts["dis"].zero_grad(set_to_none=True)
        noise = {}
        if "a2b" in self.directions:
            noise["a2b"] = self._randn(x_b.size(0))
        if "b2a" in self.directions:
            noise["b2a"] = self._randn(x_a.size(0))
        losses = {}
        for i in range(self.size):
            i_gen = self.choices.randrange(self.size) if c["dis"]["useRandomGen"] else i
            total = 0
            for d in self.directions:
                src, real = self._source(d, x_a, x_b), self._target(d, x_a, x_b)
                with torch.no_grad():
                    fake = self.gen(d, i_gen).translate(src, noise[d])
                if gray:
                    real, fake = _gray(real, self._input_dim(d)), _gray(fake, self._input_dim(d))
                loss = self.nets[d]["dis"][i].calc_dis_loss(fake, real)
                losses[f"{d}/dis/{i}"] = loss.detach()
                total = total + (c["gan_w"] * loss if d == "a2b" else loss)
            total.backward()
            self.optimizers[i]["dis"].step()
        return losses

    def council_dis_active(self) -> bool:
        c, council = self.config, self.config["council"]
        if self.size <= 1 or council["numberOfCouncil_dis_relative_iteration"] == 0 or not self.do_dis_council:
            return False
        # Official quirk: without flipOnOff the council-D runs only when flipOnOff_start_with is true.
        on = _flip_on(council, self.iteration) if council["flipOnOff"] else council["flipOnOff_start_with"]
        return on and c["council_w"] != 0 and self.iteration >= council["council_start_at_iter"]

    def dis_council_update(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        """D^_i learns G_i's outputs (fake) vs other members' lower-style outputs (real)."""
        if not self.council_dis_active():
            return {}
        c, council = self.config, self.config["council"]
        for opts in self.optimizers:
            opts["dis_council"].zero_grad(set_to_none=True)
        less_by = council["discriminetro_less_style_by"]
        noise = {}
        for d in ("b2a", "a2b"):  # official draw order
            if d in self.directions:
                noise[d] = self._randn((x_a if d == "b2a" else x_b).size(0))
        outputs, compare = {}, {}
        with torch.no_grad():
            for d in self.directions:
                src = self._source(d, x_a, x_b)
                outputs[d], compare[d] = [], []
                for i in range(self.size):
                    gen = self.gen(d, i)
                    content = gen.encode_content(src)
                    outputs[d].append(gen.decode(content, noise[d], src))
                    compare[d].append(gen.decode(content, noise[d] * less_by, src) if less_by != 0 else outputs[d][i])
        rel = council["numberOfCouncil_dis_relative_iteration"]
        losses = {}
        for i in range(self.size):
            others = [j for j in range(self.size) if j != i]
            pool = list(others)
            sums = {d: 0 for d in self.directions}
            for k in range(rel):
                if k == self.size:  # official: never more comparisons than members
                    break
                if not pool:
                    pool = list(others)
                j = self.choices.choice(pool)
                pool.remove(j)
                for d in self.directions:
                    src = self._source(d, x_a, x_b)
                    sums[d] = sums[d] + self.nets[d]["dis_council"][i].calc_dis_loss(outputs[d][i], compare[d][j], src)
            total = 0
            for d in self.directions:
                total = total + c["council_w"] * sums[d] / rel
                losses[f"{d}/dis_council/{i}"] = (sums[d] / rel).detach()
            total.backward()
            self.optimizers[i]["dis_council"].step()
        return losses

    def council_gen_active(self) -> bool:
        c, council = self.config, self.config["council"]
        on = _flip_on(council, self.iteration) if council["flipOnOff"] else True
        if self.iteration < council["council_start_at_iter"]:
            on = False
        return (c["council_w"] != 0 or c["council_abs_w"] != 0) and on and self.size > 1

    def _match(self, direction: str, name: str, i: int, value: torch.Tensor) -> float:
        """Append ``value`` to its history; return mean(gan history) / mean(that history)."""
        self.history[direction][name][i].append(float(value.detach()))
        return float(np.mean(self.history[direction]["gan"][i]) / np.mean(self.history[direction][name][i]))

    def _focus_losses(self, d: str, i: int, mask: torch.Tensor) -> tuple[torch.Tensor | float, dict]:
        """The official mask (focus) losses of one member and direction, weighted."""
        c, focus = self.config, self.config["focus_loss"]
        total, logs = 0, {}
        if c["mask_zero_or_one_w"] != 0:
            zero_one = torch.sum(1 / (torch.abs(mask - focus["mask_zero_or_one_center"])
                                      + focus["mask_zero_or_one_epsilon"])) / mask.numel()
            logs[f"{d}/mask_zero_one/{i}"] = zero_one.detach()
            if focus["do_w_loss_matching_focus"]:
                zero_one = zero_one * self._match(d, "focus_zero_one", i, zero_one)
            total = total + c["mask_zero_or_one_w"] * zero_one
        if c["mask_tv_w"] != 0:
            tv = (torch.sum(torch.abs(mask[:, :, 1:, :] - mask[:, :, :-1, :]))
                  + torch.sum(torch.abs(mask[:, :, :, 1:] - mask[:, :, :, :-1]))) / mask.numel()
            logs[f"{d}/mask_tv/{i}"] = tv.detach()
            total = total + c["mask_tv_w"] * tv
        if c["mask_total_w"] != 0:
            small = 0
            if focus["mask_small_use_abs"]:
                small = small + torch.abs(torch.sum(mask)) / mask.numel()
            if focus["mask_small_use_square"]:
                small = small + (torch.sum(mask) / mask.numel()) ** 2
            logs[f"{d}/mask_total/{i}"] = small.detach()
            if focus["do_w_loss_matching_focus"]:
                small = small * self._match(d, "focus", i, small)
            total = total + c["mask_total_w"] * small
        return total, logs

    def _abs_council_loss(self, y: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.config["council_abs_gray_scale"]:
            return torch.mean(torch.abs(torch.sum(y, 1) - torch.sum(other.detach(), 1)))
        return torch.mean(torch.abs(y - other.detach()))

    def gen_update(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        """G_i: gan_w * adversarial loss through D_i (+ council loss through D^_i, loss-matched)."""
        c = self.config
        it = self.iteration
        for opts in self.optimizers:
            opts["gen"].zero_grad(set_to_none=True)
        noise = {"b2a": self._randn(x_a.size(0)), "a2b": self._randn(x_b.size(0))}  # official: both drawn
        focus_on = it > c["focus_loss"]["focus_loss_start_at_iter"] and (c["mask_zero_or_one_w"] != 0
                                                                         or c["mask_total_w"] != 0)
        council_on = self.council_gen_active()
        # Random picks in the official order: every member's D first, then every council partner.
        dis_pick = [self.choices.randrange(self.size) if c["gen"]["useRandomDis"] else i
                    for i in range(self.size)] if c["gan_w"] != 0 else list(range(self.size))
        partner = [self.choices.choice([j for j in range(self.size) if j != i])
                   if council_on and c["council_abs_w"] != 0 else None for i in range(self.size)]
        outputs = {d: [] for d in self.directions}
        masks = {d: [] for d in self.directions}
        for i in range(self.size):
            for d in self.directions:
                src = self._source(d, x_a, x_b)
                gen = self.gen(d, i)
                outputs[d].append(gen.translate(src, noise[d]))
                masks[d].append(gen.dec.mask_s)
        losses = {}
        totals = []
        for i in range(self.size):
            total = 0
            if focus_on:
                for d in self.directions:
                    focus, logs = self._focus_losses(d, i, masks[d][i])
                    total = total + focus
                    losses.update(logs)
            if c["abs_beginning_end"] != 0 and self.abs_beginning_end_w > 0.005:
                # Official: the weight decays as abs_beginning_end * less_by ** iteration (floored), and the
                # check above sees the weight the previous member set.
                self.abs_beginning_end_w = max(c["abs_beginning_end"] * c["abs_beginning_end_less_by"] ** it,
                                               c["abs_beginning_end_minimume"])
                for d in self.directions:
                    total = total + self._beginning_end(d, i, outputs[d][i], self._source(d, x_a, x_b), losses)
            if c["gan_w"] != 0:
                for d in self.directions:
                    y = outputs[d][i]
                    if c["dis"]["do_Dis_only_gray"]:
                        y = _gray(y, self._input_dim(d))
                    adv = self.nets[d]["dis"][dis_pick[i]].calc_gen_loss(y)
                    losses[f"{d}/adv/{i}"] = adv.detach()
                    if c["do_w_loss_matching"]:
                        self.history[d]["gan"][i].append(float(adv.detach()))
                    total = total + c["gan_w"] * adv
            totals.append(total)
        for i in range(self.size):
            total = totals[i]
            if council_on:
                for d in self.directions:
                    total = total + self._council_loss(d, i, outputs[d], partner[i], x_a, x_b, losses)
            if not isinstance(total, torch.Tensor):  # every loss weight is 0 this iteration: nothing to learn
                continue
            losses[f"total/{i}"] = total.detach()
            total.backward()
            self.optimizers[i]["gen"].step()
        return losses

    def _beginning_end(self, d, i, y, src, losses) -> torch.Tensor:
        """Official abs_beginning_end: max(L1, L2) between translation and input, decaying weight."""
        l1, l2 = torch.mean(torch.abs(y - src)), torch.mean((y - src) ** 2)
        loss = l1 if l1 > l2 else l2
        losses[f"{d}/beginning_end/{i}"] = loss.detach()
        return self.abs_beginning_end_w * loss

    def _council_loss(self, d, i, outputs, partner, x_a, x_b, losses):
        c = self.config
        src = self._source(d, x_a, x_b)
        total = 0
        if self.do_dis_council:
            council = self.nets[d]["dis_council"][i].calc_gen_loss(outputs[i], src)
            losses[f"{d}/council/{i}"] = council.detach()
            if c["do_w_loss_matching"]:
                factor = self._match(d, "council", i, council)
                losses[f"{d}/match/{i}"] = factor
                council = council * factor
            total = total + council * c["council_w"]
        if c["council_abs_w"] != 0:
            # Each direction's own abs loss (the official code swaps a2b/b2a here, which adds 0 when only
            # one direction is trained).
            abs_loss = c["council_abs_w"] * self._abs_council_loss(outputs[i], outputs[partner])
            losses[f"{d}/council_abs/{i}"] = abs_loss.detach()
            total = total + abs_loss
        return total

    def update_learning_rate(self) -> None:
        with warnings.catch_warnings():
            # Council-D optimizers do not step before council_start_at_iter; their schedules still advance.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for scheds in self.schedulers:
                for s in scheds.values():
                    if s is not None:
                        s.step()

    def step(self, x_a: torch.Tensor, x_b: torch.Tensor, update_lr: bool = True, as_floats: bool = False) -> dict:
        """One full iteration: D, council-D, G updates; then the iteration count and the LR schedule."""
        losses = self._iteration(x_a.to(self.device), x_b.to(self.device))
        self.iteration += 1
        if update_lr:
            self.update_learning_rate()
        if as_floats:
            losses = {k: float(v) for k, v in losses.items()}
        return losses

    def _iteration(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        losses = self.dis_update(x_a, x_b)
        losses.update(self.dis_council_update(x_a, x_b))
        losses.update(self.gen_update(x_a, x_b))
        return losses

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, x: torch.Tensor, direction: str | None = None, z: torch.Tensor | None = None,
               members=None) -> list[torch.Tensor]:
        """Each member's translation of ``x`` (one style code per image; the fixed display codes by default)."""
        direction = direction or self.directions[-1]
        x = x.to(self.device)
        if z is None:
            reps = -(-x.size(0) // self.display_z.size(0))
            z = self.display_z.repeat(reps, 1, 1, 1)[:x.size(0)]
        members = range(self.size) if members is None else members
        return [self.gen(direction, i).translate(x, z.to(self.device)) for i in members]

    # ------------------------------------------------------------------ state

    def network_states(self) -> dict:
        return {d: {k: [net.state_dict() for net in self.nets[d][k]] for k in self._kinds()} for d in self.directions}

    def state_dict(self) -> dict:
        """Everything an exact resume needs (the data pipeline's position is added by the caller)."""
        rng = {"torch_cpu": torch.get_rng_state(), "python": _python_rng(random.getstate()),
               "numpy": _numpy_rng(np.random.get_state()), "noise": self.noise.get_state(),
               "choices": _python_rng(self.choices.getstate())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": self.config, "iteration": self.iteration, "engine": self.engine, "seed": self.seed,
            "networks": self.network_states(),
            "optimizers": [{k: o.state_dict() for k, o in opts.items()} for opts in self.optimizers],
            "schedulers": [{k: (s.state_dict() if s is not None else None) for k, s in sch.items()}
                           for sch in self.schedulers],
            "loss_history": {d: {h: [list(q) for q in qs] for h, qs in hs.items()} for d, hs in self.history.items()},
            "abs_beginning_end_w": self.abs_beginning_end_w,
            "rng": rng,
        }

    def _saved_networks(self, state: dict, source: str):
        """(direction, kind, member state dicts) of a full state, each checked to be all there."""
        missing = [d for d in self.directions if d not in state["networks"]]
        if missing:
            raise ckpt.CheckpointError(f"{source}: holds no networks for direction(s) {', '.join(missing)}")
        for d in self.directions:
            for kind in self._kinds():
                saved = state["networks"][d].get(kind)
                if saved is None or len(saved) != self.size:
                    raise ckpt.CheckpointError(f"{source}: expected {self.size} {d} {kind} state dicts, found "
                                               f"{0 if saved is None else len(saved)}")
                yield d, kind, saved

    def load_state_dict(self, state: dict, source: str = "<state>") -> None:
        for d, kind, saved in self._saved_networks(state, source):
            for i, sd in enumerate(saved):
                ckpt.check_state_dict(self.nets[d][kind][i], sd, f"{source} [{d} {kind} {i}]")
        for opts, saved in zip(self.optimizers, state["optimizers"]):
            for kind, opt in opts.items():
                opt.load_state_dict(copy.deepcopy(saved[kind]))  # no tensors shared with ``state``
        for scheds, saved in zip(self.schedulers, state["schedulers"]):
            for kind, s in scheds.items():
                if s is not None and saved.get(kind) is not None:
                    s.load_state_dict(saved[kind])
        n = self.config["loss_matching_hist_size"]
        for d, hs in state["loss_history"].items():
            for h, qs in hs.items():
                self.history[d][h] = [deque(map(float, q), maxlen=n) for q in qs]
        self.iteration = int(state["iteration"])
        self.abs_beginning_end_w = float(state.get("abs_beginning_end_w", self.config["abs_beginning_end"]))
        self._restore_rng(state["rng"], source)

    def _restore_rng(self, rng: dict, source: str) -> None:
        torch.set_rng_state(rng["torch_cpu"])
        random.setstate(_python_rng_back(rng["python"]))
        np.random.set_state(_numpy_rng_back(rng["numpy"]))
        try:
            self.noise.set_state(rng["noise"])
        except (RuntimeError, TypeError, ValueError):  # saved on another device type: cannot continue that stream
            warnings.warn(f"{source}: the style-noise generator state was saved on another device type; "
                          "reseeding it (the run continues, but not bit for bit)")
            self.noise.manual_seed(self.seed + self.iteration)
        self.choices.setstate(_python_rng_back(rng["choices"]))
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])

    def save_official(self, out_dir: str | os.PathLike) -> list[str]:
        """Official per-member files, named iteration + 1 as the official trainer names them."""
        optimizers = [{k: o.state_dict() for k, o in opts.items()} for opts in self.optimizers]
        return ckpt.save_official(out_dir, self.iteration + 1, self.network_states(), optimizers)


def _python_rng(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "state": list(internal), "gauss": gauss}


def _python_rng_back(d: dict):
    return (d["version"], tuple(int(v) for v in d["state"]), d["gauss"])


def _numpy_rng(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_rng_back(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


# ---------------------------------------------------------------------- the `train` command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config YAML (official format) or a packaged name: tiny, selfie2anime "
                                         "(optional with --resume: the checkpoint's config is used)")
    parser.add_argument("--data", help="data folder with trainA, trainB, testA, testB (overrides data_root)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints/ and images/ go here)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints' latest full state")
    parser.add_argument("--iters", type=int, help="train until this many iterations are done (default: the config's "
                                                  "max_iter + 1, as the official loop runs iterations 0..max_iter)")
    parser.add_argument("--engine", choices=("reference", "fused"), default="reference",
                        help="reference: the official per-member loops; fused: the council as one batched "
                             "network (same step, same checkpoints). Default: %(default)s")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fused engine only: bf16 autocast with fp32 master weights. Default: %(default)s")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="fused engine on a GPU, one process: replay each iteration as a CUDA graph (the "
                             "first two of each kind, before and after council_start_at_iter, run eagerly)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's random_seed)")
    # --- run log and evaluation (council_fast.train_monitor)
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="every N iterations: FID/KID of each member on a fixed subset of the test images, "
                             "logged; the full state remembers each member's best iteration (needs "
                             "--inception-weights). Default: off")
    parser.add_argument("--inception-weights", metavar="F", help="the FID Inception weights file "
                        "pt_inception-2015-12-05-6726825d.pth (for --eval-every)")
    parser.add_argument("--eval-images", type=int, default=100, metavar="N",
                        help="test images per domain for --eval-every (default: %(default)s)")
    parser.add_argument("--keep-last", type=int, default=DEFAULT_KEEP_LAST, metavar="N",
                        help="keep the snapshot files (official per-member files, full states) of the newest N "
                             "snapshot iterations, delete older ones; 0 keeps all (default: %(default)s)")
    add_threads_argument(parser)


class _StopRequest:
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


def _fail(message: str) -> int:
    print(f"council-fast train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from .data import DataError
    set_threads(args.threads)
    try:
        return _train(args)
    except (ConfigError, ckpt.CheckpointError, DataError, NotImplementedError, InceptionWeightsError) as e:
        return _fail(str(e))
    except (DiskFullError, NonFiniteLoss) as e:  # ran, then failed: the last complete checkpoint stands
        print(f"council-fast train: error: {e}", file=sys.stderr)
        return 1


def _resolve_config(args, checkpoint_dir: str):
    state = None
    if args.resume:
        path = ckpt.latest_full_state_path(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
        if path is None:
            raise ckpt.CheckpointError(f"{checkpoint_dir}: nothing to resume (no state_<n>.pt or latest.txt)")
        state = ckpt.load_resume_state(path)
        config = state["config"]
        if args.config is not None and load_config(args.config) | {"data_root": None} != config | {"data_root": None}:
            print(f"note: --config {args.config} differs from the config saved in {path}; resuming with the "
                  "saved one (drop --config when resuming)", file=sys.stderr)
        state["_path"] = path
    elif args.config is None:
        raise ConfigError("--config is required (a YAML path, or a packaged name: tiny, selfie2anime)")
    else:
        config = load_config(args.config)
    if args.data is not None:
        config["data_root"] = args.data
    return config, state


def _train(args) -> int:
    from . import distributed as dp
    if args.precision != "fp32" and args.engine != "fused":
        return _fail("--precision bf16 needs --engine fused (the reference engine runs fp32)")
    if args.cuda_graphs and args.engine != "fused":
        return _fail("--cuda-graphs needs --engine fused")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available")
    if dp.launched_by_torchrun() and args.engine != "fused":
        return _fail("data-parallel training (torchrun) needs --engine fused")
    if args.eval_every < 0 or args.eval_images < 2:
        return _fail("--eval-every must be >= 0 and --eval-images >= 2")
    if args.eval_every and args.inception_weights is None:
        return _fail("--eval-every needs --inception-weights F (the FID Inception weights "
                     "pt_inception-2015-12-05-6726825d.pth; see the README)")
    ctx = dp.setup(args.device) if dp.launched_by_torchrun() else None
    try:
        return _train_on(args, ctx)
    finally:
        if ctx is not None:
            dp.shutdown()


def _train_on(args, ctx) -> int:
    from . import distributed as dp
    from .data import TrainPairLoader, load_test_images
    device = str(ctx.device) if ctx else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hooks = ctx.hooks if ctx else None
    writer = dp.is_writer(hooks)
    out = os.fspath(args.out)
    checkpoint_dir, image_dir = os.path.join(out, "checkpoints"), os.path.join(out, "images")
    if args.iters is not None and args.iters < 1:
        return _fail(f"--iters {args.iters}: must be at least 1")
    if args.keep_last < 0:
        return _fail(f"--keep-last {args.keep_last}: must not be negative (0 keeps every snapshot)")
    if not args.resume and ckpt.latest_full_state_path(checkpoint_dir) is not None:
        return _fail(f"{out} already holds a training run ({checkpoint_dir}): pass --resume to continue it, "
                     "or choose another --out")
    config, state = _resolve_config(args, checkpoint_dir)
    notice = official_keys_notice(config, args.config or "the resumed run's config")
    if notice and writer:
        print(notice, file=sys.stderr)
    seed = args.seed if args.seed is not None else config["random_seed"]
    if state is not None:
        seed = int(state.get("seed", seed))
    _seed_everything(seed)
    world = ctx.world if ctx else 1
    # config batch_size is per process; the loader yields the global batch and each rank keeps its slice
    loader = TrainPairLoader(config["data_root"], dict(config, batch_size=config["batch_size"] * world), seed)
    if args.engine == "fused":
        from .fused_trainer import FusedCouncilTrainer
        try:
            trainer = FusedCouncilTrainer(config, device, seed=seed, precision=args.precision, hooks=hooks,
                                          cuda_graphs=args.cuda_graphs)
        except (ValueError, NotImplementedError) as e:
            if not args.cuda_graphs:
                raise
            return _fail(f"--cuda-graphs: {e}")
    else:
        trainer = CouncilTrainer(config, device, seed=seed)
    if state is not None:
        if state.get("engine", "reference") != trainer.engine:
            print(f"note: {state['_path']} was written by the {state.get('engine', 'reference')} engine; "
                  f"continuing with the {trainer.engine} engine (--engine)", file=sys.stderr)
        trainer.load_state_dict(state, state["_path"])
        if "data" in state:
            loader.load_state(state["data"])
        else:
            warnings.warn(f"{state['_path']}: no data-pipeline position saved; starting a new epoch")
        print(f"resumed from {state['_path']} at iteration {trainer.iteration}", file=sys.stderr)
    if writer:
        for folder in (out, checkpoint_dir, image_dir):
            report_stale_temp_files(folder)
        os.makedirs(checkpoint_dir, exist_ok=True)
        _write_config(config, os.path.join(out, "config.yaml"))
    test_images = {d: load_test_images(config["data_root"], "A" if d == "a2b" else "B", config["new_size"],
                                       config["display_size"]) for d in trainer.directions}
    target = args.iters if args.iters is not None else config["max_iter"] + 1
    # --- run log and evaluation: the writer process only
    monitor = TrainMonitor(out, trainer, config, images_per_iter=config["batch_size"] * world,
                           eval_every=args.eval_every, inception_weights=args.inception_weights,
                           eval_images=args.eval_images, state=state) if writer else None

    def save_official():
        if writer:
            trainer.save_official(checkpoint_dir)

    def save_full():
        if writer:
            _save_full_state(trainer, loader, checkpoint_dir, args.keep_last, monitor.state())

    def save_images():
        if writer:
            path = os.path.join(image_dir, f"test_{trainer.iteration + 1:08d}.png")
            _save_contact_sheet(trainer, test_images, path)
            monitor.image(trainer.iteration, path)

    def next_batch():
        x_a, x_b = loader.next_batch()
        return (dp.shard(x_a, hooks), dp.shard(x_b, hooks)) if ctx else (x_a, x_b)

    from tqdm import tqdm
    rel = max(config["dis"]["numberOf_dis_relative_iteration"], 1)
    saved_at = None
    bar = tqdm(total=target, initial=min(trainer.iteration, target), unit="it", dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr, disable=not writer)
    start_iter = trainer.iteration
    shown_at = -math.inf
    with _StopRequest() as stop:
        try:
            while trainer.iteration < target and not stop.requested:
                for _ in range(rel - 1):  # official: extra D-only updates, each on its own batch
                    trainer.dis_update(*(t.to(trainer.device) for t in next_batch()))
                x_a, x_b = next_batch()
                losses = trainer.step(x_a, x_b, update_lr=False)
                done = trainer.iteration
                if monitor:
                    monitor.record_step(done, losses)  # keeps the loss tensors: no device read here
                snapshot = (done + 1) % config["snapshot_save_iter"] == 0
                if snapshot:
                    check_finite_losses(losses, done)
                if (done + 1) % config["image_save_iter"] == 0:
                    save_images()
                if snapshot:  # official order: save, then step the LR schedule
                    save_official()
                trainer.update_learning_rate()
                if snapshot:
                    save_full()
                    saved_at = done
                now = time.perf_counter()
                # Reading losses syncs the GPU: at most about once a second, whatever log_iter says.
                if (done % config["log_iter"] == 0 and now - shown_at >= 1.0) or done == target:
                    shown_at = now
                    check_finite_losses(losses, done)
                    rate = monitor.display(done) if monitor else 0.0  # the log's values are read here
                    bar.set_postfix(_summary(losses) | {"img/s": f"{rate:.2f}"}, refresh=False)
                if monitor and monitor.maybe_evaluate(done):
                    bar.write(f"iteration {done}: FID " + ", ".join(
                        f"member {k} {v:.2f}" for k, v in sorted(monitor.record.latest["fid"].items())))
                bar.update(1)
        finally:
            bar.close()
            loader.close()
            if monitor:  # whatever stopped the loop (a NaN loss too), what was recorded reaches the log
                monitor.flush()
        # Only at an iteration boundary: a second Ctrl-C mid-iteration leaves the last checkpoint as is.
        if trainer.iteration != start_iter and saved_at != trainer.iteration:
            check_finite_losses(losses, trainer.iteration)
            save_official()
            save_full()
            save_images()
        if monitor:
            monitor.close()
    if trainer.iteration != start_iter:
        print(f"saved iteration {trainer.iteration} to {checkpoint_dir}", file=sys.stderr)
    else:
        print(f"nothing to do: already at iteration {trainer.iteration} (--iters {target})", file=sys.stderr)
    return stop.exit_status if stop.requested and trainer.iteration < target else 0


def _save_full_state(trainer: CouncilTrainer, loader, checkpoint_dir: str, keep_last: int,
                     extra: dict | None = None) -> None:
    """state_<n>.pt with the data position (and ``extra``: the evaluation record), latest.txt pointing at it;
    then the snapshots of the newest ``keep_last`` iterations are kept
    (:func:`council_fast.retention.prune_snapshots`)."""
    path = ckpt.full_state_path(checkpoint_dir, trainer.iteration)
    ckpt.save_full_state(path, trainer.state_dict() | {"data": loader.state()} | (extra or {}))
    ckpt.write_latest(checkpoint_dir, path)
    prune_snapshots(checkpoint_dir, keep_last, trainer.size)


def _save_contact_sheet(trainer: CouncilTrainer, test_images: dict, path: str) -> None:
    """One row per test image: the input, then each member's translation (display style r for row r)."""
    from .images import save_labelled_sheet
    rows, row_labels = [], []
    for d, x in test_images.items():
        outs = trainer.sample(x, d)
        rows += [[x[r]] + [o[r] for o in outs] for r in range(x.size(0))]
        row_labels += [f"{d}: test{d[0].upper()} {r}\nstyle {r}" for r in range(x.size(0))]
    col_labels = ["input"] + [f"member {i}" for i in range(trainer.size)]
    save_labelled_sheet(rows, path, row_labels=row_labels, col_labels=col_labels)


def _seed_everything(seed: int) -> None:
    """As the official train.py does; a resumed run then restores the saved states over these."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _summary(losses: dict) -> dict:
    """Mean of each loss kind over members, for the progress bar."""
    groups: dict[str, list[float]] = {}
    for key, value in losses.items():
        parts = key.split("/")
        name = parts[1] if len(parts) == 3 else parts[0]
        groups.setdefault(name, []).append(float(value))
    return {k: f"{sum(v) / len(v):.3f}" for k, v in groups.items() if k in ("dis", "dis_council", "adv", "council")}


def _write_config(config: dict, path: str) -> None:
    import yaml
    from .fileio import atomic_write_bytes
    atomic_write_bytes(path, yaml.safe_dump(config, sort_keys=False).encode())
