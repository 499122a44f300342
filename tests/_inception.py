"""Random FID-Inception weights in the weights file's exact format (key names, shapes, dtypes), for tests:
the real pt_inception-2015-12-05-6726825d.pth cannot be downloaded in CI."""
from __future__ import annotations

import math

import torch

from council_fast.metrics import FIDInceptionV3


def random_inception_state(seed: int = 0, batches_tracked: bool = True) -> dict:
    """Variance-preserving random weights: He-normal convs, batch norms near identity with random
    running statistics, so activations neither vanish nor explode through the ~95 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            if batches_tracked:
                state[key] = torch.zeros_like(t)
        elif key.endswith("conv.weight"):
            fan_in = t[0].numel()
            state[key] = torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = 0.75 + 0.5 * torch.rand(t.shape, generator=g)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(t.shape, generator=g)
        else:  # fc
            state[key] = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1])
    return state


def save_random_inception(path, seed: int = 0, batches_tracked: bool = True) -> str:
    torch.save(random_inception_state(seed, batches_tracked), path)
    return str(path)
