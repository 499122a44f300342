"""Check that the fused training engine computes the reference engine's iteration.

Builds both engines from the same seed (so the same initial weights, z draws and council pairs),
feeds them the same batch, and runs one full iteration (D, council-D, G updates) before
council_start_at_iter and one at it (the second starts both engines from the reference's state
after the first, loaded into the fused engine: a cross-engine resume). Compares

- every loss value: |a - b| / |b|;
- every gradient, captured just before each optimizer step: max|a - b| / max|b| per tensor;
- every parameter after the iteration: ||a - b|| / ||b|| per tensor (and max|a - b| / max|b|,
  printed for information), elements with a noise-floor gradient aside (below).

Parameters after an Adam step are compared norm-wise because Adam divides each gradient element
by its own magnitude: an element whose gradient is at the rounding-noise floor of its tensor
(about 1e-6 of the largest) takes a step anywhere in [-lr, lr] in any two implementations. Those
elements (gradient below 1e-5 of the tensor's largest in both engines) are taken out of the
parameter comparison and checked on their own: the engines may disagree on them by at most 2 lr
(two opposite Adam steps). (A
zero-initialised bias after one step has a norm of about lr * sqrt(n), so a single such element
would otherwise count as a 1e-3 difference.) Conv biases directly
followed by instance norm or AdaIN are subtracted again by the norm (their gradient is zero up to
rounding), so they are checked separately: their gradient must be negligible in both engines and
they may not move by more than lr per step.

With ``--precision bf16`` only the losses are held to the bf16 tolerance (2e-2); gradients and
parameters are printed for information: at random initial weights the reference engine itself,
run under bf16 autocast, moves its generator gradients by ~50% (norm-wise, tiny config) against
fp32, because those gradients are small differences of large terms.

Exit status 0 when every checked figure is within tolerance (fp32: 1e-4; bf16: 2e-2), 1 otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lowering import UnsupportedForFusion, meta_template, normalised_bias_keys
from .reference import AdaINGen
from .training import CouncilTrainer, FusedCouncilTrainer, why_not_fused

TOLERANCES = {"fp32": 1e-4, "bf16": 2e-2}
# A normalised-away bias's gradient counts as zero below this fraction of its network's largest gradient.
DEAD_GRADIENT_FRACTION = 1e-5
UPDATE_TOLERANCE = 1e-2

__all__ = ["check_parity", "ParityReport", "GradientRecorder", "Comparison", "compare_iteration", "TOLERANCES",
           "dead_parameter_keys", "synthetic_batch"]


# ---------------------------------------------------------------------- capturing gradients

def dead_parameter_keys(config: dict) -> set[str]:
    """Official keys of the generator's normalised-away biases."""
    return set(normalised_bias_keys(meta_template(lambda: AdaINGen(3, dict(config["gen"])))))


class GradientRecorder:
    """Records every parameter's gradient just before its optimizer steps, keyed officially.

    Keys are (direction, kind, member, parameter key); works for both engines.
    """

    def __init__(self, trainer):
        self.grads: dict[tuple, torch.Tensor] = {}
        self._handles = []
        if isinstance(trainer, FusedCouncilTrainer):
            self._attach_fused(trainer)
        else:
            self._attach_reference(trainer)

    def _attach_reference(self, trainer) -> None:
        names = {}
        for d in trainer.directions:
            for kind, nets in trainer.nets[d].items():
                for i, net in enumerate(nets):
                    for key, p in net.named_parameters():
                        names[id(p)] = ([(d, kind, i, key)], False)
        for opts in trainer.optimizers:
            for opt in opts.values():
                self._handles.append(opt.register_step_pre_hook(self._hook(names)))

    def _attach_fused(self, trainer) -> None:
        names = {}
        for d, nets in trainer.stacked.items():
            for kind, net in nets.items():
                for key in net.parameter_keys:
                    names[id(net.stacked(key))] = ([(d, kind, i, key) for i in range(net.n)], True)
        for opt in trainer.stacked_optimizers.values():
            self._handles.append(opt.register_step_pre_hook(self._hook(names)))

    def _hook(self, names):
        def record(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    entries, stacked = names[id(p)]
                    grad = p.grad.detach().float().cpu()
                    for n, key in enumerate(entries):
                        self.grads[key] = (grad[n] if stacked else grad).clone()
        return record

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---------------------------------------------------------------------- comparing

@dataclass
class Check:
    name: str
    worst: float
    where: str
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance and not math.isnan(self.worst)


@dataclass
class Comparison:
    label: str
    checks: list = field(default_factory=list)
    details: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, values: dict, tolerance: float) -> None:
        if not values:
            self.checks.append(Check(name, 0.0, "(nothing compared)", tolerance))
            return
        where, worst = max(values.items(), key=lambda kv: (math.isnan(kv[1]), kv[1]))
        self.checks.append(Check(name, worst, where, tolerance))
        self.details += [(name, k, v) for k, v in values.items()]


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.norm().item()
    diff = (a - b).norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _key(k: tuple) -> str:
    d, kind, i, name = k
    return f"{d}/{kind}/{i}/{name}"


def compare_iteration(label: str, ref_losses: dict, fused_losses: dict, ref_grads: dict, fused_grads: dict,
                      ref_states: dict, fused_states: dict, before_states: dict, dead: set[str], lr: float,
                      tolerance: float, loss_tolerance: float | None = None) -> Comparison:
    """Every loss, gradient and parameter of one iteration, reference (b) against fused (a).

    ``loss_tolerance`` (default ``tolerance``) applies to the losses; ``tolerance`` to gradients and
    parameters (``math.inf``: report them only).
    """
    out = Comparison(label)
    loss_tolerance = tolerance if loss_tolerance is None else loss_tolerance
    missing = sorted(set(ref_losses) ^ set(fused_losses))
    loss_rel = {k: (math.inf if k in missing else
                    abs(float(fused_losses[k]) - float(ref_losses[k])) / max(abs(float(ref_losses[k])), 1e-30))
                for k in set(ref_losses) | set(fused_losses)}
    out.add("losses", loss_rel, loss_tolerance)

    live_g, dead_g = {}, {}
    largest: dict[tuple, float] = {}
    for k, g in ref_grads.items():
        largest[k[:3]] = max(largest.get(k[:3], 0.0), g.abs().max().item())
    for k in set(ref_grads) | set(fused_grads):
        if k not in ref_grads or k not in fused_grads:
            live_g[_key(k)] = math.inf
        elif k[1] == "gen" and k[3] in dead:
            scale = max(largest.get(k[:3], 0.0), 1e-30)
            dead_g[_key(k)] = max(ref_grads[k].abs().max().item(), fused_grads[k].abs().max().item()) / scale
        else:
            live_g[_key(k)] = _rel_max(fused_grads[k], ref_grads[k])
    out.add("gradients (max|a-b|/max|b| per tensor)", live_g, tolerance)
    out.add("normalised-away bias gradients (max|g| / network's largest)", dead_g,
            DEAD_GRADIENT_FRACTION if math.isfinite(tolerance) else math.inf)

    norm_p, max_p, dead_p, step_p, floor_p = {}, {}, {}, {}, {}
    for d in ref_states:
        for kind in ref_states[d]:
            for i, (a_sd, b_sd) in enumerate(zip(fused_states[d][kind], ref_states[d][kind])):
                for name, b in b_sd.items():
                    if not b.is_floating_point():
                        continue
                    key = f"{d}/{kind}/{i}/{name}"
                    a = a_sd[name].detach().double().cpu()
                    b = b.detach().double().cpu()
                    start = before_states[d][kind][i][name].detach().double().cpu()
                    if kind == "gen" and name in dead:
                        dead_p[key] = max((a - start).abs().max().item(), (b - start).abs().max().item()) / lr
                        continue
                    floor = _noise_floor_elements(ref_grads.get((d, kind, i, name)), fused_grads.get((d, kind, i, name)))
                    if floor is not None and floor.any():
                        floor_p[key] = (a - b)[floor].abs().max().item() / lr
                        a = torch.where(floor, b, a)
                    norm_p[key] = _rel_norm(a, b)
                    max_p[key] = _rel_max(a, b)
                    if not torch.equal(b, start):
                        step_p[key] = _rel_norm(a - start, b - start)
    out.add("parameters (||a-b||/||b|| per tensor)", norm_p, tolerance)
    out.add("parameters (max|a-b|/max|b| per tensor, information)", max_p, math.inf)
    out.add("parameter updates (||da-db||/||db|| per tensor)", step_p, UPDATE_TOLERANCE if math.isfinite(tolerance) else math.inf)
    out.add("normalised-away biases (largest move / lr)", dead_p, 1.0 + 1e-3 if math.isfinite(tolerance) else math.inf)
    out.add("noise-floor gradient elements (max|a-b| / lr)", floor_p,
            2.0 + 1e-3 if math.isfinite(tolerance) else math.inf)
    return out


def _noise_floor_elements(ref_grad, fused_grad):
    """Elements whose gradient, in both engines, is below DEAD_GRADIENT_FRACTION of its tensor's largest:
    rounding noise, which Adam turns into a step anywhere in [-lr, lr]. None without recorded gradients."""
    if ref_grad is None or fused_grad is None:
        return None
    ref_grad, fused_grad = ref_grad.detach().double().cpu(), fused_grad.detach().double().cpu()
    scale = ref_grad.abs().max().item()
    if scale == 0.0:
        return None
    limit = DEAD_GRADIENT_FRACTION * scale
    return (ref_grad.abs() <= limit) & (fused_grad.abs() <= limit)


def _clone_states(states: dict) -> dict:
    return {d: {k: [{n: t.detach().clone() for n, t in sd.items()} for sd in sds] for k, sds in kinds.items()}
            for d, kinds in states.items()}


def synthetic_batch(config: dict, batch: int, size: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible (x_a, x_b) batch in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x_a = torch.rand(batch, config["input_dim_a"], size, size, generator=g) * 2 - 1
    x_b = torch.rand(batch, config["input_dim_b"], size, size, generator=g) * 2 - 1
    return x_a.to(device), x_b.to(device)


def run_iteration(reference, fused, x_a, x_b, iteration: int, dead: set[str], tolerance: float, label: str,
                  loss_tolerance: float | None = None):
    """Set both iteration counters, run one step on each, compare."""
    reference.iteration = fused.iteration = iteration
    before = _clone_states(reference.network_states())
    recorders = (GradientRecorder(reference), GradientRecorder(fused))
    try:
        ref_losses = reference.step(x_a, x_b)
        fused_losses = fused.step(x_a, x_b)
    finally:
        for r in recorders:
            r.close()
    lr = max(g["lr"] for opts in reference.optimizers for o in opts.values() for g in o.param_groups)
    lr = max(lr, reference.config["lr"])
    return compare_iteration(label, ref_losses, fused_losses, recorders[0].grads, recorders[1].grads,
                             reference.network_states(), fused.network_states(), before, dead, lr, tolerance,
                             loss_tolerance)


@dataclass
class ParityReport:
    """What ``check_parity`` compared: the comparisons in order, notes for the reader, the batch and size."""
    results: list
    notes: list
    batch: int
    size: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def check_parity(config: dict, device: str = "cpu", precision: str = "fp32", iters_before: int | None = None,
                 iters_after: int | None = None, batch: int | None = None, size: int | None = None, seed: int = 0,
                 tolerance: float | None = None) -> ParityReport:
    """Initial weights, one iteration before the council starts and one at it (the fused engine resumed
    from the reference's state), reference vs fused engine built from ``seed``. See the module doc."""
    if precision == "fp32" and torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tolerance = tolerance if tolerance is not None else TOLERANCES[precision]
    start = config["council"]["council_start_at_iter"]
    before_iter = iters_before if iters_before is not None else 0
    after_iter = iters_after if iters_after is not None else start
    batch = batch or config["batch_size"]
    size = size or config["crop_image_height"]
    notes = []
    if before_iter >= start:
        notes.append(f"--iters-before {before_iter} is not before council_start_at_iter ({start})")
    reasons = why_not_fused(config)
    if reasons:
        raise UnsupportedForFusion("the fused engine does not implement " + "; ".join(reasons)
                                   + " (the reference engine runs this config: nothing to compare)")
    reference = CouncilTrainer(config, device, seed=seed)
    fused = FusedCouncilTrainer(config, device, seed=seed, precision=precision)
    x_a, x_b = synthetic_batch(config, batch, size, seed, device)
    dead = dead_parameter_keys(config)
    init = Comparison("initial weights")
    ref0, fused0 = reference.network_states(), fused.network_states()
    init.add("parameters (max|a-b|)", {f"{d}/{k}/{i}/{n}": (fused0[d][k][i][n].double() - t.double()).abs().max().item()
                                       for d in ref0 for k in ref0[d] for i, sd in enumerate(ref0[d][k])
                                       for n, t in sd.items() if t.is_floating_point()}, 0.0)
    results = [init]
    # bf16: gradients and parameters are reported, not checked (see the module doc).
    grad_tolerance = tolerance if precision == "fp32" else math.inf
    results.append(run_iteration(reference, fused, x_a, x_b, before_iter, dead, grad_tolerance,
                                 f"iteration {before_iter} (council {'on' if before_iter >= start else 'off'})",
                                 tolerance))
    # Second step: both engines continue from the reference's state (the fused one by loading it).
    fused.load_state_dict(reference.state_dict(), "<reference state>")
    results.append(run_iteration(reference, fused, x_a, x_b, after_iter, dead, grad_tolerance,
                                 f"iteration {after_iter} (council {'on' if after_iter >= start else 'off'}), "
                                 "fused engine resumed from the reference's state", tolerance))
    return ParityReport(results, notes, batch, size)
