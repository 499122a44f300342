"""Per-member evaluation: translate a domain's test images with each council member, extract FID
Inception features, and score FID / KID against the target domain's test images.

Translations are rounded to 8 bits (exactly as writing them as PNG files would) before their features
are taken, so the numbers are those a FID tool would give on the converted folders. The style codes
are drawn once from ``seed`` and shared by every member (a fair comparison). The source images
themselves are scored too: "how far is the untranslated input from the target domain", the number a
useful translator should beat.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..evalrecord import EvalRecord
from .fid import fid_from_features, kid_from_features
from .inception import FIDInceptionV3

__all__ = ["Translate", "quantize_8bit", "extract_features", "style_codes", "member_features", "score",
           "evaluate_members", "format_table", "Evaluator"]

# translate(member, images (B, C, H, W) in [-1, 1], style codes (B, style_dim, 1, 1)) -> images in [-1, 1]
Translate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
SOURCE = "source"


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 256 levels a PNG holds (as images.tensor_to_pil rounds), back in [-1, 1]."""
    levels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return levels / 127.5 - 1


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.inference_mode()
def extract_features(model: FIDInceptionV3, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    """(N, 2048) float64 pool3 features of (N, C, H, W) images in [-1, 1] (8-bit rounded first)."""
    device = model.fc.weight.device
    out = [model.features(quantize_8bit(_rgb(images[i:i + batch])).to(device)).double().cpu()
           for i in range(0, images.shape[0], batch)]
    return torch.cat(out).numpy()


def style_codes(count: int, style_dim: int, seed: int) -> torch.Tensor:
    """``count`` style codes z ~ N(0, I), (count, style_dim, 1, 1), the same for a given seed everywhere."""
    return torch.randn(count, style_dim, 1, 1, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def member_features(model: FIDInceptionV3, translate: Translate, members: Sequence[int], images: torch.Tensor,
                    z: torch.Tensor, batch: int = 32) -> dict[int, np.ndarray]:
    """Features of each member's translations of ``images`` with style codes ``z``: each image once per style
    (``z`` holds ``styles * N`` codes, style-major). Batches outside, members inside: all members see a
    batch in turn, so a translator that computes every member at once can reuse its result."""
    n = images.shape[0]
    feats: dict[int, list[np.ndarray]] = {int(k): [] for k in members}
    for s in range(z.shape[0] // n):
        for i in range(0, n, batch):
            x = images[i:i + batch]
            zb = z[s * n + i:s * n + i + x.shape[0]]
            for k in feats:
                feats[k].append(extract_features(model, translate(k, x, zb).float().cpu(), batch))
    return {k: np.concatenate(v) for k, v in feats.items()}


def score(features: np.ndarray, target: np.ndarray, kid_subsets: int = 100, kid_subset_size: int = 1000,
          seed: int = 0) -> dict:
    kid = kid_from_features(features, target, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {"fid": fid_from_features(features, target), "kid_mean": kid.mean, "kid_std": kid.std,
            "kid_subset_size": kid.subset_size, "images": int(features.shape[0])}


def evaluate_members(model: FIDInceptionV3, translate: Translate, members: Sequence[int], source: torch.Tensor,
                     target: torch.Tensor | np.ndarray, style_dim: int, styles: int = 1, seed: int = 0,
                     batch: int = 32, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     source_features: np.ndarray | None = None) -> dict:
    """{"members": {k: scores}, "source": scores, ...}; ``target`` is images or their features."""
    target_features = target if isinstance(target, np.ndarray) else extract_features(model, target, batch)
    if source_features is None:
        source_features = extract_features(model, source, batch)
    z = style_codes(styles * source.shape[0], style_dim, seed)
    feats = member_features(model, translate, members, source, z, batch)
    results = {k: score(f, target_features, kid_subsets, kid_subset_size, seed) for k, f in feats.items()}
    return {"members": results, SOURCE: score(source_features, target_features, kid_subsets, kid_subset_size, seed),
            "target_images": int(target_features.shape[0]), "source_images": int(source.shape[0]),
            "styles": styles, "kid_subsets": kid_subsets, "seed": seed}


def format_table(result: dict) -> str:
    """A text table: one row per member, then the untranslated source images."""
    rows = [(f"member {k}", s) for k, s in sorted(result["members"].items())]
    rows.append(("source images", result[SOURCE]))
    lines = [f"{'':<16}{'FID':>10}{'KID mean':>12}{'KID std':>11}{'images':>8}"]
    for name, s in rows:
        lines.append(f"{name:<16}{s['fid']:>10.3f}{s['kid_mean']:>12.5f}{s['kid_std']:>11.5f}{s['images']:>8d}")
    best = min(result["members"], key=lambda k: result["members"][k]["fid"]) if result["members"] else None
    if best is not None:
        lines.append(f"best member by FID: {best}")
    return "\n".join(lines)


class Evaluator:
    """Evaluation during training: every ``every`` iterations, the same evaluation on a fixed subset of
    the test images (the first ``source.shape[0]`` of each domain). Target and source features are
    computed once, at the first evaluation. ``record`` keeps the latest scores and each member's best."""

    def __init__(self, model: FIDInceptionV3, source: torch.Tensor, target: torch.Tensor, members: Sequence[int],
                 style_dim: int, every: int, styles: int = 1, seed: int = 0, batch: int = 32,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, record: EvalRecord | None = None):
        if every < 1:
            raise ValueError(f"evaluation interval must be at least 1, got {every}")
        self.model, self.source, self.target = model, source, target
        self.members, self.style_dim, self.every, self.styles = list(members), style_dim, every, styles
        self.seed, self.batch = seed, batch
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.record = record or EvalRecord()
        self._target_features: np.ndarray | None = None
        self._source_features: np.ndarray | None = None

    def due(self, iteration: int) -> bool:
        return iteration > 0 and iteration % self.every == 0

    def run(self, iteration: int, translate: Translate) -> dict:
        """Evaluate now; returns the scalars to log (eval/fid/<k>, eval/kid_mean/<k>, ..., eval/fid/source)."""
        if self._target_features is None:
            self._target_features = extract_features(self.model, self.target, self.batch)
            self._source_features = extract_features(self.model, self.source, self.batch)
        result = evaluate_members(self.model, translate, self.members, self.source, self._target_features,
                                  self.style_dim, self.styles, self.seed, self.batch, self.kid_subsets,
                                  self.kid_subset_size, self._source_features)
        self.record.update(iteration, {k: s["fid"] for k, s in result["members"].items()},
                           {k: s["kid_mean"] for k, s in result["members"].items()})
        return self.scalars(result)

    def maybe_run(self, iteration: int, translate: Translate) -> dict:
        return self.run(iteration, translate) if self.due(iteration) else {}

    @staticmethod
    def scalars(result: dict) -> dict:
        out = {}
        for name, s in [(str(k), s) for k, s in result["members"].items()] + [(SOURCE, result[SOURCE])]:
            out |= {f"eval/fid/{name}": s["fid"], f"eval/kid_mean/{name}": s["kid_mean"],
                    f"eval/kid_std/{name}": s["kid_std"]}
        return out
