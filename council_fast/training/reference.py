"""The reference training engine: the published Council-GAN training step, member by member.

One iteration is the D update, the council-D update, then the G update (the official
trainer_council.py); the official code's quirks are kept where they change the numbers (the b2a D
loss is not multiplied by gan_w; the council-D loss divides by
numberOfCouncil_dis_relative_iteration even when fewer comparisons run; the G-side loss matching
factor is computed after appending the current losses). Every random choice comes from a generator
that is part of the saved state, so a resumed run continues bit for bit on the CPU (on a GPU,
non-deterministic cuDNN algorithms and atomics make it continue to rounding, not bit for bit).
It honours every config switch the official trainer does (flipOnOff, useRandomDis/Gen, focus and
abs losses, do_Dis_only_gray).
"""
from __future__ import annotations

import copy
from collections import deque

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..reference import AdaINGen, MsImageDis, MsImageDisCouncil
from .common import HISTORIES, TrainerBase, init_weights, make_adam, make_scheduler, step_schedulers
from .common import gray as _gray

__all__ = ["CouncilTrainer"]


class CouncilTrainer(TrainerBase):
    """N council members per direction: generators, discriminators, council discriminators."""

    engine = "reference"

    def __init__(self, config: dict, device: str | torch.device = "cpu", seed: int | None = None):
        super().__init__(config, device, seed)
        self.nets = {d: {k: nn.ModuleList() for k in self._kinds()} for d in self.directions}
        self._build_networks()
        self._build_optimizers()
        self._start_streams()
        n = config["loss_matching_hist_size"]
        self.history = {d: {h: [deque([1.0] * n, maxlen=n) for _ in range(self.size)] for h in HISTORIES}
                        for d in self.directions}

    # ------------------------------------------------------------------ construction

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
        self.optimizers, self.schedulers = [], []
        for i in range(self.size):
            opts = {kind: make_adam([p for d in self.directions for p in self.nets[d][kind][i].parameters()
                                     if p.requires_grad], self.config) for kind in self._kinds()}
            self.optimizers.append(opts)
            self.schedulers.append({kind: make_scheduler(opt, self.config) for kind, opt in opts.items()})

    def gen(self, direction: str, i: int) -> AdaINGen:
        return self.nets[direction]["gen"][i]

    def parameters(self, kind: str):
        """All parameters of one network kind (gen / dis / dis_council), every direction and member."""
        return [p for d in self.directions for net in self.nets[d].get(kind, []) for p in net.parameters()]

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
        step_schedulers(s for scheds in self.schedulers for s in scheds.values())

    def _iteration(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        losses = self.dis_update(x_a, x_b)
        losses.update(self.dis_council_update(x_a, x_b))
        losses.update(self.gen_update(x_a, x_b))
        return losses

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def _translate_members(self, direction, x, z, members):
        return [self.gen(direction, i).translate(x, z) for i in members]

    # ------------------------------------------------------------------ state

    def network_states(self) -> dict:
        return {d: {k: [net.state_dict() for net in self.nets[d][k]] for k in self._kinds()} for d in self.directions}

    def member_optimizer_states(self) -> list[dict]:
        return [{k: o.state_dict() for k, o in opts.items()} for opts in self.optimizers]

    def state_dict(self) -> dict:
        """Everything an exact resume needs (the data pipeline's position is added by the caller)."""
        schedulers = [{k: (s.state_dict() if s is not None else None) for k, s in sch.items()}
                      for sch in self.schedulers]
        history = {d: {h: [list(q) for q in qs] for h, qs in hs.items()} for d, hs in self.history.items()}
        return self._full_state(schedulers, history)

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
        self._load_counters(state, source)
