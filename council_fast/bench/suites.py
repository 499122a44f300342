"""The three benchmarks: ``convert`` (translate a batch with each engine), ``train`` (one training
iteration of each engine) and ``ops`` (forward and forward+backward of each fusable op).

``bench_convert``: the reference engine eager, its official test flow (which also runs the style
encoder and throws its output away; every other row skips it), torch.compile and the fused engine;
on CUDA also the fused engine replayed as one CUDA graph and on NHWC activations. On the CPU the
engines are timed round-robin, so a shared machine's load drifts hit every engine alike; on a GPU one
after the other, so that each row's peak memory is its own. A failing engine (a compile error, say)
is a row with its reason, not an exception.
"""
from __future__ import annotations

import gc

import torch

from ..cuda_graphs import GraphedCall
from ..inference import kernel_backend
from ..lowering import FastGenerator
from ..reference.networks import AdaINGen
from ..runtime import PRECISIONS, autocast_context, check_precision
from ..training import make_trainer
from .cases import KINDS, op_backend, op_call, op_cases
from .measure import COMPILED, FUSED, REFERENCE, BenchRow, measure, measure_interleaved, rel_diff, short, speedups

__all__ = ["bench_convert", "bench_train", "bench_ops", "OFFICIAL_FLOW", "FUSED_GRAPHED", "FUSED_CHANNELS_LAST"]

# The official test flow runs the style encoder too (encode returns content and style) and throws the
# style away; ``reference`` rows skip it, as every engine here does.
OFFICIAL_FLOW = "reference-official-flow"
FUSED_GRAPHED = "fused+cudagraph"  # CUDA devices only
FUSED_CHANNELS_LAST = "fused+channels_last"  # CUDA devices only: NHWC activations (FastGenerator(channels_last=True))


# --------------------------------------------------------------------------- bench convert

class _Translate(torch.nn.Module):
    """forward = translate, so torch.compile sees the conversion path only (no style encoder)."""

    def __init__(self, gen: torch.nn.Module):
        super().__init__()
        self.gen = gen

    def forward(self, x, z):
        return self.gen.translate(x, z)


def _make_fused(input_dim: int, gen_params: dict, state_dict: dict, backend: str, device: torch.device,
                **options):
    module = FastGenerator(input_dim, gen_params, backend=None if backend == "auto" else backend, **options)
    module.load_state_dict(state_dict)
    return module.to(device).eval()


def _fused_label(module, device) -> str:
    return f"{FUSED} ({kernel_backend(module, device)})"


def bench_convert(config: dict, device, precision: str = "fp32", batch: int = 32, size: int = 256,
                  repeats: int = 10, warmup: int = 3, compile: bool = True, backend: str = "auto",
                  seed: int = 0) -> list[BenchRow]:
    """Translate ``batch`` images of ``size`` x ``size`` with each engine; one row per engine."""
    device = torch.device(device)
    check_precision(precision, device)
    torch.manual_seed(seed)
    gen = AdaINGen(config["input_dim_b"], config["gen"]).to(device).eval()
    x = torch.rand(batch, config["input_dim_b"], size, size, device=device) * 2 - 1
    z = torch.randn(batch, config["gen"]["style_dim"], 1, 1, device=device)
    name = f"translate {batch}x{size}"

    def runner(fn, autocast=True):
        def call():
            with torch.inference_mode(), autocast_context(device, precision if autocast else "fp32"):
                return fn(x, z)
        return call

    rows = []
    engines = [(REFERENCE, lambda: gen.translate),
               (OFFICIAL_FLOW, lambda: lambda x, z: gen.decode(gen.encode(x)[0], z, x))]
    engines.append((COMPILED, (lambda: torch.compile(_Translate(gen))) if compile else None))
    engines.append((FUSED, lambda: _make_fused(config["input_dim_b"], config["gen"], gen.state_dict(), backend,
                                               device).translate))
    if device.type == "cuda":  # the same engine with the whole translation replayed as one CUDA graph
        engines.append((FUSED_GRAPHED, engines[-1][1]))
        # and with NHWC activations (cuDNN's tensor-core convolutions are NHWC; the norms then run in ATen)
        engines.append((FUSED_CHANNELS_LAST, lambda: _make_fused(config["input_dim_b"], config["gen"],
                                                                 gen.state_dict(), backend, device,
                                                                 channels_last=True).translate))
    built = []  # (row, call) of every engine that could be built
    for engine, build in engines:
        row = BenchRow(name, engine)
        rows.append(row)
        if build is None:
            row.status, row.reason = "skipped", "--no-compile"
            continue
        try:
            fn = build()
        except Exception as e:  # noqa: BLE001 - a failing engine is reported, not fatal
            row.status, row.reason = "failed", short(e)
            continue
        fused_kind = engine in (FUSED, FUSED_GRAPHED, FUSED_CHANNELS_LAST)
        native = fused_kind and precision != "fp32"
        if fused_kind:  # computes in its parameters' dtype: cast, not autocast
            row.engine = _fused_label(fn.__self__, device) + engine[len(FUSED):]
            fn.__self__.to(PRECISIONS[precision])
        if engine == FUSED_GRAPHED:
            fn = GraphedCall(fn, name="fused translate", strict=True)  # a failed capture is a failed row
        built.append((row, runner(fn, autocast=not native)))
    if device.type == "cpu":  # round-robin, so a shared machine's load drifts hit every engine alike
        measure_interleaved(built, warmup, repeats, batch)
    else:  # one engine at a time: each row's peak memory is its own
        for row, call in built:
            measure(row, call, device, warmup, repeats, batch)
    _add_differences(built, runner(gen.translate))
    return speedups(rows)


def _add_differences(built: list, reference_call) -> None:
    """max_rel_diff of every working engine against the reference eager output (if that one works)."""
    if not any(row.engine == REFERENCE and row.status == "ok" for row, _ in built):
        return
    try:
        reference_out = reference_call()
    except Exception:  # noqa: BLE001 - timed fine but fails now: leave the differences empty
        return
    for row, call in built:
        if row.status == "ok" and row.engine != REFERENCE:
            try:
                row.max_rel_diff = rel_diff(call(), reference_out)
            except Exception as e:  # noqa: BLE001 - reported in the table
                row.status, row.reason = "failed", short(e)

# --------------------------------------------------------------------------- bench train

def _trainer_step(engine: str, config: dict, device: torch.device, batch: int, size: int, seed: int,
                  precision: str):
    """A callable running one training iteration of ``engine`` (built by :func:`make_trainer`).

    The fused engine handles ``precision`` itself (fp32 master weights); the reference one runs its step
    under autocast. FUSED_GRAPHED: the fused engine with CUDA graphs (strict: a failed capture fails the
    row instead of timing the eager fallback).
    """
    config = dict(config)
    config["batch_size"] = batch
    config["crop_image_height"] = config["crop_image_width"] = size
    if engine == REFERENCE:
        trainer, outer = make_trainer(config, "reference", device=device, seed=seed), precision
    else:
        extra = {"cuda_graphs": True, "strict": True} if engine == FUSED_GRAPHED else {}
        trainer, outer = make_trainer(config, "fused", device=device, seed=seed, precision=precision, **extra), "fp32"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_a = (torch.rand(batch, config["input_dim_a"], size, size, generator=gen) * 2 - 1).to(device)
    x_b = (torch.rand(batch, config["input_dim_b"], size, size, generator=gen) * 2 - 1).to(device)
    # Start at council_start_at_iter so every timed step includes the council-D update and council loss.
    trainer.iteration = max(int(config["council"]["council_start_at_iter"]), 0)

    def step():
        with autocast_context(device, outer):
            trainer.step(x_a, x_b)
    return step


def bench_train(config: dict, device, precision: str = "fp32", batch: int | None = None, size: int | None = None,
                repeats: int = 5, warmup: int = 2, seed: int = 0) -> list[BenchRow]:
    """ms per training iteration, images/s and peak memory; one row per engine."""
    device = torch.device(device)
    check_precision(precision, device)
    batch = batch or config["batch_size"]
    size = size or config["crop_image_height"]
    name = f"train iter {batch}x{size} council {config['council']['council_size']}"
    rows = []
    engines = (REFERENCE, FUSED, FUSED_GRAPHED) if device.type == "cuda" else (REFERENCE, FUSED)
    for engine in engines:
        row = BenchRow(name, engine)
        try:
            step = _trainer_step(engine, config, device, batch, size, seed, precision)
        except NotImplementedError as e:  # the fused engine does not cover this config
            row.status, row.reason = "not available", str(e)
            rows.append(row)
            continue
        except Exception as e:  # noqa: BLE001
            row.status, row.reason = "failed", short(e)
            rows.append(row)
            continue
        # the graphed engine captures after two eager iterations: keep those out of the timed runs
        rows.append(measure(row, step, device, max(warmup, 3) if engine == FUSED_GRAPHED else warmup, repeats,
                             batch, None))
        del step  # free this engine's networks and optimizer states before measuring the next
        _release_memory(device)
    return speedups(rows)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- bench ops

def bench_ops(config: dict, device, precision: str = "fp32", batch: int = 8, size: int = 64, repeats: int = 10,
              warmup: int = 3, backend: str = "auto", seed: int = 0) -> list[BenchRow]:
    """Forward and forward+backward of each fusable op: reference, and fused where it exists."""
    device = torch.device(device)
    check_precision(precision, device)
    torch.manual_seed(seed)
    rows = []
    for case in op_cases(config, batch, size, device, precision):
        outs = {}
        for engine in (REFERENCE, FUSED):
            for kind in KINDS:
                row = BenchRow(f"{case.name} {kind}", engine)
                try:
                    fn = case.reference if engine == REFERENCE else case.fused(backend)
                    if engine == FUSED:
                        row.engine = f"{FUSED} ({op_backend(backend, device)})"
                except Exception as e:  # noqa: BLE001 - NotApplicable, BackendUnavailable and build errors
                    row.status, row.reason = "not available", short(e)
                    rows.append(row)
                    continue
                call = op_call(fn, case.inputs, kind, device, precision)
                rows.append(measure(row, call, device, warmup, repeats, batch, outs.get(kind)))
                if engine == REFERENCE and row.status == "ok":
                    outs[kind] = call()
    return speedups(rows)
