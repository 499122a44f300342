"""The fused training engine: the reference iteration with the council batched.

:class:`FusedCouncilTrainer` has the step interface of :class:`~council_fast.training.common.TrainerBase`
and computes the reference engine's iteration (same initial weights, same z draws from the same
generator, same council pairs from the same ``random.Random``), but

- the N generators, the N discriminators and the N council discriminators of a direction are three
  stacked networks (:class:`council_fast.lowering.StackedAdaINGen`, :mod:`.discriminators`): one
  grouped pass per update instead of N; it builds only those (the initial weights are drawn straight
  into them, :func:`~council_fast.training.common.draw_initial_weights`);
- the D update runs fakes and reals as one batch; the council-D update gathers every member's chosen
  partners on the device and runs all N x K comparisons in one pass, forward and backward;
- the loss-matching histories are device tensors, so an iteration never waits for the device;
- one Adam per network kind over the stacked tensors (Adam is elementwise, so that is N Adams);
- optional bf16 autocast (fp32 master weights and losses);
- optional lowerings of the generators that change rounding (``upsample_conv``: upsample + 3x3 conv as
  four phase convs; ``winograd``: CPU Winograd for wide 3x3 convs), off by default: see
  :mod:`council_fast.lowering`.

It reads and writes the reference engine's full-state checkpoint (per-member state dicts in the
official key layout, per-member optimizer states), so either engine resumes the other's run. It
covers the configs :func:`why_not_fused` finds nothing in; building it for another is an error
naming the switches (:func:`council_fast.training.make_trainer` chooses the engine).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from .. import checkpoint as ckpt
from ..lowering import StackedAdaINGen, UnsupportedForFusion, lower, lower_generator, meta_template
from ..reference import AdaINGen, MsImageDis, MsImageDisCouncil
from .common import (HISTORIES, TrainerBase, draw_initial_weights, make_adam, make_scheduler, step_schedulers)
from .discriminators import (StackedMsImageDis, StackedMsImageDisCouncil, lsgan_dis_loss_per_member,
                             lsgan_gen_loss_per_member)
from .distributed import DataParallelHooks
from .graphs import GraphedTrainStep

__all__ = ["FusedCouncilTrainer", "PRECISIONS", "why_not_fused", "unfused_switches", "IterationDraws"]

PRECISIONS = ("fp32", "bf16")
_OPTIMIZER_FLAGS = ("foreach", "fused", "capturable", "differentiable")
_MATCHED = ("gan", "council")  # the histories the fused step keeps on the device


def unfused_switches(config: dict) -> list[str]:
    """Config switches the fused step does not implement (the reference engine honours them)."""
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


def why_not_fused(config: dict) -> list[str]:
    """Why the fused engine does not cover ``config`` (empty: it does): the switches it does not implement,
    or a layer the lowering does not handle."""
    reasons = unfused_switches(config)
    if reasons:
        return reasons
    try:
        for d in ("a2b", "b2a"):
            if config[f"do_{d}"]:
                dim = config["input_dim_a"] if d == "a2b" else config["input_dim_b"]
                lower_generator(meta_template(lambda: AdaINGen(dim, dict(config["gen"]))))
                for dis in (MsImageDis, MsImageDisCouncil):
                    template = meta_template(lambda: dis(dim, dict(config["dis"])))
                    for s, cnn in enumerate(template.cnns):
                        lower(cnn, f"cnns.{s}")
    except UnsupportedForFusion as e:
        return [str(e)]
    return []


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


class FusedCouncilTrainer(TrainerBase):
    """The council batched (see the module doc); the step interface of TrainerBase."""

    engine = "fused"

    def __init__(self, config: dict, device: str | torch.device = "cpu", seed: int | None = None,
                 precision: str = "fp32", hooks: DataParallelHooks | None = None, cuda_graphs: bool = False,
                 graph_capturer=None, strict: bool | None = None, upsample_conv: bool = False,
                 winograd: bool = False):
        """``cuda_graphs``: replay each iteration as a CUDA graph (:mod:`.graphs`; one process only).
        ``graph_capturer`` replaces the CUDA-graph capturer (tests emulate it on the CPU)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        reasons = why_not_fused(config)
        if reasons:
            raise NotImplementedError("the fused engine does not implement: " + "; ".join(reasons)
                                      + " (use the reference engine: --engine reference)")
        self.hooks = hooks or DataParallelHooks()
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            if type(self.hooks) is not DataParallelHooks:  # torchrun, even with one process
                raise NotImplementedError("CUDA graphs of the training step run in one process only (the gradient "
                                          "all-reduce is not captured); drop --cuda-graphs under torchrun")
            if torch.device(device).type != "cuda" and graph_capturer is None:
                raise ValueError(f"CUDA graphs need a CUDA device, got {device!r}")
        super().__init__(config, device, seed)
        self.precision = precision
        self._build_stacked(upsample_conv, winograd)
        self._build_optimizers()
        self._start_streams()
        self._build_histories()
        self.graphs = GraphedTrainStep(self, capturer=graph_capturer, strict=strict) if self.cuda_graphs else None

    # ------------------------------------------------------------------ construction

    def _build_stacked(self, upsample_conv: bool, winograd: bool) -> None:
        c, n = self.config, self.size
        self.stacked = {}
        for d in self.directions:
            dim = self._input_dim(d)
            nets = {"gen": StackedAdaINGen(dim, c["gen"], n, upsample_conv=upsample_conv, winograd=winograd),
                    "dis": StackedMsImageDis(dim, c["dis"], n)}
            if self.do_dis_council:
                nets["dis_council"] = StackedMsImageDisCouncil(dim, c["dis"], n)
            self.stacked[d] = {kind: net.to(self.device) for kind, net in nets.items()}
        draw_initial_weights(c, self.directions, n, self._kinds(), self._member_slices)

    def _member_slices(self, direction: str, kind: str, i: int) -> dict:
        net = self.stacked[direction][kind]
        return {key: net.stacked(key).data[i] for key in net.state_keys}

    def _build_optimizers(self) -> None:
        self.stacked_optimizers, self.stacked_schedulers = {}, {}
        for kind in self._kinds():
            params = [p for d in self.directions for p in self.stacked[d][kind].stacked_parameters()]
            opt = make_adam(params, self.config, **self._adam_flags())
            self.stacked_optimizers[kind] = opt
            self.stacked_schedulers[kind] = make_scheduler(opt, self.config)

    def _build_histories(self) -> None:
        hist = self.config["loss_matching_hist_size"]
        self.match_history = {d: {h: torch.ones(self.size, hist, dtype=torch.float64, device=self.device)
                                  for h in _MATCHED} for d in self.directions}
        # The reference engine's other histories, carried through checkpoints unchanged.
        self._foreign_history = {d: {h: [[1.0] * hist for _ in range(self.size)] for h in HISTORIES
                                     if h not in _MATCHED} for d in self.directions}

    # ------------------------------------------------------------------ helpers

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
        z = TrainerBase._randn(self, batch * world)
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
        if self.graphs is not None:
            return self.graphs.run(x_a, x_b)
        return self.run_updates(x_a, x_b, self.draw_iteration(x_a, x_b))

    # ------------------------------------------------------------------ the three updates

    def dis_update(self, x_a: torch.Tensor, x_b: torch.Tensor, noise: dict | None = None) -> dict:
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
        # The council-D optimizer does not step before council_start_at_iter (as in the reference).
        step_schedulers(self.stacked_schedulers.values())

    # ------------------------------------------------------------------ networks and sampling

    def gen(self, direction: str, i: int) -> AdaINGen:
        """Member ``i``'s generator as a reference module (a copy of the stacked weights)."""
        net = AdaINGen(self._input_dim(direction), self.config["gen"]).to(self.device)
        net.load_state_dict(self.stacked[direction]["gen"].member_state_dict(i))
        return net

    def parameters(self, kind: str):
        return [p for d in self.directions if kind in self.stacked[d] for p in self.stacked[d][kind].parameters()]

    @torch.no_grad()
    def _translate_members(self, direction, x, z, members):
        out = self.stacked[direction]["gen"].translate(x, z)
        per_member = out.view(out.shape[0], self.size, -1, *out.shape[2:])
        return [per_member[:, i] for i in members]

    # ------------------------------------------------------------------ state (the reference layout)

    def network_states(self) -> dict:
        return {d: {k: self.stacked[d][k].member_state_dicts() for k in self._kinds()} for d in self.directions}

    def member_optimizer_states(self) -> list[dict]:
        return [{kind: _member_optimizer_state(opt, i) for kind, opt in self.stacked_optimizers.items()}
                for i in range(self.size)]

    def state_dict(self) -> dict:
        history = {}
        for d in self.directions:
            history[d] = {h: [list(map(float, row)) for row in self.match_history[d][h].tolist()] for h in _MATCHED}
            history[d].update(copy.deepcopy(self._foreign_history.get(d, {})))
        schedulers = {k: (s.state_dict() if s is not None else None) for k, s in self.stacked_schedulers.items()}
        return self._full_state([copy.deepcopy(schedulers) for _ in range(self.size)], history)

    def load_state_dict(self, state: dict, source: str = "<state>") -> None:
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
        self._load_histories(state["loss_history"], source)
        self._load_counters(state, source)

    def _load_histories(self, saved: dict, source: str) -> None:
        n = self.config["loss_matching_hist_size"]
        for d, hs in saved.items():
            if d not in self.match_history:
                continue
            for h, qs in hs.items():
                if h not in self.match_history[d]:
                    self._foreign_history.setdefault(d, {})[h] = [list(map(float, q)) for q in qs]
                    continue
                values = torch.tensor([[float(v) for v in q] for q in qs], dtype=torch.float64)
                if tuple(values.shape) != (self.size, n):
                    raise ckpt.CheckpointError(f"{source}: loss history {d}/{h} has shape {tuple(values.shape)}, "
                                               f"expected {(self.size, n)}")
                self.match_history[d][h].copy_(values)


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
