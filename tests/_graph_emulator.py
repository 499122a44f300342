"""A CPU stand-in for CUDA graphs, to test graph capture of the training step without a GPU.

A CUDA graph is a fixed list of kernels on fixed memory: whatever a kernel read from the host at
capture time (a Python float, a host RNG draw, a shape-dependent choice) is baked in, a host read
inside the captured region (``.item()``, ``bool(t)``, ``.tolist()``) is an error, and capturing runs
nothing. :class:`RecordingCapturer` gives the same semantics on the CPU: ``capture`` runs the
function once under a dispatch mode that records every op (aten and custom) with the very tensors it
read and wrote, raises on any op that hands a value to the host, draws random numbers or has a
data-dependent output size, and afterwards restores every tensor that existed before the capture and
was written during it (so, as on a GPU, the capture changes no state); ``replay`` runs the recorded
ops again in order and writes each result into the tensor recorded at capture, as a graph's kernel
writes into the address it was captured with.

Not modelled: memory a graph reads after its owner freed it (the recorder keeps every tensor alive).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class HostReadDuringCapture(RuntimeError):
    pass


_HOST_READS = ("_local_scalar_dense",)
# Ops whose output size depends on tensor values: on a GPU they wait for the device (and cannot be
# captured), though on the CPU they do not.
_DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim", "repeat_interleave", "masked_scatter")
_BOOL_INDEXED = ("index", "index_put", "index_put_", "_index_put_impl_")
# Python-level ways out of a tensor that do not dispatch an op on CPU tensors.
_HOST_METHODS = ("tolist", "numpy", "cpu", "__array__")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.saved = {}  # storage pointer -> (live bytes, bytes before the capture)
        self.created = set()  # storages made during the capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function markers (Optimizer.step): not kernels
            return func(*args, **kwargs)
        _refuse_host_traffic(func, args)
        self._save_written(func, args, kwargs)
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        if any(v is not None and not isinstance(v, torch.Tensor) for v in flat):
            raise HostReadDuringCapture(f"{func} returned a host value ({out!r}) inside the captured region")
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.created.update(t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor))
        self.calls.append((func, args, kwargs, flat))
        return out

    def _save_written(self, func, args, kwargs) -> None:
        """Snapshots the storage of every pre-existing tensor ``func`` writes, once, before it does."""
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.created and key not in self.saved:
                    live = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                    self.saved[key] = (live, live.clone())

    def restore(self) -> None:
        with torch.no_grad():
            for live, before in self.saved.values():
                live.copy_(before)


def _refuse_host_traffic(func, args) -> None:
    name = func.__name__.split(".")[0]
    if name in _HOST_READS:
        raise HostReadDuringCapture(f"{func} reads a device value on the host inside the captured region")
    if name in _DATA_DEPENDENT or (name in _BOOL_INDEXED and _bool_index(args)):
        raise HostReadDuringCapture(f"{func} has a data-dependent output size: a GPU would synchronise "
                                    "inside the captured region")
    if name in ("lift_fresh", "lift_fresh_copy") and args and args[0].numel() > 1:
        # torch.tensor(host data) inside the capture: baked in as a constant. (0-dim ones, like Adam's
        # torch.tensor(1.0), are constants on purpose.)
        raise HostReadDuringCapture(f"{func}: a tensor made from host data inside the captured region is baked "
                                    "into the graph")
    if torch.Tag.nondeterministic_seeded in func.tags:
        raise HostReadDuringCapture(f"{func} draws random numbers inside the captured region: a replay would "
                                    "not draw them as eager execution does")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextlib.contextmanager
def _no_host_methods():
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostReadDuringCapture(f"Tensor.{name}() inside the captured region moves data to the host")
        return method

    originals = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}
    for name in _HOST_METHODS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


class RecordingCapturer:
    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.ops_recorded = 0

    def run_eager(self, fn):
        return fn()

    def capture(self, fn):
        recorder = _Recorder()
        try:
            with _no_host_methods(), recorder:
                outputs = fn()
        finally:
            recorder.restore()  # a capture changes nothing, even one that fails half-way
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
