"""The one place where serving calls the conversion library (loading generators, translating batches).

Everything here mirrors ``council-fast convert`` so that a request and a convert run agree bit for
bit: the same checkpoint loading (every kind convert accepts), the same test transform (shorter side
to ``size``, centre crop), the same style codes (they depend only on the seed and the input's name
stem, as convert's depend on its output name) and the same per-member encode-once / decode-in-chunks
order at the same batch size.

On a GPU each batch-size bucket (1, 2, 4, ... up to --max-batch) gets its own converter whose encode
and decode are replayed as CUDA graphs captured at that bucket's size (fp32, or the fused engine at
any precision): a batch of n runs in the smallest bucket >= n. On the CPU everything runs eagerly,
and batches are capped at the batch limit (``cpu_batch``): by default the warm-up times batches of
1, 2, 4, ... at the config's size and keeps the size with the least time per image. Bigger is not
always cheaper there: a 256x256 generator pass already keeps two cores busy at batch 1, and larger
batches spill the caches (selfie2anime, 2 cores: 390 ms per image at batch 1, 530 at batch 4), while
small models gain from amortised per-op overhead.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import torch
from PIL import Image

from ..conversion import check_size
from ..inference import ConvertError, Converter, draw_plan, image_tensor, load_generators, split_backend
from ..runtime import resolve_device

__all__ = ["ServingEngine", "EngineError", "Work", "style_codes", "buckets", "AUTO"]

EngineError = ConvertError
AUTO = "auto"
# The tuning climbs to the next batch size only while it cuts the time per image by this factor at least,
# and stops once a size costs this much more per image than the best.
BETTER, WORSE = 0.95, 1.25


def buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def safe_stem(filename: str | None) -> str:
    """The stem convert would use for a file of this name (``photo.jpg`` -> ``photo``); 'image' if none."""
    base = os.path.basename((filename or "").replace("\\", "/"))
    stem = os.path.splitext(base)[0]
    return stem if stem and not re.search(r"[\x00-\x1f]", stem) else "image"


def style_codes(seed: int, stem: str, styles: int, style_dim: int) -> torch.Tensor:
    """(styles, style_dim) codes z ~ N(0, I), exactly those convert draws for an input named ``stem``."""
    return draw_plan(seed, stem, [0], "all", styles, style_dim)[1]


@dataclass
class Work:
    """One request's share of a batch: the input tensor, the members that translate it, its style codes."""
    x: torch.Tensor  # (C, size, size) in [-1, 1]
    members: list[int]
    z: torch.Tensor  # (styles, style_dim)


class ServingEngine:
    """Loaded generators plus the converters that run them; ``run(works)`` translates one batch."""

    def __init__(self, checkpoint: str, config: str | None = None, direction: str | None = None,
                 device: str | None = None, precision: str = "fp32", backend: str = "auto",
                 max_batch: int = 32, cuda_graphs: bool | None = None, cpu_batch: int | str = AUTO):
        if max_batch < 1:
            raise EngineError(f"--max-batch must be at least 1, got {max_batch}")
        if cpu_batch != AUTO and (not isinstance(cpu_batch, int) or cpu_batch < 1):
            raise EngineError(f"--cpu-batch must be 'auto' or at least 1, got {cpu_batch!r}")
        self.device = resolve_device(device)
        engine, kernels = split_backend(backend)
        gens = load_generators(checkpoint, config, "all", engine, self.device, precision, direction, kernels)
        self.config, self.engine, self.source = gens.config, gens.engine, gens.source
        self.members = sorted(gens)
        self.size = int(gens.config["new_size"])
        self.size_factor = 2 ** gens.config["gen"]["n_downsample"]
        self.input_dim = gens.input_dim
        self.style_dim = gens.style_dim
        self.precision, self.max_batch = precision, max_batch
        self.cpu_batch = cpu_batch
        # Requests per model batch: max_batch on a GPU; on the CPU cpu_batch, or (auto) set by warm_up().
        self.batch_limit = max_batch if self.device.type == "cuda" or cpu_batch == AUTO else min(cpu_batch, max_batch)
        self.tuning_ms: dict[int, float] = {}  # batch size -> ms per image, as the warm-up measured it
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.buckets = buckets(max_batch) if graphs else [max_batch]
        self._converters = {b: Converter(gens, self.device, precision, style_dim=self.style_dim,
                                         cuda_graphs=graphs, graph_batch=b) for b in self.buckets}

    def check_size(self, size: int) -> None:
        check_size(size, self.config)

    def prepare(self, im: Image.Image, size: int) -> torch.Tensor:
        """The model input for a photo, as convert makes it."""
        return image_tensor(im, size, self.input_dim)

    def _converter(self, n: int):
        return self._converters[next(b for b in self.buckets if b >= n)]

    def run(self, works: list[Work]) -> list[dict[tuple[int, int], torch.Tensor]]:
        """Translate a batch (all of one size): per work, {(member, style): (C, H, W) float image on the CPU}.

        As convert's batch step: per member, the inputs that want it are encoded once together, then
        their (input, style) pairs decoded in chunks of at most batch_limit."""
        x = torch.stack([w.x for w in works])
        results: list[dict] = [{} for _ in works]
        for member in sorted({m for w in works for m in w.members}):
            idx = [i for i, w in enumerate(works) if member in w.members]
            self._member(member, idx, x[idx], works, results)
        return results

    def _member(self, member: int, idx: list[int], x: torch.Tensor, works: list[Work], results) -> None:
        conv = self._converter(len(idx))
        content = conv.encode(member, x)
        pairs = [(pos, s) for pos in range(len(idx)) for s in range(works[idx[pos]].z.shape[0])]
        for start in range(0, len(pairs), self.batch_limit):
            chunk = pairs[start:start + self.batch_limit]
            sel = torch.tensor([pos for pos, _ in chunk])
            z = torch.stack([works[idx[pos]].z[s] for pos, s in chunk])
            dec = self._converter(len(chunk))
            out = dec.decode(member, None if content is None else content[sel.to(content.device)], z, x[sel]).cpu()
            for row, (pos, s) in enumerate(chunk):
                results[idx[pos]][(member, s)] = out[row]

    def warm_up(self) -> None:
        """One batch per bucket (captures the CUDA graphs, builds kernels) before the server says ready;
        on the CPU one batch of one, then (cpu_batch 'auto') the batch-limit tuning."""
        on_gpu = self.device.type == "cuda"
        for b in (self.buckets if on_gpu else [1]):
            self.run(self._warm_works(b))
        if not on_gpu and self.cpu_batch == AUTO:
            self.batch_limit = self.tune_cpu_batch()

    def _warm_works(self, n: int) -> list[Work]:
        rng = torch.Generator().manual_seed(0)
        return [Work(torch.rand(self.input_dim, self.size, self.size, generator=rng) * 2 - 1, list(self.members),
                     torch.randn(1, self.style_dim, generator=rng)) for _ in range(n)]

    def tune_cpu_batch(self) -> int:
        """The batch size (1, 2, 4, ... up to max_batch) with the least time per image at the config's size,
        each timed as the better of two runs; fills ``tuning_ms``."""
        best, best_ms = 1, math.inf
        for b in buckets(self.max_batch):
            works = self._warm_works(b)
            ms = min(self._timed(works) for _ in range(2)) * 1e3 / b
            self.tuning_ms[b] = ms
            if ms < best_ms * BETTER:
                best, best_ms = b, ms
            elif ms > best_ms * WORSE:
                break
        return best

    def _timed(self, works: list[Work]) -> float:
        start = time.perf_counter()
        self.run(works)
        return time.perf_counter() - start
