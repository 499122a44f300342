"""Measuring: timing a callable, counting its launches, the environment a number was taken in,
the result rows and their table.

Every timing is the median over ``repeats`` runs after ``warmup`` untimed runs (the first of which
includes any compilation), the device synchronised around each run. ``measure_interleaved`` times
several callables round-robin (the CPU's way: a shared machine's load drifts hit all alike).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ..version import __version__

__all__ = ["BenchRow", "time_callable", "count_launches", "environment", "measure", "measure_interleaved",
           "add_launches", "rel_diff", "short", "speedups", "format_table", "RESULT_FIELDS", "ENVIRONMENT_FIELDS",
           "REFERENCE", "COMPILED", "FUSED"]

RESULT_FIELDS = ("name", "engine", "status", "reason", "median_ms", "min_ms", "mean_ms", "times_ms", "img_per_s",
                 "speedup", "peak_mem_mib", "first_call_s", "max_rel_diff")
ENVIRONMENT_FIELDS = ("date", "council_fast", "python", "torch", "triton", "cuda", "device", "device_name",
                      "cpu_model", "cpu_threads", "cpu_count", "platform", "load_average")
REFERENCE, COMPILED, FUSED = "reference", "reference+compile", "fused"


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


def add_launches(row: BenchRow, call, device: torch.device) -> None:
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


def short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def rel_diff(out, ref) -> float:
    out = out[0] if isinstance(out, (tuple, list)) else out
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    scale = ref.detach().float().abs().max().clamp_min(1e-12)
    return float((out.detach().float() - ref.detach().float()).abs().max() / scale)


def speedups(rows: list[BenchRow]) -> list[BenchRow]:
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
    """Triton is an optional extra: its version, or None when it is not installed or not importable."""
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "not installed / not importable"
        return None


def environment(device: torch.device) -> dict:
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


# --------------------------------------------------------------------------- measuring rows

def measure(row: BenchRow, call, device, warmup, repeats, images, reference_out=None) -> BenchRow:
    try:
        timing = time_callable(call, device, warmup, repeats)
        if reference_out is not None:
            row.max_rel_diff = rel_diff(call(), reference_out)
    except Exception as e:  # noqa: BLE001 - compile and kernel failures are reported in the table
        row.status, row.reason = "failed", short(e)
        return row
    add_launches(row, call, torch.device(device))
    return _fill(row, timing, images)


def measure_interleaved(built: list, warmup: int, repeats: int, images: int) -> None:
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
            row.status, row.reason = "failed", short(e)
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
                row.status, row.reason = "failed", short(e)
        live = [(row, call) for row, call in live if row.status == "ok"]
    for row, call in live:
        _fill(row, timings[id(row)], images)
        if row.engine != COMPILED:  # see count_launches
            add_launches(row, call, torch.device("cpu"))


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
