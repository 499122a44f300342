"""The fused training engine: the reference iteration with the council batched.

``FusedCouncilTrainer`` has the public interface of :class:`~council_fast.trainer.CouncilTrainer`
and computes the same iteration (same z draws from the same generator, same council pairs from the
same ``random.Random``), but

- the N generators, the N discriminators and the N council discriminators of a direction are
  three stacked networks (:mod:`council_fast.batched`): one grouped pass per update instead of N;
- the D update runs fakes and reals as one batch; the council-D update gathers every member's
  chosen partners on the device and runs all N x K comparisons in one pass, forward and backward;
- the loss-matching histories are device tensors, so an iteration never waits for the device;
- one Adam per network kind over the stacked tensors (Adam is elementwise, so that is N Adams);
- optional bf16 autocast (fp32 master weights and losses).

It reads and writes the reference engine's full-state checkpoint (per-member state dicts in the
official key layout, per-member optimizer states), so either engine resumes the other's run.
Config switches the fused step does not implement run on the reference step (one warning).
"""
from __future__ import annotations

import contextlib
import copy
import random
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint as ckpt
from .batched import (StackedAdaINGen, StackedMsImageDis, StackedMsImageDisCouncil, UnsupportedForFusion,
                      lsgan_dis_loss_per_member, lsgan_gen_loss_per_member)
from .reference import AdaINGen
from .trainer import CouncilTrainer, _numpy_rng, _python_rng

__all__ = ["FusedCouncilTrainer", "PRECISIONS", "unfused_switches", "DataParallelHooks", "IterationDraws"]

PRECISIONS = ("fp32", "bf16")
_OPTIMIZER_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def unfused_switches(config: dict) -> list[str]:
    """Config settings the fused step does not implement (each makes the engine use the reference step)."""
    c = config
    found = [f"{key} = {c[key]}" for key in ("council_abs_w", "mask_zero_or_one_w", "mask_total_w", "mask_tv_w",
                                               "abs_beginning_end") if c[key] != 0]
    if c["gan_w"] == 0:
        found.append("gan_w = 0")
    for section, key in (("council", "flipOnOff"), ("gen", "useRandomDis"), ("dis", "useRandomGen"),
                         ("dis", "do_Dis_only_gray")):
        if c[section][key]:
            found.append(f"{section}.{key} = true")
    if c["dis"]["gan_type"] != "lsgan":
        found.append(f"dis.gan_type = {c['dis']['gan_type']}")
    if c["dis"]["norm"] != "none":
        found.append(f"dis.norm = {c['dis']['norm']}")
    return found


class DataParallelHooks:
    """What data-parallel training changes in an iteration (identity for a single process).

    ``world``/``rank``: this process's place; ``mean(t)``: the mean of ``t`` over processes;
    ``average_gradients(params)``: every parameter's gradient averaged over processes.
    """

    world = 1
    rank = 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def average_gradients(self, params) -> None:
        return None


@dataclass
class IterationDraws:
    """The random inputs of one iteration: the z of each update and the council partners.

    Drawn on the host side before any update runs, in the reference engine's order (the draws depend
    only on the noise generator and the pair chooser, not on the updates), so the updates themselves
    never draw: that is what lets a CUDA graph replay them with these as static inputs.
    """
    dis: dict[str, torch.Tensor]
    gen: dict[str, torch.Tensor]
    council: dict[str, torch.Tensor] = field(default_factory=dict)  # empty: no council-D update
    pairs: torch.Tensor | None = None  # (K, N) partner indices on the device

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {f"{stage}/{d}": z for stage in ("dis", "council", "gen") for d, z in getattr(self, stage).items()}
        if self.pairs is not None:
            named["pairs"] = self.pairs
        return named

    def map(self, fn) -> "IterationDraws":
        """The same draws with ``fn`` applied to every tensor (``torch.clone``: static buffers)."""
        return IterationDraws({d: fn(z) for d, z in self.dis.items()}, {d: fn(z) for d, z in self.gen.items()},
                              {d: fn(z) for d, z in self.council.items()},
                              None if self.pairs is None else fn(self.pairs))

    def copy_from(self, other: "IterationDraws") -> None:
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"iteration draws differ: {sorted(mine)} vs {sorted(theirs)}")
        for name, t in mine.items():
            t.copy_(theirs[name], non_blocking=True)


class FusedCouncilTrainer(CouncilTrainer):
    """Same interface and iteration as CouncilTrainer; the council batched (see the module doc)."""

    engine = "fused"

    def __init__(self, config: dict, device: str | torch.device = "cpu", seed: int | None = None,
                 precision: str = "fp32", hooks: DataParallelHooks | None = None, cuda_graphs: bool = False,
                 graph_capturer=None, strict: bool | None = None):
        """``cuda_graphs``: replay each iteration as a CUDA graph (:mod:`council_fast.train_graphs`; one
        process only). ``graph_capturer`` replaces the CUDA-graph capturer (tests emulate it on the CPU)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            if hooks is not None and type(hooks) is not DataParallelHooks:  # torchrun, even with one process
                raise NotImplementedError("CUDA graphs of the training step run in one process only (the gradient "
                                          "all-reduce is not captured); drop --cuda-graphs under torchrun")
            if torch.device(device).type != "cuda" and graph_capturer is None:
                raise ValueError(f"CUDA graphs need a CUDA device, got {device!r}")
        # The reference constructor draws the initial weights, seeds the noise generator and the pair
        # chooser, and makes the display codes: identical to the reference engine by construction.
        super().__init__(config, device, seed)
        self.precision = precision
        self.hooks = hooks or DataParallelHooks()
        reasons = unfused_switches(config)
        if not reasons:
            try:
                self._build_stacked()
            except UnsupportedForFusion as e:
                reasons = [str(e)]
        self.fallback = reasons
        self.graphs = None
        if reasons:
            for what, wanted in (("data-parallel training", self.hooks.world != 1), ("CUDA graphs", self.cuda_graphs)):
                if wanted:
                    raise NotImplementedError(f"{what} needs the fused step; this config falls back to the "
                                              "reference step: " + "; ".join(reasons))
            warnings.warn("fused engine: running the reference training step because the fused step does not "
                          "implement: " + "; ".join(reasons), stacklevel=2)
            return
        self._foreign_history = {d: {h: [list(q) for q in qs] for h, qs in hs.items() if h not in ("gan", "council")}
                                 for d, hs in self.history.items()}
        self.history = None
        self.nets = None  # the per-member networks live on only as the stacked ones
        self.optimizers = None
        self.schedulers = None
        if self.cuda_graphs:
            from .train_graphs import GraphedTrainStep
            self.graphs = GraphedTrainStep(self, capturer=graph_capturer, strict=strict)

    # ------------------------------------------------------------------ construction

    def _build_stacked(self) -> None:
        c, n = self.config, self.size
        self.stacked = {}
        for d in self.directions:
            dim = self._input_dim(d)
            nets = {"gen": StackedAdaINGen(dim, c["gen"], n), "dis": StackedMsImageDis(dim, c["dis"], n)}
            if self.do_dis_council:
                nets["dis_council"] = StackedMsImageDisCouncil(dim, c["dis"], n)
            for kind, net in nets.items():
                net.to(self.device)
                net.load_members([m.state_dict() for m in self.nets[d][kind]], f"{d} {kind}")
            self.stacked[d] = nets
        self.stacked_optimizers, self.stacked_schedulers = {}, {}
        for kind in self._kinds():
            params = [p for d in self.directions for p in self.stacked[d][kind].stacked_parameters()]
            opt = torch.optim.Adam(params, lr=c["lr"], betas=(c["beta1"], c["beta2"]), weight_decay=c["weight_decay"],
                                   **self._adam_flags())
            self.stacked_optimizers[kind] = opt
            self.stacked_schedulers[kind] = (torch.optim.lr_scheduler.StepLR(opt, step_size=c["step_size"],
                                                                             gamma=c["gamma"])
                                             if c["lr_policy"] == "step" else None)
        hist = c["loss_matching_hist_size"]
        self.match_history = {d: {h: torch.ones(n, hist, dtype=torch.float64, device=self.device)
                                  for h in ("gan", "council")} for d in self.directions}

    def _adam_flags(self) -> dict:
        flags = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        if self.cuda_graphs:  # step counts and bias corrections on the device, lr may be a tensor
            flags["capturable"] = True
        return flags

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        if self.precision == "bf16":  # no cast cache under graphs: its tensors would outlive the capture
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)
        return contextlib.nullcontext()

    def _randn(self, batch: int) -> torch.Tensor:
        """This process's slice of the z the whole (all-process) batch draws."""
        world, rank = self.hooks.world, self.hooks.rank
        z = super()._randn(batch * world)
        return z[rank * batch:(rank + 1) * batch] if world > 1 else z

    def _step_optimizer(self, kind: str) -> None:
        opt = self.stacked_optimizers[kind]
        self.hooks.average_gradients([p for g in opt.param_groups for p in g["params"]])
        opt.step()

    def _push(self, direction: str, name: str, values: torch.Tensor) -> None:
        hist = self.match_history[direction][name]
        hist.copy_(torch.cat((hist[:, 1:], values.detach().to(hist.dtype).unsqueeze(1)), dim=1))

    @staticmethod
    def _per_member(losses: dict, template: str, values: torch.Tensor) -> None:
        values = values.detach()
        for i in range(values.shape[0]):
            losses[template.format(i=i)] = values[i]

    def _pair_index(self, pairs: list[list[int]]) -> torch.Tensor:
        """(K, N) partner indices on the device, copied without waiting for the device."""
        index = torch.tensor(pairs, dtype=torch.long).t().contiguous()
        if self.device.type == "cuda":
            return index.pin_memory().to(self.device, non_blocking=True)
        return index.to(self.device)

    # ------------------------------------------------------------------ random inputs (reference order)

    def _dis_noise(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        noise = {}
        if "a2b" in self.directions:
            noise["a2b"] = self._randn(x_b.size(0))
        if "b2a" in self.directions:
            noise["b2a"] = self._randn(x_a.size(0))
        return noise

    def _council_noise(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        return {d: self._randn((x_a if d == "b2a" else x_b).size(0))
                for d in ("b2a", "a2b") if d in self.directions}  # official draw order

    def _gen_noise(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        return {"b2a": self._randn(x_a.size(0)), "a2b": self._randn(x_b.size(0))}  # official: both drawn

    def draw_iteration(self, x_a: torch.Tensor, x_b: torch.Tensor) -> IterationDraws:
        """Every random input of the next :meth:`step`, drawn as that step would draw them."""
        draws = IterationDraws(dis=self._dis_noise(x_a, x_b), gen={})
        if self.council_dis_active():
            draws.council = self._council_noise(x_a, x_b)
            draws.pairs = self._pair_index(self._council_pairs())
        draws.gen = self._gen_noise(x_a, x_b)
        return draws

    def run_updates(self, x_a: torch.Tensor, x_b: torch.Tensor, draws: IterationDraws) -> dict:
        """The D, council-D and G updates of one iteration with the given random inputs."""
        losses = self.dis_update(x_a, x_b, noise=draws.dis)
        if draws.pairs is not None:
            losses.update(self.dis_council_update(x_a, x_b, noise=draws.council, index=draws.pairs))
        losses.update(self.gen_update(x_a, x_b, noise=draws.gen))
        return losses

    def _iteration(self, x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
        if self.fallback:
            return super()._iteration(x_a, x_b)
        if self.graphs is not None:
            return self.graphs.run(x_a, x_b)
        return self.run_updates(x_a, x_b, self.draw_iteration(x_a, x_b))

    # ------------------------------------------------------------------ the three updates

    def dis_update(self, x_a: torch.Tensor, x_b: torch.Tensor, noise: dict | None = None) -> dict:
        if self.fallback:
            return super().dis_update(x_a, x_b)
        c = self.config
        self.stacked_optimizers["dis"].zero_grad(set_to_none=True)
        if noise is None:
            noise = self._dis_noise(x_a, x_b)
        losses, total = {}, 0
        for d in self.directions:
            src, real = self._source(d, x_a, x_b), self._target(d, x_a, x_b)
            nets = self.stacked[d]
            with torch.no_grad(), self._autocast():
                fake = nets["gen"].translate(src, noise[d])
            batch = fake.shape[0]
            with self._autocast():
                both = torch.cat((fake.to(real.dtype), real.repeat(1, self.size, 1, 1)), dim=0)
                outs = [o.float() for o in nets["dis"](both)]
            loss = lsgan_dis_loss_per_member([o[:batch] for o in outs], [o[batch:] for o in outs])
            self._per_member(losses, f"{d}/dis/{{i}}", self.hooks.mean(loss.detach()))
            total = total + (c["gan_w"] * loss if d == "a2b" else loss).sum()
        total.backward()
        self._step_optimizer("dis")
        return losses

    def _council_pairs(self) -> list[list[int]]:
        """Every member's partners, drawn exactly as the reference draws them."""
        rel = self.config["council"]["numberOfCouncil_dis_relative_iteration"]
        pairs = []
        for i in range(self.size):
            others = [j for j in range(self.size) if j != i]
            pool, chosen = list(others), []
            for k in range(min(rel, self.size)):  # official: never more comparisons than members
                if not pool:
                    pool = list(others)
                j = self.choices.choice(pool)
                pool.remove(j)
                chosen.append(j)
            pairs.append(chosen)
        return pairs

    def dis_council_update(self, x_a: torch.Tensor, x_b: torch.Tensor, noise: dict | None = None,
                           index: torch.Tensor | None = None) -> dict:
        if self.fallback:
            return super().dis_council_update(x_a, x_b)
        if noise is None or index is None:  # drawn here when the caller did not draw them (reference order)
            if not self.council_dis_active():
                return {}
            noise = self._council_noise(x_a, x_b)
            index = self._pair_index(self._council_pairs())
        c, council = self.config, self.config["council"]
        self.stacked_optimizers["dis_council"].zero_grad(set_to_none=True)
        less_by = council["discriminetro_less_style_by"]
        outputs, compare = {}, {}
        with torch.no_grad(), self._autocast():
            for d in self.directions:
                src, gen = self._source(d, x_a, x_b), self.stacked[d]["gen"]
                content = gen.encode(src)
                if less_by != 0:  # both styles through the decoder as one batch
                    both = gen.decode(content.repeat(2, 1, 1, 1), torch.cat((noise[d], noise[d] * less_by)),
                                      src.repeat(2, 1, 1, 1))
                    outputs[d], compare[d] = both.chunk(2)
                else:
                    outputs[d] = compare[d] = gen.decode(content, noise[d], src)
        rel = council["numberOfCouncil_dis_relative_iteration"]
        losses, total = {}, 0
        for d in self.directions:
            src = self._source(d, x_a, x_b)
            loss = self._council_dis_loss(d, outputs[d], compare[d], src, index)
            self._per_member(losses, f"{d}/dis_council/{{i}}", self.hooks.mean(loss.detach()) / rel)
            total = total + (c["council_w"] * loss / rel).sum()
        total.backward()
        self._step_optimizer("dis_council")
        return losses

    def _council_dis_loss(self, d: str, fake: torch.Tensor, compare: torch.Tensor, src: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
        """(N,) sum over member i's K comparisons of D^_i's loss: fake (y_i, src) vs real (y_less_j, src)."""
        b, n = fake.shape[0], self.size
        k = index.shape[0]
        per_member = compare.view(b, n, -1, *compare.shape[2:])
        reals = per_member[:, index.reshape(-1)]  # (B, K*N, C, H, W): comparison k of member i at k*N + i
        reals = reals.view(b, k, n, *per_member.shape[2:]).transpose(0, 1).reshape(k * b, -1, *compare.shape[2:])
        images = torch.cat((fake, reals.to(fake.dtype)), dim=0)
        with self._autocast():
            outs = [o.float() for o in self.stacked[d]["dis_council"](images, src.repeat(k + 1, 1, 1, 1))]
        total = 0
        for kk in range(k):
            real_outs = [o[(kk + 1) * b:(kk + 2) * b] for o in outs]
            total = total + lsgan_dis_loss_per_member([o[:b] for o in outs], real_outs)
        return total

    def gen_update(self, x_a: torch.Tensor, x_b: torch.Tensor, noise: dict | None = None) -> dict:
        if self.fallback:
            return super().gen_update(x_a, x_b)
        c = self.config
        self.stacked_optimizers["gen"].zero_grad(set_to_none=True)
        if noise is None:
            noise = self._gen_noise(x_a, x_b)
        council_on = self.council_gen_active() and self.do_dis_council
        losses, total = {}, 0
        for d in self.directions:
            src, nets = self._source(d, x_a, x_b), self.stacked[d]
            with self._autocast():
                y = nets["gen"].translate(src, noise[d])
                adv_outs = [o.float() for o in nets["dis"](y)]
            adv = lsgan_gen_loss_per_member(adv_outs)
            adv_global = self.hooks.mean(adv.detach())
            self._per_member(losses, f"{d}/adv/{{i}}", adv_global)
            if c["do_w_loss_matching"]:
                self._push(d, "gan", adv_global)
            total = total + c["gan_w"] * adv
            if council_on:
                with self._autocast():
                    council_outs = [o.float() for o in nets["dis_council"](y, src)]
                council = lsgan_gen_loss_per_member(council_outs)
                council_global = self.hooks.mean(council.detach())
                self._per_member(losses, f"{d}/council/{{i}}", council_global)
                if c["do_w_loss_matching"]:
                    self._push(d, "council", council_global)
                    hist = self.match_history[d]
                    factor = (hist["gan"].mean(1) / hist["council"].mean(1)).to(council.dtype)
                    self._per_member(losses, f"{d}/match/{{i}}", factor)
                    council = council * factor
                total = total + council * c["council_w"]
        self._per_member(losses, "total/{i}", self.hooks.mean(total.detach()))
        total.sum().backward(inputs=self._gen_training_parameters())
        self._step_optimizer("gen")
        return losses

    def _gen_training_parameters(self) -> list[torch.nn.Parameter]:
        return [p for d in self.directions for p in self.stacked[d]["gen"].training_parameters()]

    def update_learning_rate(self) -> None:
        if self.fallback:
            return super().update_learning_rate()
        with warnings.catch_warnings():
            # The council-D optimizer does not step before council_start_at_iter (as in the reference).
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            for s in self.stacked_schedulers.values():
                if s is not None:
                    s.step()

    # ------------------------------------------------------------------ networks and sampling

    def gen(self, direction: str, i: int) -> AdaINGen:
        """Member ``i``'s generator as a reference module (a copy of the stacked weights in fused mode)."""
        if self.fallback:
            return super().gen(direction, i)
        net = AdaINGen(self._input_dim(direction), self.config["gen"]).to(self.device)
        net.load_state_dict(self.stacked[direction]["gen"].member_state_dict(i))
        return net

    def parameters(self, kind: str):
        if self.fallback:
            return super().parameters(kind)
        return [p for d in self.directions if kind in self.stacked[d] for p in self.stacked[d][kind].parameters()]

    @torch.no_grad()
    def sample(self, x: torch.Tensor, direction: str | None = None, z: torch.Tensor | None = None,
               members=None) -> list[torch.Tensor]:
        if self.fallback:
            return super().sample(x, direction, z, members)
        direction = direction or self.directions[-1]
        x = x.to(self.device)
        if z is None:
            reps = -(-x.size(0) // self.display_z.size(0))
            z = self.display_z.repeat(reps, 1, 1, 1)[:x.size(0)]
        members = range(self.size) if members is None else members
        out = self.stacked[direction]["gen"].translate(x, z.to(self.device))
        per_member = out.view(out.shape[0], self.size, -1, *out.shape[2:])
        return [per_member[:, i] for i in members]

    # ------------------------------------------------------------------ state (the reference layout)

    def network_states(self) -> dict:
        if self.fallback:
            return super().network_states()
        return {d: {k: self.stacked[d][k].member_state_dicts() for k in self._kinds()} for d in self.directions}

    def _member_optimizer_states(self) -> list[dict]:
        return [{kind: _member_optimizer_state(opt, i) for kind, opt in self.stacked_optimizers.items()}
                for i in range(self.size)]

    def state_dict(self) -> dict:
        if self.fallback:
            return super().state_dict() | {"engine": self.engine}
        rng = {"torch_cpu": torch.get_rng_state(), "python": _python_rng(random.getstate()),
               "numpy": _numpy_rng(np.random.get_state()), "noise": self.noise.get_state(),
               "choices": _python_rng(self.choices.getstate())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        history = {}
        for d in self.directions:
            history[d] = {h: [list(map(float, row)) for row in self.match_history[d][h].tolist()]
                          for h in ("gan", "council")}
            history[d].update(copy.deepcopy(self._foreign_history.get(d, {})))
        schedulers = {k: (s.state_dict() if s is not None else None) for k, s in self.stacked_schedulers.items()}
        return {
            "config": self.config, "iteration": self.iteration, "engine": self.engine, "seed": self.seed,
            "networks": self.network_states(),
            "optimizers": self._member_optimizer_states(),
            "schedulers": [copy.deepcopy(schedulers) for _ in range(self.size)],
            "loss_history": history,
            "abs_beginning_end_w": self.abs_beginning_end_w,
            "rng": rng,
        }

    def load_state_dict(self, state: dict, source: str = "<state>") -> None:
        if self.fallback:
            return super().load_state_dict(state, source)
        if self.graphs is not None:  # the optimizer states are about to be new tensors
            self.graphs.reset()
        for d, kind, saved in self._saved_networks(state, source):
            try:
                self.stacked[d][kind].load_members(saved, f"{source} [{d} {kind}]")
            except ValueError as e:
                raise ckpt.CheckpointError(str(e)) from None
        if len(state["optimizers"]) != self.size:
            raise ckpt.CheckpointError(f"{source}: {len(state['optimizers'])} optimizer states for {self.size} members")
        for kind, opt in self.stacked_optimizers.items():
            members = [saved[kind] for saved in state["optimizers"]]
            opt.load_state_dict(_stack_optimizer_states(members, opt, f"{source} [{kind} optimizer]"))
        for kind, s in self.stacked_schedulers.items():
            saved = state["schedulers"][0].get(kind) if state["schedulers"] else None
            if s is not None and saved is not None:
                s.load_state_dict(saved)
        n = self.config["loss_matching_hist_size"]
        for d, hs in state["loss_history"].items():
            if d not in self.match_history:
                continue
            for h, qs in hs.items():
                if h in self.match_history[d]:
                    values = torch.tensor([[float(v) for v in q] for q in qs], dtype=torch.float64)
                    if tuple(values.shape) != (self.size, n):
                        raise ckpt.CheckpointError(f"{source}: loss history {d}/{h} has shape {tuple(values.shape)}, "
                                                   f"expected {(self.size, n)}")
                    self.match_history[d][h].copy_(values)
                else:
                    self._foreign_history.setdefault(d, {})[h] = [list(map(float, q)) for q in qs]
        self.iteration = int(state["iteration"])
        self.abs_beginning_end_w = float(state.get("abs_beginning_end_w", self.config["abs_beginning_end"]))
        self._restore_rng(state["rng"], source)

    def save_official(self, out_dir) -> list[str]:
        if self.fallback:
            return super().save_official(out_dir)
        return ckpt.save_official(out_dir, self.iteration + 1, self.network_states(), self._member_optimizer_states())


# ---------------------------------------------------------------------- optimizer state conversion

def _plain_group(group: dict) -> dict:
    """A stacked param group as a per-member (plain torch.optim.Adam) group: same hyper-parameters."""
    out = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
    out.update(foreach=None, fused=None, capturable=False, differentiable=False)
    out["params"] = list(group["params"])
    return out


def _member_optimizer_state(opt: torch.optim.Optimizer, i: int) -> dict:
    """Member ``i``'s slice of a stacked Adam, as the state dict of the member's own Adam."""
    sd = opt.state_dict()
    state = {}
    for index, entry in sd["state"].items():
        state[index] = {k: (v.detach().clone() if k == "step" else v[i].detach().clone())
                        for k, v in entry.items()}
        state[index]["step"] = state[index]["step"].detach().cpu().float().reshape(())
    return {"state": state, "param_groups": [_plain_group(g) for g in sd["param_groups"]]}


def _stack_optimizer_states(members: list[dict], opt: torch.optim.Optimizer, source: str) -> dict:
    """Per-member Adam state dicts -> the stacked Adam's state dict (members must be in step)."""
    own = opt.state_dict()
    indices = sorted({idx for m in members for idx in m["state"]})
    state = {}
    for idx in indices:
        entries = [m["state"].get(idx) for m in members]
        if any(e is None for e in entries):
            raise ckpt.CheckpointError(f"{source}: parameter {idx} has optimizer state for some members only; "
                                       "the fused engine needs the members in step")
        steps = {float(e["step"]) for e in entries}
        if len(steps) != 1:
            raise ckpt.CheckpointError(f"{source}: parameter {idx} has different Adam step counts per member "
                                       f"({sorted(steps)}); the fused engine needs the members in step")
        state[idx] = {k: (entries[0][k].clone() if k == "step" else torch.stack([e[k] for e in entries]))
                      for k in entries[0]}
    groups = []
    if len(members[0]["param_groups"]) != len(own["param_groups"]):
        raise ckpt.CheckpointError(f"{source}: {len(members[0]['param_groups'])} parameter groups, expected "
                                   f"{len(own['param_groups'])}")
    for saved, mine in zip(members[0]["param_groups"], own["param_groups"]):
        if len(saved["params"]) != len(mine["params"]):
            raise ckpt.CheckpointError(f"{source}: {len(saved['params'])} parameters per member, expected "
                                       f"{len(mine['params'])}")
        group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
        group.update({k: mine[k] for k in _OPTIMIZER_FLAGS if k in mine})
        group["params"] = list(mine["params"])
        groups.append(group)
    return {"state": state, "param_groups": groups}
