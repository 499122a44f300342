"""The one registry of fused ops: back-end choice, output poisoning, fake implementations, autograd.

Back-ends: ``reference`` (plain PyTorch, any device), ``cpu`` (C++ extension, CPU tensors),
``triton`` (GPU; on the CPU only under TRITON_INTERPRET=1, which is how CI tests it) and ``cuda``
(C++/CUDA extension). Pick one by argument or COUNCIL_FAST_BACKEND; ``auto`` (the default) takes
the fastest available for the device and falls back with one warning, unless strict mode
(argument or COUNCIL_FAST_STRICT=1) asks for an error instead. An explicitly named back-end that
cannot run is always an error.

Each op file (adain.py, decoder_tail.py, winograd.py) keeps its kernels and its reference twin and
declares itself here once with :class:`FusedOp`: the schema of its functional forward (and
backward) op, which outputs those allocate, and one forward/backward pair per fused back-end.
The registry then defines ``torch.ops.council_fast.<name>`` (and ``<name>_backward``) with the
back-end as a trailing ``str backend`` argument, their fake (meta) implementations for
torch.compile (the same output allocation, on fake tensors), and the autograd formula. Kernels
write into the outputs the registry allocates; with poisoning on (:func:`poisoned_outputs`, which
tests/conftest.py turns on for every test, or COUNCIL_FAST_POISON_OUTPUTS=1) those start as NaN,
so an element a kernel forgets to write fails the comparison with the reference twin.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .extension import BackendUnavailable, load_extension

__all__ = ["BACKENDS", "FUSED_BACKENDS", "BackendUnavailable", "FusedOp", "OPS", "resolve_backend", "resolve",
           "strict_mode", "why_unavailable", "triton_available", "triton_interpreted", "triton_launch",
           "poisoned_outputs", "poisoning", "Outputs"]

BACKENDS = ("reference", "cpu", "triton", "cuda")
FUSED_BACKENDS = ("cpu", "triton", "cuda")
# What ``auto`` tries, fastest first, per device type; the reference back-end comes last everywhere.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
NAMESPACE = "council_fast"
_warned: set[str] = set()


# ----------------------------------------------------------------------------------------------
# Back-end resolution


def strict_mode(strict: bool | None = None) -> bool:
    if strict is not None:
        return bool(strict)
    return os.environ.get("COUNCIL_FAST_STRICT", "0").lower() in ("1", "true", "yes")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"triton cannot be imported ({e})"
    return None


def triton_available(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on ``device``, else the reason they cannot."""
    err = _triton_import_error()
    if err:
        return err
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    return f"triton runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not on {device.type}"


def why_unavailable(backend: str, device: torch.device | str, op: Optional[str] = None) -> str | None:
    """None when ``backend`` can run (``op``, if named) on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if op is not None and backend not in OPS[op].impls:
        return f"{op} has no {backend} implementation"
    if backend == "triton":
        return triton_available(device)
    if backend in ("cpu", "cuda") and device.type != backend:
        return f"the {backend} back-end runs on {backend.upper()} tensors, not on {device.type}"
    try:
        load_extension(backend)
    except BackendUnavailable as e:
        return str(e)
    return None


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(requested: str | None = None, device: torch.device | str = "cpu",
                    strict: bool | None = None, op: Optional[str] = None) -> str:
    """The back-end to use on ``device``: explicit > COUNCIL_FAST_BACKEND > automatic choice."""
    device = torch.device(device)
    requested = (requested or os.environ.get("COUNCIL_FAST_BACKEND") or "auto").lower()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown back-end {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
        reason = why_unavailable(requested, device, op)
        if reason:
            raise BackendUnavailable(f"back-end {requested!r} is unavailable: {reason}")
        return requested
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, ()):
        reason = why_unavailable(candidate, device, op)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    message = (f"council-fast: no fused back-end for {device.type} ({'; '.join(reasons) or 'none exists'}); "
               "falling back to the reference back-end")
    if strict_mode(strict):
        raise BackendUnavailable(message)
    _warn_once(message)
    return "reference"


@torch.compiler.assume_constant_result
def _resolve_constant(requested, device_type, device_index, strict, op) -> str:
    return resolve_backend(requested, torch.device(device_type, device_index), strict, op)


def resolve(requested: str | None, device: torch.device, strict: bool | None = None,
            op: Optional[str] = None) -> str:
    """:func:`resolve_backend` for a call site inside a model: a constant for torch.compile (the choice
    reads the environment and may build an extension, none of which belongs in a graph)."""
    return _resolve_constant(requested, device.type, device.index, strict, op)


def triton_launch(fn):
    """Runs a Triton launcher with the CUDA device of its first tensor argument made current.

    Triton launches on the current device's current stream; for tensors on another GPU (cuda:1 while
    cuda:0 is current) that would be the wrong device.
    """
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return fn(first, *args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------
# Output allocation and poisoning

_poison = os.environ.get("COUNCIL_FAST_POISON_OUTPUTS", "0") == "1"


def poisoning() -> bool:
    return _poison


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Fused outputs start as NaN inside this block (tests): an element a kernel never writes shows up."""
    global _poison
    before, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = before


class Outputs:
    """Allocates an op's outputs: NaN-filled while poisoning is on (never for fake tensors)."""

    def __init__(self, poison: bool):
        self.poison = poison

    def new(self, shape, dtype, device) -> torch.Tensor:
        if self.poison:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)  # keeps NCHW / channels_last
        return out.fill_(float("nan")) if self.poison else out


_FAKE = Outputs(poison=False)


# ----------------------------------------------------------------------------------------------
# Ops

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
OPS: dict[str, "FusedOp"] = {}


@dataclass(frozen=True)
class Impl:
    forward: Callable  # (*inputs, *outputs) -> None: writes the outputs
    backward: Optional[Callable] = None  # (*backward inputs, *grads) -> None: writes the grads


def _with_backend(schema: str) -> str:
    """``(args) -> ret`` with a trailing ``str backend`` argument."""
    m = re.fullmatch(r"\((.*)\)\s*->\s*(.+)", schema.strip(), re.S)
    if not m:
        raise ValueError(f"not an op schema: {schema!r}")
    return f"({m.group(1)}, str backend) -> {m.group(2)}"


class FusedOp:
    """One fused op: ``torch.ops.council_fast.<name>`` (+ ``<name>_backward``) and its impls per back-end.

    ``outputs(alloc, *inputs)`` returns the forward's output tensor(s) (``alloc``: an :class:`Outputs`);
    ``backward_outputs`` likewise for the backward. :meth:`register` adds a back-end's pair,
    :meth:`autograd` the formula tying the two ops together.
    """

    def __init__(self, name: str, reference: Callable, schema: str, outputs: Callable,
                 backward_schema: Optional[str] = None, backward_outputs: Optional[Callable] = None):
        if name in OPS:
            raise ValueError(f"op {name!r} is registered already")
        self.name, self.reference = name, reference
        self.impls: dict[str, Impl] = {}
        self.forward = self._define(name, schema, outputs, "forward")
        self.backward = None
        if backward_schema is not None:
            self.backward = self._define(f"{name}_backward", backward_schema, backward_outputs, "backward")
        OPS[name] = self

    def _define(self, qualname: str, schema: str, outputs: Callable, which: str):
        _LIB.define(qualname + _with_backend(schema))

        def run(*args):
            *inputs, backend = args
            result = outputs(Outputs(_poison), *inputs)
            written = result if isinstance(result, (tuple, list)) else (result,)
            getattr(self._impl(backend), which)(*inputs, *written)
            return result

        def fake(*args):
            return outputs(_FAKE, *args[:-1])

        _LIB.impl(qualname, run, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{qualname}", fake, lib=_LIB)
        return getattr(getattr(torch.ops, NAMESPACE), qualname).default

    def _impl(self, backend: str) -> Impl:
        impl = self.impls.get(backend)
        if impl is None:
            raise BackendUnavailable(f"{self.name} has no {backend!r} implementation "
                                     f"(it has {', '.join(sorted(self.impls)) or 'none'})")
        return impl

    def register(self, backend: str, forward: Callable, backward: Optional[Callable] = None) -> None:
        if backend not in FUSED_BACKENDS:
            raise ValueError(f"{self.name}: unknown fused back-end {backend!r}")
        if (backward is None) != (self.backward is None):
            raise ValueError(f"{self.name}: the {backend} back-end needs a backward exactly when the op has one")
        self.impls[backend] = Impl(forward, backward)

    def register_extension(self, forward: Callable, backward: Optional[Callable] = None) -> None:
        """The C++ kernels for both the cpu and the cuda back-end: ``forward(kind, *args)`` (and ``backward``)
        with ``kind`` naming the extension module to call."""
        for kind in ("cpu", "cuda"):
            self.register(kind, functools.partial(forward, kind),
                          None if backward is None else functools.partial(backward, kind))

    def autograd(self, backward: Callable, setup_context: Callable) -> None:
        torch.library.register_autograd(f"{NAMESPACE}::{self.name}", backward, setup_context=setup_context,
                                        lib=_LIB)

    def resolve(self, requested: str | None, device: torch.device, strict: bool | None = None) -> str:
        """The back-end this op runs on for ``device`` (see :func:`resolve`)."""
        return resolve(requested, device, strict, self.name)
