"""Fused kernels, one family per module, each beside its reference twin."""
from ._backend import BACKENDS, BackendUnavailable, resolve_backend

__all__ = ["BACKENDS", "BackendUnavailable", "resolve_backend"]
