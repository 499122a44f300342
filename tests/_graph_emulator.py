"""A CPU stand-in for CUDA graphs, to test graph capture of the training step without a GPU.

A CUDA graph is a fixed list of kernels on fixed memory: whatever a kernel read from the host at
capture time (a Python float, a host RNG draw, a shape-dependent choice) is baked in, and a host read
inside the captured region (``.item()``, ``bool(t)``) is an error. :class:`RecordingCapturer` gives the
same semantics on the CPU: ``capture`` runs the function once under a dispatch mode that records
every op (aten and custom) with the very tensors it read and wrote, and raises on any op that hands a
value to the host; ``replay`` runs the recorded ops again in order and writes each result into the
tensor recorded at capture, as a graph's kernel writes into the address it was captured with.
(Unlike a CUDA capture, the recording run executes: ``executes_on_capture`` tells the caller.)
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class HostReadDuringCapture(RuntimeError):
    pass


# A host value made into a tensor (torch.tensor(1.0)) is baked into a graph as a constant, as it is
# here: a changing one shows up as a replay that differs from eager execution, not as an error.
_HOST_READS = ("_local_scalar_dense",)
# Ops whose output size depends on tensor values: on a GPU they wait for the device (and cannot be
# captured), though on the CPU they do not.
_DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim", "repeat_interleave", "masked_scatter")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function markers (Optimizer.step): not kernels
            return func(*args, **kwargs)
        if func.__name__.split(".")[0] in _HOST_READS:
            raise HostReadDuringCapture(f"{func} reads a device value on the host inside the captured region")
        name = func.__name__.split(".")[0]
        if name in _DATA_DEPENDENT or (name == "index" and _bool_index(args)):
            raise HostReadDuringCapture(f"{func} has a data-dependent output size: a GPU would synchronise "
                                        "inside the captured region")
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        if any(v is not None and not isinstance(v, torch.Tensor) for v in flat):
            raise HostReadDuringCapture(f"{func} returned a host value ({out!r}) inside the captured region")
        self.calls.append((func, args, kwargs, flat))
        return out


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


class RecordingCapturer:
    executes_on_capture = True

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.ops_recorded = 0

    def run_eager(self, fn):
        return fn()

    def capture(self, fn):
        recorder = _Recorder()
        with recorder:
            outputs = fn()
        calls = recorder.calls
        self.captures += 1
        self.ops_recorded += len(calls)

        def replay():
            with torch.no_grad():
                for func, args, kwargs, recorded in calls:
                    fresh, _ = tree_flatten(func(*args, **kwargs))
                    for old, new in zip(recorded, fresh):
                        if isinstance(old, torch.Tensor) and old is not new and not _same_memory(old, new):
                            old.copy_(new)
            self.replays += 1

        return replay, outputs
