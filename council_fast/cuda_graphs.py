"""Replay fixed-shape inference calls as CUDA graphs (conversion and its benchmark).

A generator call at batch 1 launches a few hundred small kernels; on a fast GPU the launches, not
the arithmetic, set the latency. :class:`GraphedCall` captures a call once per input shape into a
CUDA graph and replays it: inputs are copied into the graph's static buffers, one launch runs
everything. A batch smaller than the captured one (the last, partial batch of a folder) runs in the
same graph: its rows are copied over the first rows of the static inputs, the other rows keep the
previous batch's values, and since every op of the generator works per sample (instance norm,
AdaIN, convolutions), they cannot change the real rows; only those are returned.

The returned tensors are views of the graph's static outputs: valid until the next call of the same
``GraphedCall`` (copy them, e.g. ``.cpu()``, before calling again). Capture runs under the caller's
grad mode; call it under ``torch.inference_mode()``, always (static buffers made in inference mode
cannot be written outside it). Capture and replay run on the inputs' device, on a side stream. If a
capture fails (an op that synchronises with the host, say) the call falls back to eager execution
with one warning, or raises in strict mode (COUNCIL_FAST_STRICT=1).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .ops import strict_mode

__all__ = ["GraphedCall", "CudaGraphCapturer", "CudaGraphError"]


class CudaGraphError(RuntimeError):
    """CUDA graph capture failed in strict mode."""


class CudaGraphCapturer:
    """Captures callables as CUDA graphs on one device; warm-ups and captures share one side stream.

    The interface both graph users (:class:`GraphedCall`, :mod:`council_fast.training.graphs`) work
    through, so tests can put a CPU emulation in its place: ``run_eager(fn)`` and ``capture(fn) ->
    (replay, outputs)``; capturing records ``fn``'s kernels without running them. Each graph has its
    own memory pool: a shared pool is only safe when graphs replay in capture order.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._stream = None

    @property
    def stream(self) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def run_eager(self, fn: Callable):
        """``fn()`` on the capture stream (the capture recipe's warm-up: kernel JIT builds, autotuning,
        cuBLAS/cuDNN plans, lazily created optimizer states happen here, not during capture)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            try:
                with torch.cuda.stream(self.stream):
                    return fn()
            finally:
                current.wait_stream(self.stream)

    def capture(self, fn: Callable):
        """``(replay, outputs)``: ``replay()`` reruns ``fn``'s kernels; ``outputs`` are its static results."""
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                outputs = fn()

        def replay():
            with torch.cuda.device(self.device):
                graph.replay()

        replay.graph = graph  # keeps the graph (and its memory pool) alive as long as the replay function
        return replay, outputs


@dataclass
class _Captured:
    replay: Callable[[], None]
    capacity: int
    inputs: list[torch.Tensor]
    outputs: object  # a tensor or a tuple of tensors


class GraphedCall:
    """``fn(*inputs)`` for CUDA tensors sharing their first (batch) dimension, replayed as CUDA graphs.

    ``capacity``: the batch size to capture at (default: the first call's); smaller batches replay
    the same graph, larger ones capture a new one. ``capturer``: replaces the CUDA-graph capturer
    (tests emulate graphs on the CPU with it); default: one :class:`CudaGraphCapturer` per device.
    """

    def __init__(self, fn: Callable, name: str = "call", warmup: int = 2, strict: bool | None = None,
                 capacity: int | None = None, capturer=None):
        self.fn, self.name, self.warmup, self.capacity = fn, name, warmup, capacity
        self.strict = strict_mode(strict)
        self.captured: dict[tuple, _Captured] = {}
        self.failed: dict[tuple, str] = {}
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self._capturer = capturer
        self._cuda_capturers: dict[torch.device, CudaGraphCapturer] = {}

    def _capturer_for(self, device: torch.device):
        if self._capturer is not None:
            return self._capturer
        return self._cuda_capturers.setdefault(device, CudaGraphCapturer(device))

    def __call__(self, *inputs: torch.Tensor):
        _check_inputs(inputs, self.name, cuda=self._capturer is None)
        n = inputs[0].shape[0]
        key = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs)
        if key in self.failed:
            return self.fn(*inputs)
        entry = self.captured.get(key)
        if entry is None or entry.capacity < n:
            capturer = self._capturer_for(inputs[0].device)
            try:
                entry = self._capture(capturer, inputs, max(n, self.capacity or 0))
            except Exception as e:  # noqa: BLE001 - any capture failure means "run eagerly"
                return self._give_up(key, e, inputs)
            self.captured[key] = entry
        for static, t in zip(entry.inputs, inputs):
            static[:n].copy_(t)
        entry.replay()
        return _rows(entry.outputs, n)

    def _capture(self, capturer, inputs, capacity: int) -> _Captured:
        n = inputs[0].shape[0]
        static = []
        for t in inputs:
            buf = torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            buf[:n].copy_(t)
            buf[n:].copy_(t[:1].expand(capacity - n, *t.shape[1:]))  # real rows: finite values
            static.append(buf)
        for _ in range(self.warmup):
            capturer.run_eager(lambda: self.fn(*static))
        replay, outputs = capturer.capture(lambda: self.fn(*static))
        self.captures += 1
        return _Captured(replay, capacity, static, outputs)

    def _give_up(self, key, error: Exception, inputs):
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.strict:
            raise CudaGraphError(f"council-fast: CUDA graph capture of {self.name} failed ({reason})") from error
        self.failed[key] = reason
        warnings.warn(f"council-fast: CUDA graph capture of {self.name} failed ({reason}); running it eagerly",
                      RuntimeWarning, stacklevel=3)
        return self.fn(*inputs)


def _check_inputs(inputs, name: str, cuda: bool = True) -> None:
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{name}: CUDA graphs take tensor arguments only")
    if cuda and any(t.device.type != "cuda" for t in inputs):
        raise ValueError(f"{name}: CUDA graphs need CUDA tensors, got {[str(t.device) for t in inputs]}")
    n = inputs[0].shape[0] if inputs[0].dim() else None
    if n is None or any(t.dim() == 0 or t.shape[0] != n for t in inputs):
        raise ValueError(f"{name}: all inputs must share their first (batch) dimension")


def _rows(outputs, n: int):
    if isinstance(outputs, torch.Tensor):
        return outputs[:n]
    return type(outputs)(_rows(o, n) for o in outputs)
