"""What both training engines share: the step interface, the config checks, the official weight
initialisation (and its exact replay without building the networks), Adam + LR schedule, the
random streams and their saved state, the full-state layout and the official checkpoint files.

Both engines (:mod:`.reference`, :mod:`.fused`) subclass :class:`TrainerBase`, which owns the
iteration counter, the noise generator (z draws), the pair chooser (council partners, random D / G
picks), the fixed display codes and :meth:`TrainerBase.step`; each engine supplies the three
updates, its networks' states and its optimizers' per-member states.
"""
from __future__ import annotations

import copy
import math
import random
import re
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import ConfigError
from ..lowering import UnsupportedForFusion, meta_template
from ..reference import AdaINGen, AdaptiveInstanceNorm2d, MsImageDis, MsImageDisCouncil

__all__ = ["TrainerBase", "UNSUPPORTED_WEIGHTS", "KINDS", "HISTORIES", "init_weights", "init_parameter",
           "check_supported", "network_order", "draw_initial_weights", "make_adam", "make_scheduler",
           "step_schedulers", "flip_on", "gray", "rng_state", "python_rng", "python_rng_back", "numpy_rng",
           "numpy_rng_back", "seed_everything"]

# Loss weights the reference trainer does not implement: non-zero is a clear error.
UNSUPPORTED_WEIGHTS = ("recon_x_w", "recon_s_w", "recon_c_w", "recon_x_cyc_w", "vgg_w")
KINDS = ("gen", "dis", "dis_council")
HISTORIES = ("gan", "council", "focus", "focus_zero_one")
NETWORKS = {"gen": AdaINGen, "dis": MsImageDis, "dis_council": MsImageDisCouncil}


# ---------------------------------------------------------------------- config

def check_supported(config: dict) -> None:
    """Config settings no engine implements: a clear error."""
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


def flip_on(council: dict, iteration: int) -> bool:
    """The official flipOnOff schedule: on for On iterations, off for Off (or the reverse)."""
    cycle = council["flipOnOff_On_iteration"] + council["flipOnOff_Off_iteration"]
    start_with = council["flipOnOff_start_with"]
    first = council["flipOnOff_On_iteration"] if start_with else council["flipOnOff_Off_iteration"]
    return start_with if iteration % cycle < first else not start_with


def gray(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The official do_Dis_only_gray view: channel sum / input dim, repeated over channels."""
    return torch.sum(x, 1).unsqueeze(1).repeat(1, dim, 1, 1) / dim


# ---------------------------------------------------------------------- initial weights

def init_parameter(weight: torch.Tensor, init_type: str) -> None:
    """One Conv*/Linear* weight initialised as the official weights_init does."""
    if init_type == "gaussian":
        nn.init.normal_(weight, 0.0, 0.02)
    elif init_type == "xavier":
        nn.init.xavier_normal_(weight, gain=math.sqrt(2))
    elif init_type == "kaiming":
        nn.init.kaiming_normal_(weight, a=0, mode="fan_in")
    elif init_type == "orthogonal":
        nn.init.orthogonal_(weight, gain=math.sqrt(2))
    elif init_type != "default":
        raise ValueError(f"unsupported init {init_type!r}")


def _initialised(m: nn.Module) -> bool:
    name = type(m).__name__
    return (name.startswith("Conv") or name.startswith("Linear")) and hasattr(m, "weight")


def init_weights(module: nn.Module, init_type: str) -> None:
    """The official weights_init: every Conv*/Linear* weight by ``init_type``, biases 0."""
    def init_one(m):
        if _initialised(m):
            init_parameter(m.weight.data, init_type)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias.data, 0.0)
    module.apply(init_one)


def init_type_of(config: dict, kind: str) -> str:
    return config["init"] if kind == "gen" else "gaussian"


def input_dim(config: dict, direction: str) -> int:
    return config["input_dim_a"] if direction == "a2b" else config["input_dim_b"]


def network_order(config: dict, directions: list, size: int, kinds: tuple):
    """(member, direction, kind) in the official construction (and initialisation) order."""
    return [(i, d, kind) for i in range(size) for d in directions for kind in kinds]


def draw_initial_weights(config: dict, directions: list, size: int, kinds: tuple,
                         target: Callable[[str, str, int], dict]) -> None:
    """The reference engine's initial weights, drawn from the same random streams without building it.

    The reference builds every network (each Conv / Linear draws its default initialisation on the
    CPU generator as it is constructed), then runs the official weights_init over them on their device.
    This replays both passes layer by layer from meta templates into ``target(direction, kind, member)``
    (state-dict key -> tensor to fill, on the device), so the values are identical bit for bit.
    """
    templates = {(d, kind): meta_template(lambda d=d, kind=kind: NETWORKS[kind](input_dim(config, d),
                                                                               dict(config[kind[:3]])))
                 for d in directions for kind in kinds}
    order = network_order(config, directions, size, kinds)
    for i, d, kind in order:
        _replay_construction(templates[(d, kind)], target(d, kind, i))
    for i, d, kind in order:
        _replay_init(templates[(d, kind)], init_type_of(config, kind), target(d, kind, i))


@torch.no_grad()
def _replay_construction(template: nn.Module, target: dict) -> None:
    for name, m in template.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, AdaptiveInstanceNorm2d):  # unused buffers, kept for the official state dict
            target[prefix + "running_mean"].zero_()
            target[prefix + "running_var"].fill_(1.0)
            continue
        own = list(m.named_parameters(recurse=False))
        if not own:
            if list(m.named_buffers(recurse=False)):
                raise UnsupportedForFusion(f"{name}: {type(m).__name__} buffers are not replayed")
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise UnsupportedForFusion(f"{name}: the initialisation of {type(m).__name__} is not replayed")
        leaf = copy.deepcopy(m).to_empty(device="cpu", recurse=False)
        leaf.reset_parameters()  # the draws its construction makes
        for pname, p in leaf.named_parameters(recurse=False):
            target[prefix + pname].copy_(p)


@torch.no_grad()
def _replay_init(template: nn.Module, init_type: str, target: dict) -> None:
    for name, m in _post_order(template):  # Module.apply's order
        if _initialised(m):
            prefix = f"{name}." if name else ""
            init_parameter(target[prefix + "weight"], init_type)
            if getattr(m, "bias", None) is not None:
                target[prefix + "bias"].zero_()


def _post_order(module: nn.Module, prefix: str = ""):
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


# ---------------------------------------------------------------------- optimizers

def make_adam(params, config: dict, **flags) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=config["lr"], betas=(config["beta1"], config["beta2"]),
                            weight_decay=config["weight_decay"], **flags)


def make_scheduler(opt: torch.optim.Optimizer, config: dict):
    if config["lr_policy"] != "step":
        return None
    return torch.optim.lr_scheduler.StepLR(opt, step_size=config["step_size"], gamma=config["gamma"])


def step_schedulers(schedulers) -> None:
    with warnings.catch_warnings():
        # Council-D optimizers do not step before council_start_at_iter; their schedules still advance.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        for s in schedulers:
            if s is not None:
                s.step()


# ---------------------------------------------------------------------- random state

def python_rng(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "state": list(internal), "gauss": gauss}


def python_rng_back(d: dict):
    return (d["version"], tuple(int(v) for v in d["state"]), d["gauss"])


def numpy_rng(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_rng_back(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def rng_state(noise: torch.Generator, choices: random.Random) -> dict:
    rng = {"torch_cpu": torch.get_rng_state(), "python": python_rng(random.getstate()),
           "numpy": numpy_rng(np.random.get_state()), "noise": noise.get_state(),
           "choices": python_rng(choices.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    return rng


def seed_everything(seed: int) -> None:
    """As the official train.py does; a resumed run then restores the saved states over these."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- the step interface

class TrainerBase:
    """One training step interface for both engines.

    ``step(x_a, x_b)`` runs one iteration (D, council-D, G updates), counts it and steps the LR
    schedule; ``dis_update`` alone is the official extra D-only update. ``sample`` translates with
    every member; ``gen(direction, i)`` is member i's generator as a reference module;
    ``network_states``/``state_dict``/``load_state_dict``/``save_official`` read and write the one
    full-state layout (per-member official state dicts and optimizer states) both engines share.
    """

    engine = "?"

    def __init__(self, config: dict, device, seed: int | None):
        self.config = config
        self.device = torch.device(device)
        self.seed = int(config["random_seed"] if seed is None else seed)
        check_supported(config)
        self.directions = [d for d in ckpt.DIRECTIONS if config[f"do_{d}"]]
        self.size = config["council"]["council_size"]
        self.do_dis_council = config["council_w"] != 0
        self.iteration = 0
        self.abs_beginning_end_w = float(config["abs_beginning_end"])
        torch.manual_seed(self.seed)

    def _start_streams(self) -> None:
        """The noise generator, the pair chooser and the display codes (after the initial weights)."""
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(self.seed)
        self.choices = random.Random(self.seed)  # council pairs, random D / G picks, abs partners
        display = torch.Generator().manual_seed(self.seed + 1)
        self.display_z = torch.randn(self.config["display_size"], self.config["gen"]["style_dim"], 1, 1,
                                     generator=display).to(self.device)

    def _kinds(self) -> tuple[str, ...]:
        return KINDS if self.do_dis_council else KINDS[:2]

    def _input_dim(self, direction: str) -> int:
        return input_dim(self.config, direction)

    def _randn(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.config["gen"]["style_dim"], 1, 1, generator=self.noise, device=self.device)

    @staticmethod
    def _source(direction: str, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return x_a if direction == "a2b" else x_b

    @staticmethod
    def _target(direction: str, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return x_b if direction == "a2b" else x_a

    def council_dis_active(self) -> bool:
        c, council = self.config, self.config["council"]
        if self.size <= 1 or council["numberOfCouncil_dis_relative_iteration"] == 0 or not self.do_dis_council:
            return False
        # Official quirk: without flipOnOff the council-D runs only when flipOnOff_start_with is true.
        on = flip_on(council, self.iteration) if council["flipOnOff"] else council["flipOnOff_start_with"]
        return on and c["council_w"] != 0 and self.iteration >= council["council_start_at_iter"]

    def council_gen_active(self) -> bool:
        c, council = self.config, self.config["council"]
        on = flip_on(council, self.iteration) if council["flipOnOff"] else True
        if self.iteration < council["council_start_at_iter"]:
            on = False
        return (c["council_w"] != 0 or c["council_abs_w"] != 0) and on and self.size > 1

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
        raise NotImplementedError

    def update_learning_rate(self) -> None:
        raise NotImplementedError

    def _display_codes(self, batch: int) -> torch.Tensor:
        reps = -(-batch // self.display_z.size(0))
        return self.display_z.repeat(reps, 1, 1, 1)[:batch]

    def sample(self, x: torch.Tensor, direction: str | None = None, z: torch.Tensor | None = None,
               members=None) -> list[torch.Tensor]:
        """Each member's translation of ``x`` (one style code per image; the fixed display codes by default)."""
        x = x.to(self.device)
        z = (self._display_codes(x.size(0)) if z is None else z).to(self.device)
        members = range(self.size) if members is None else members
        return self._translate_members(direction or self.directions[-1], x, z, members)

    def _translate_members(self, direction: str, x: torch.Tensor, z: torch.Tensor, members) -> list[torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ state

    def network_states(self) -> dict:
        raise NotImplementedError

    def member_optimizer_states(self) -> list[dict]:
        raise NotImplementedError

    def _full_state(self, schedulers: list, history: dict) -> dict:
        """Everything an exact resume needs (the data pipeline's position is added by the caller)."""
        return {
            "config": self.config, "iteration": self.iteration, "engine": self.engine, "seed": self.seed,
            "networks": self.network_states(), "optimizers": self.member_optimizer_states(),
            "schedulers": schedulers, "loss_history": history,
            "abs_beginning_end_w": self.abs_beginning_end_w, "rng": rng_state(self.noise, self.choices),
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

    def _load_counters(self, state: dict, source: str) -> None:
        self.iteration = int(state["iteration"])
        self.abs_beginning_end_w = float(state.get("abs_beginning_end_w", self.config["abs_beginning_end"]))
        self._restore_rng(state["rng"], source)

    def _restore_rng(self, rng: dict, source: str) -> None:
        torch.set_rng_state(rng["torch_cpu"])
        random.setstate(python_rng_back(rng["python"]))
        np.random.set_state(numpy_rng_back(rng["numpy"]))
        try:
            self.noise.set_state(rng["noise"])
        except (RuntimeError, TypeError, ValueError):  # saved on another device type: cannot continue that stream
            warnings.warn(f"{source}: the style-noise generator state was saved on another device type; "
                          "reseeding it (the run continues, but not bit for bit)")
            self.noise.manual_seed(self.seed + self.iteration)
        self.choices.setstate(python_rng_back(rng["choices"]))
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])

    def save_official(self, out_dir) -> list[str]:
        """Official per-member files, named iteration + 1 as the official trainer names them."""
        return ckpt.save_official(out_dir, self.iteration + 1, self.network_states(), self.member_optimizer_states())
