"""A tiny-config generator with random weights whose outputs depend visibly on the input and the style."""
from __future__ import annotations

import torch

from council_fast.reference.networks import AdaINGen


def tiny_generator(cfg: dict, seed: int, random_biases: bool = False) -> AdaINGen:
    """AdaINGen of ``cfg`` seeded with ``seed``. The default init saturates the attention masks, which hides
    the input: the mask filters are scaled down (mask biases -0.05, or with ``random_biases`` every bias drawn
    from N(0, 0.1^2)), and the style MLP's last layer scaled up so the AdaIN parameters are of order 1."""
    torch.manual_seed(seed)
    gen = AdaINGen(cfg["input_dim_b"], cfg["gen"]).eval()
    last = gen.dec.model[-1].conv
    masks = cfg["gen"]["num_of_mask_dim_to_add"]
    with torch.no_grad():
        if random_biases:
            for name, p in gen.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
        else:
            last.bias[-masks:] = -0.05
        last.weight[-masks:] *= 0.1
        gen.mlp.model[-1].fc.weight *= 8
    return gen
