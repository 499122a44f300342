"""Which kernel back-ends a test may use here: those that cannot are skipped with the reason, and one
that should run here (the CPU extension, Triton under its interpreter, the CUDA kernels under the
emulator) but cannot is a failure.

``cuda-emulated`` is the cuda back-end on CPU tensors, its kernels run by tests/_cuda_emulator.py; it
stands in for ``cuda`` on machines without a GPU and is skipped where the real one runs."""
from __future__ import annotations

import pytest
import torch

from council_fast.ops import registry

HAS_CUDA = torch.cuda.is_available()
# A test parametrised over devices: the CPU everywhere, the GPU case marked gpu and skipped without one.
CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA, reason="the GPU case needs a CUDA device; this machine has none")])]


# A fused back-end parametrisation: every back-end, the CUDA kernels emulated where no GPU is.
FUSED = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu), "cuda-emulated"]


def device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and HAS_CUDA else "cpu"


def require_backend(name: str, monkeypatch=None) -> str:
    """The back-end to pass to council_fast for the test case ``name`` (``cuda-emulated`` needs monkeypatch)."""
    if name == "cuda-emulated":
        if HAS_CUDA:
            pytest.skip("the real cuda back-end runs on this machine")
        import _cuda_emulator
        return _cuda_emulator.install(monkeypatch)
    if name == "cuda" and not HAS_CUDA:
        pytest.skip("the cuda back-end needs a CUDA device; this machine has none")
    if name == "triton" and not HAS_CUDA and not registry.triton_interpreted():
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1 set before the test session starts")
    reason = registry.why_unavailable(name, torch.device(device_for(name)))
    assert reason is None, f"back-end {name!r} should run here but cannot: {reason}"
    return name
