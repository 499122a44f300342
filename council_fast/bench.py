"""Benchmark the reference engine (eager and torch.compile) and the fused engine side by side.

``bench convert``: translate (encode content + decode) a batch of B images at S x S with each engine.
Its ``reference-official-flow`` row is the official test flow, which also runs the style encoder
and throws its output away; every other row skips it. On CUDA a ``fused (...)+cudagraph`` row
replays the fused translation as one CUDA graph (:mod:`council_fast.cuda_graphs`) and a
``fused (...)+channels_last`` row runs it on NHWC activations.
``bench train``: one full training iteration (D, council-D and G updates) of the reference trainer
and of the fused engine. ``bench ops``: forward and forward+backward of the generator's fusable ops
(AdaIN, instance norm, the decoder tail, the Winograd 3x3 conv), reference and (where council_fast.ops
has them) fused.

Every timing is the median over --repeats runs after --warmup untimed runs (the first of which
includes any compilation), the device synchronised around each run. On the CPU, ``bench convert``
times its engines round-robin (one run of each per round), so the load drifts of a shared machine
hit every engine alike; on a GPU it times one engine after the other, so that each row's peak
memory is its own. A failing engine (a compile
error, say) is reported in the table, not raised. ``--json F`` writes every field below.

JSON fields. Top level: ``benchmark`` (convert | train | ops); ``settings`` (config, device,
precision, batch, size, repeats, warmup, compile, backend); ``environment`` (date, council_fast,
python, torch, triton, cuda, device, device_name, cpu_model, cpu_threads, cpu_count, platform,
load_average); ``results``, one row per engine (per op, pass and engine for ops) with: name,
engine, status (ok | failed | not available | skipped), reason, median_ms, min_ms, mean_ms,
times_ms, img_per_s, speedup (vs the reference eager row of the same name), peak_mem_mib (GPU
only, else null; everything allocated, model weights included), first_call_s and max_rel_diff
(max |out - reference| / max |reference|, on the output for fwd and on the first input's
gradient for fwd+bwd; null for the reference itself and for train).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .cuda_graphs import GraphedCall
from .training import make_trainer
from .convert import PRECISIONS, ConvertError, autocast_context, check_precision, fast_generator_class, \
    resolve_device

__all__ = ["BenchRow", "time_callable", "environment", "bench_convert", "bench_train", "bench_ops",
           "format_table", "RESULT_FIELDS", "ENVIRONMENT_FIELDS", "SETTINGS_FIELDS"]

RESULT_FIELDS = ("name", "engine", "status", "reason", "median_ms", "min_ms", "mean_ms", "times_ms", "img_per_s",
                 "speedup", "peak_mem_mib", "first_call_s", "max_rel_diff")
ENVIRONMENT_FIELDS = ("date", "council_fast", "python", "torch", "triton", "cuda", "device", "device_name",
                      "cpu_model", "cpu_threads", "cpu_count", "platform", "load_average")
SETTINGS_FIELDS = ("config", "device", "precision", "batch", "size", "repeats", "warmup", "compile", "backend")

REFERENCE, COMPILED, FUSED = "reference", "reference+compile", "fused"
# The official test flow runs the style encoder too (encode returns content and style) and throws the
# style away; ``reference`` rows skip it, as every engine here does.
OFFICIAL_FLOW = "reference-official-flow"
FUSED_GRAPHED = "fused+cudagraph"  # CUDA devices only
FUSED_CHANNELS_LAST = "fused+channels_last"  # CUDA devices only: NHWC activations (FastGenerator(channels_last=True))


@dataclass
class BenchRow:
    name: str
    engine: str
    status: str = "ok"
    reason: str | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    mean_ms: float | None = None
    times_ms: list = field(default_factory=list)
    img_per_s: float | None = None
    speedup: float | None = None
    peak_mem_mib: float | None = None
    first_call_s: float | None = None
    max_rel_diff: float | None = None
    launches: int | None = None  # per call: CUDA kernel/copy/graph launches, or dispatched ops on the CPU
    launch_unit: str | None = None


# --------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Time ``fn``: one first call (compilation included), warmup - 1 more untimed calls, then
    ``repeats`` timed calls. Returns times in ms, the first call in s and the GPU peak memory."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"times_ms": times, "first_call_s": first, "peak_mem_mib": peak}


_LAUNCH_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch", "cudaMemcpy", "cudaMemset")


class _OpCounter:
    """Counts the aten and custom ops dispatched while active that compute something (views and other
    aliases, which launch nothing on a GPU either, are left out): the CPU's stand-in for kernel launches."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace != "profiler" and not func.is_view:
                    counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def count_launches(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """``(count, unit)`` for one call of ``fn``: on CUDA the kernel, copy and graph launches the
    profiler sees (a replayed CUDA graph counts once); on the CPU the computing ops dispatched. (On
    the CPU, counting runs ``fn`` under a dispatch mode, which makes torch.compile'd code run eagerly:
    compiled rows get no count there.)"""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key.startswith(_LAUNCH_CALLS))
        if launches:
            return launches, "launches"
        # no runtime/driver launch calls under the names above (another CUDA or profiler version):
        # count the kernels that ran on the device instead (a graph's kernels count one by one)
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return kernels, "kernels"
    with _OpCounter() as counter:
        fn()
    return counter.ops, "ops"


def _add_launches(row: BenchRow, call, device: torch.device) -> None:
    try:
        row.launches, row.launch_unit = count_launches(call, device)
    except Exception:  # noqa: BLE001 - a profiler problem leaves the column empty, the timing stands
        row.launches = row.launch_unit = None


def _fill(row: BenchRow, timing: dict, images_per_call: int) -> BenchRow:
    times = timing["times_ms"]
    row.times_ms = [round(t, 4) for t in times]
    row.median_ms = statistics.median(times)
    row.min_ms = min(times)
    row.mean_ms = statistics.fmean(times)
    row.img_per_s = images_per_call / (row.median_ms / 1e3) if images_per_call else None
    row.peak_mem_mib = timing["peak_mem_mib"]
    row.first_call_s = timing["first_call_s"]
    return row


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _rel_diff(out, ref) -> float:
    out = out[0] if isinstance(out, (tuple, list)) else out
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    scale = ref.detach().float().abs().max().clamp_min(1e-12)
    return float((out.detach().float() - ref.detach().float()).abs().max() / scale)


def _speedups(rows: list[BenchRow]) -> list[BenchRow]:
    base = {r.name: r.median_ms for r in rows if r.engine == REFERENCE and r.status == "ok"}
    for r in rows:
        if r.status == "ok" and base.get(r.name):
            r.speedup = base[r.name] / r.median_ms
    return rows


# --------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "not installed / not importable"
        return None


def environment(device: torch.device) -> dict:
    from . import __version__

    device = torch.device(device)
    cpu = _cpu_model()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "council_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # Timings on a busy host are noise: the 1-minute load average says how busy it was.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


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
    fast = fast_generator_class()
    module = fast(input_dim, gen_params, backend=None if backend == "auto" else backend, **options)
    module.load_state_dict(state_dict)
    return module.to(device).eval()


def _fused_label(module, device) -> str:
    from .convert import _kernel_backend

    return f"{FUSED} ({_kernel_backend(module, device)})"


def bench_convert(config: dict, device, precision: str = "fp32", batch: int = 32, size: int = 256,
                  repeats: int = 10, warmup: int = 3, compile: bool = True, backend: str = "auto",
                  seed: int = 0) -> list[BenchRow]:
    """Translate ``batch`` images of ``size`` x ``size`` with each engine; one row per engine."""
    from .reference.networks import AdaINGen

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
        except (ConvertError, ImportError) as e:
            row.status, row.reason = "not available", str(e)
            continue
        except Exception as e:  # noqa: BLE001 - a failing engine is reported, not fatal
            row.status, row.reason = "failed", _short(e)
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
        _measure_interleaved(built, warmup, repeats, batch)
    else:  # one engine at a time: each row's peak memory is its own
        for row, call in built:
            _measure(row, call, device, warmup, repeats, batch)
    _add_differences(built, runner(gen.translate))
    return _speedups(rows)


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
                row.max_rel_diff = _rel_diff(call(), reference_out)
            except Exception as e:  # noqa: BLE001 - reported in the table
                row.status, row.reason = "failed", _short(e)


def _measure(row: BenchRow, call, device, warmup, repeats, images, reference_out=None) -> BenchRow:
    try:
        timing = time_callable(call, device, warmup, repeats)
        if reference_out is not None:
            row.max_rel_diff = _rel_diff(call(), reference_out)
    except Exception as e:  # noqa: BLE001 - compile and kernel failures are reported in the table
        row.status, row.reason = "failed", _short(e)
        return row
    _add_launches(row, call, torch.device(device))
    return _fill(row, timing, images)


def _measure_interleaved(built: list, warmup: int, repeats: int, images: int) -> None:
    """CPU timings of several engines, round-robin: every round runs each live engine once, starting
    with a different one each round. First calls and warm-up calls come before the first round."""
    timings = {}
    for row, call in built:
        try:
            start = time.perf_counter()
            call()
            timings[id(row)] = {"times_ms": [], "first_call_s": time.perf_counter() - start, "peak_mem_mib": None}
            for _ in range(max(0, warmup - 1)):
                call()
        except Exception as e:  # noqa: BLE001 - compile and kernel failures are reported in the table
            row.status, row.reason = "failed", _short(e)
    live = [(row, call) for row, call in built if id(row) in timings]
    for r in range(repeats):
        if not live:
            break
        for row, call in live[r % len(live):] + live[:r % len(live)]:
            try:
                start = time.perf_counter()
                call()
                timings[id(row)]["times_ms"].append((time.perf_counter() - start) * 1e3)
            except Exception as e:  # noqa: BLE001 - reported in the table
                row.status, row.reason = "failed", _short(e)
        live = [(row, call) for row, call in live if row.status == "ok"]
    for row, call in live:
        _fill(row, timings[id(row)], images)
        if row.engine != COMPILED:  # see count_launches
            _add_launches(row, call, torch.device("cpu"))


# --------------------------------------------------------------------------- bench train

def _trainer_step(engine: str, config: dict, device: torch.device, batch: int, size: int, seed: int,
                  precision: str):
    """A callable running one training iteration of ``engine`` (built by :func:`make_trainer`).

    The fused engine handles ``precision`` itself (fp32 master weights); the reference engine's step
    runs under autocast. FUSED_GRAPHED: the fused engine with CUDA graphs (strict: a failed capture
    fails the row instead of timing the eager fallback).
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
            row.status, row.reason = "failed", _short(e)
            rows.append(row)
            continue
        # the graphed engine captures after two eager iterations: keep those out of the timed runs
        rows.append(_measure(row, step, device, max(warmup, 3) if engine == FUSED_GRAPHED else warmup, repeats,
                             batch, None))
        del step  # free this engine's networks and optimizer states before measuring the next
        _release_memory(device)
    return _speedups(rows)


def _release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- bench ops

@dataclass
class OpCase:
    """One op: a reference callable, inputs, and (if the fused module imports) a fused builder."""
    name: str
    reference: Callable
    inputs: tuple
    fused: Callable[[str], Callable] | None = None  # backend -> callable taking the same inputs
    unavailable: str | None = None


def _import_op(module: str):
    import importlib

    try:
        return importlib.import_module(f"council_fast.ops.{module}"), None
    except Exception as e:  # noqa: BLE001 - a missing or broken op module is reported, not fatal
        return None, f"council_fast.ops.{module} cannot be imported ({_short(e, 160)})"


def _op_cases(config: dict, batch: int, size: int, device: torch.device, precision: str = "fp32") -> list[OpCase]:
    """The generator's fusable ops at its real shapes for ``size`` x ``size`` inputs."""
    from .reference import networks as N

    g = config["gen"]
    dim, nd, activ = g["dim"], g["n_downsample"], g["activ"]
    deep, low, masks = dim * 2 ** nd, size // 2 ** nd, g["num_of_mask_dim_to_add"]

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).requires_grad_(True)

    norm = N.AdaptiveInstanceNorm2d(deep).to(device)

    def adain_reference(x, weight, bias, residual=None, relu=False):
        norm.weight, norm.bias = weight.reshape(-1), bias.reshape(-1)
        y = norm(x)
        y = torch.relu(y) if relu else y
        return y + residual if residual is not None else y

    adain_mod, adain_err = _import_op("adain")
    x, w, b = tensor(batch, deep, low, low), tensor(batch, deep, scale=0.5), tensor(batch, deep)
    cases = [
        OpCase("AdaIN + ReLU", lambda x, w, b: adain_reference(x, w, b, relu=True), (x, w, b),
               adain_mod and (lambda be: lambda x, w, b: adain_mod.adain(x, w, b, relu=True, backend=be)), adain_err),
        OpCase("AdaIN + residual", lambda x, w, b, r: adain_reference(x, w, b, residual=r),
               (x, w, b, tensor(batch, deep, low, low)),
               adain_mod and (lambda be: lambda x, w, b, r: adain_mod.adain(x, w, b, residual=r, backend=be)),
               adain_err),
        OpCase("instance norm + ReLU", lambda x: torch.relu(torch.nn.functional.instance_norm(x)),
               (tensor(batch, dim, size, size),),
               adain_mod and (lambda be: lambda x: adain_mod.instance_norm(x, relu=True, backend=be)), adain_err),
    ]
    head = torch.nn.Sequential(
        N.Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ),
        N.Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ),
        N.Conv2dBlock(dim, 3 * masks + masks, 1, 1, 0, norm="none", activation="tanh")).to(device)
    tail_mod, tail_err = _import_op("decoder_tail")
    convs = [block.conv for block in head]

    def tail_fused(be):
        weights = [t for conv in convs for t in (conv.weight, conv.bias)]
        return lambda h, images: tail_mod.decoder_tail(h, *weights, images, masks, backend=be)[0]
    cases.append(OpCase("decoder tail (1x1 convs + mask blend)",
                        lambda h, images: N.blend_with_masks(head(h), images, masks)[0],
                        (tensor(batch, dim, size, size), tensor(batch, 3, size, size)),
                        tail_mod and tail_fused, tail_err))
    wino_mod, wino_err = _import_op("winograd")

    def winograd_fused(be):
        if _op_backend(be, device) != "cpu" or precision != "fp32":
            raise ConvertError("Winograd convs belong to the cpu back-end, in fp32 (on GPUs cuDNN picks its own)")
        return wino_mod.conv3x3
    cases.append(OpCase("residual 3x3 conv (Winograd)", lambda x, w, b: F.conv2d(x, w, b, padding=1),
                        (tensor(batch, deep, low, low), tensor(deep, deep, 3, 3, scale=(9 * deep) ** -0.5),
                         tensor(deep)),
                        wino_mod and winograd_fused, wino_err))
    return cases


def bench_ops(config: dict, device, precision: str = "fp32", batch: int = 8, size: int = 64, repeats: int = 10,
              warmup: int = 3, backend: str = "auto", seed: int = 0) -> list[BenchRow]:
    """Forward and forward+backward of each fusable op: reference, and fused where it exists."""
    device = torch.device(device)
    check_precision(precision, device)
    torch.manual_seed(seed)
    rows = []
    for case in _op_cases(config, batch, size, device, precision):
        outs = {}
        for engine in (REFERENCE, FUSED):
            for kind in ("fwd", "fwd+bwd"):
                row = BenchRow(f"{case.name} {kind}", engine)
                if engine == FUSED and case.fused is None:
                    row.status, row.reason = "not available", case.unavailable or "no fused op"
                    rows.append(row)
                    continue
                try:
                    fn = case.reference if engine == REFERENCE else case.fused(backend)
                    if engine == FUSED:
                        row.engine = f"{FUSED} ({_op_backend(backend, device)})"
                except Exception as e:  # noqa: BLE001 - BackendUnavailable and build errors
                    row.status, row.reason = "not available", _short(e)
                    rows.append(row)
                    continue
                call = _op_call(fn, case.inputs, kind, device, precision)
                rows.append(_measure(row, call, device, warmup, repeats, batch, outs.get(kind)))
                if engine == REFERENCE and row.status == "ok":
                    outs[kind] = call()
    return _speedups(rows)


def _op_backend(backend: str, device: torch.device) -> str:
    from .ops import resolve_backend

    return resolve_backend(None if backend == "auto" else backend, device)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _op_call(fn, inputs, kind, device, precision):
    def forward():
        with torch.no_grad(), autocast_context(device, precision):
            return _first(fn(*inputs))

    def forward_backward():
        for t in inputs:
            t.grad = None
        with autocast_context(device, precision):
            out = _first(fn(*inputs))
        out.float().square().mean().backward()
        return inputs[0].grad
    return forward if kind == "fwd" else forward_backward


# --------------------------------------------------------------------------- output

def format_table(rows: list[BenchRow]) -> str:
    """The results as an aligned text table; reasons are numbered notes below it."""
    header = ("benchmark", "engine", "status", "median ms", "img/s", "speedup", "peak MiB", "1st call s",
              "max rel diff", "launches")
    lines, notes = [header], {}

    def num(v, fmt, suffix=""):
        return format(v, fmt) + suffix if v is not None else "-"
    for r in rows:
        status = r.status
        if r.reason:
            number = notes.setdefault(r.reason, len(notes) + 1)
            status += f" [{number}]"
        lines.append((r.name, r.engine, status, num(r.median_ms, ".4g"), num(r.img_per_s, ".4g"),
                      num(r.speedup, ".2f", "x"), num(r.peak_mem_mib, ".0f"), num(r.first_call_s, ".2f"),
                      num(r.max_rel_diff, ".2e"), num(r.launches, "d", _unit_suffix(r.launch_unit))))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    footer = [f"[{n}] {reason}" for reason, n in notes.items()]
    if any(r.launch_unit == "ops" for r in rows):
        footer.append("launches: per call; on the CPU the computing aten and custom ops dispatched (\"ops\", "
                      "views left out; none for torch.compile)")
    return "\n".join(text + footer)


def _unit_suffix(launch_unit: str | None) -> str:
    return "" if launch_unit in (None, "launches") else f" {launch_unit}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("convert", "train", "ops"), help="what to benchmark")
    parser.add_argument("--config", default="selfie2anime",
                        help="YAML config or packaged name (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per call (default: 32 for convert, the config's batch_size for train, "
                             "8 for ops)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side (default: 256 for convert, the config's crop size for train, 64 for ops)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first, at least 1 (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "triton", "cuda"),
                        help="kernel back-end of the fused engine and ops (default: %(default)s; 'reference' "
                             "runs the fused code paths with plain PyTorch kernels)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile column (compiling can take minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; fewer than the cores is steadier "
                             "on a busy host)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--json", default=None, metavar="F", help="also write every field as JSON to F")


_DEFAULTS = {"convert": (32, 256), "train": (None, None), "ops": (8, 64)}


def run(args) -> int:
    from .config import ConfigError, load_config

    try:
        device = resolve_device(args.device)
        check_precision(args.precision, device)
        config = load_config(args.config)
        if args.repeats < 1 or args.warmup < 1:
            raise ConvertError("--repeats and --warmup must be at least 1")
        if args.threads is not None and args.threads < 1:
            raise ConvertError(f"--threads must be at least 1, got {args.threads}")
        batch = args.batch if args.batch is not None else _DEFAULTS[args.what][0]
        size = args.size if args.size is not None else _DEFAULTS[args.what][1]
        for value, label in ((batch, "--batch"), (size, "--size")):
            if value is not None and value < 1:
                raise ConvertError(f"{label} must be positive, got {value}")
        if size is not None and size % 2 ** config["gen"]["n_downsample"]:
            raise ConvertError(f"--size {size} must be a multiple of {2 ** config['gen']['n_downsample']}")
    except (ConvertError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # could not start: as argparse and every other council-fast command
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, config, batch, size)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, device: torch.device, config: dict, batch: int | None, size: int | None) -> int:
    from .fileio import atomic_write_bytes

    common = dict(precision=args.precision, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    if args.what == "convert":
        rows = bench_convert(config, device, batch=batch, size=size, compile=args.compile, backend=args.backend,
                             **common)
    elif args.what == "train":
        rows = bench_train(config, device, batch=batch, size=size, **common)
        batch = batch or config["batch_size"]
        size = size or config["crop_image_height"]
    else:
        rows = bench_ops(config, device, batch=batch, size=size, backend=args.backend, **common)
    settings = {"config": args.config, "device": str(device), "precision": args.precision, "batch": batch,
                "size": size, "repeats": args.repeats, "warmup": args.warmup, "compile": args.compile,
                "backend": args.backend}
    env = environment(device)
    print(f"council-fast bench {args.what}: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['cpu_threads']} threads, {args.precision}, {env['date']}")
    print(format_table(rows))
    if args.json:
        report = {"benchmark": args.what, "settings": settings, "environment": env,
                  "results": [asdict(r) for r in rows]}
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    # A failing compile or fused engine is a finding shown in the table; a failing reference is an error.
    return 1 if any(r.engine == REFERENCE and r.status != "ok" for r in rows) else 0
