"""Fused kernels, one family per module, each beside its reference twin, behind one registry.

registry.py chooses back-ends and defines the torch ops; extension.py builds csrc/; adain.py,
decoder_tail.py, winograd.py and upsample_conv.py hold the kernels and their reference twins.
"""
from .extension import BackendUnavailable, cached_build, load_extension
from .registry import BACKENDS, resolve_backend, strict_mode, why_unavailable

__all__ = ["BACKENDS", "BackendUnavailable", "cached_build", "load_extension", "resolve_backend", "strict_mode",
           "why_unavailable"]
