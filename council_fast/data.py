"""Training and test images in the official Council-GAN folder layout.

``data_root/{trainA,trainB,testA,testB}/*.jpg|jpeg|png|webp|bmp``. The training transform is the
official one, in the official order: random grayscale (p = RandomGrayscale_P), random horizontal
flip, shorter side resized to new_size (bilinear), random crop to (crop_image_height,
crop_image_width), scaled to [-1, 1]. Test images: shorter side to new_size, centre crop, [-1, 1].

Everything random is derived from (seed, domain, epoch, index), so the pipeline restarts exactly
from its state (epoch and per-domain position); that state is part of a full-state checkpoint.
Like the official loop (``zip`` over the two loaders) an epoch ends when either domain cannot
fill another batch (drop_last); both domains are then reshuffled.

Two deliberate differences from the official loader, which does ``Image.open(p).convert('RGB')``:
images are read through :func:`council_fast.images.open_rgb`, so EXIF-rotated photos are turned
upright and transparent pixels are composited on white (the official code trains on sideways phone
selfies and on whatever colour the transparent pixels hold); and only the domain folder itself is
listed (the official loader also walks sub-folders).
"""
from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import IMAGE_EXTENSIONS, ImageReadError, center_crop, open_rgb, pil_to_tensor, resize_shorter

__all__ = ["DataError", "DOMAIN_FOLDERS", "list_images", "TrainTransform", "TrainPairLoader",
           "load_test_images", "make_synthetic_dataset", "make_shapes_dataset", "SHAPES_B_TO_A"]

DOMAIN_FOLDERS = {"A": "trainA", "B": "trainB"}
TEST_FOLDERS = {"A": "testA", "B": "testB"}
# Augmentations of the official data code that council-fast does not implement (yet).
_UNSUPPORTED_AUGMENTATIONS = ("do_VerticalFlip", "do_ColorJitter_A", "do_ColorJitter_B", "do_RandomRotation",
                              "do_RandomAffine", "do_RandomPerspective", "do_RandomResizedCrop")


class DataError(ValueError):
    """A data folder is missing, too small, or asks for something unsupported; names the folder/key."""


def list_images(folder: str | os.PathLike, min_count: int = 1) -> list[str]:
    """Sorted image files directly inside ``folder`` (by extension, case-insensitive)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: image folder not found (expected the official layout "
                        f"data_root/{{trainA,trainB,testA,testB}})")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
    if len(paths) < min_count:
        raise DataError(f"{folder}: holds {len(paths)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"at least {min_count} needed")
    return paths


@dataclass(frozen=True)
class TrainTransform:
    new_size: int
    crop: tuple[int, int]  # (height, width)
    grayscale_p: float  # 0 when do_RandomGrayscale is off
    hflip: bool

    @classmethod
    def from_config(cls, config: dict) -> "TrainTransform":
        for key in _UNSUPPORTED_AUGMENTATIONS:
            if config.get(key):
                raise NotImplementedError(f"config key {key!r}: true is not supported by council-fast's data "
                                          "pipeline yet; set it to false")
        if config["inbalenceDataSets"]["imbalance_sub_dataset"]:
            raise NotImplementedError("config key 'inbalenceDataSets.imbalance_sub_dataset': true is not "
                                      "supported by council-fast's data pipeline yet")
        if config["input_dim_a"] != 3 or config["input_dim_b"] != 3:
            raise NotImplementedError("config keys 'input_dim_a'/'input_dim_b': only RGB (3) is supported")
        crop = (config["crop_image_height"], config["crop_image_width"])
        if config["new_size"] < min(crop):
            raise DataError(f"config key 'new_size' ({config['new_size']}) is smaller than the crop {crop}")
        p = config["RandomGrayscale_P"] if config["do_RandomGrayscale"] else 0.0
        return cls(config["new_size"], crop, float(p), bool(config["do_HorizontalFlip"]))

    def __call__(self, im: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.grayscale_p > 0 and rng.random() < self.grayscale_p:
            im = im.convert("L").convert("RGB")
        if self.hflip and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im = resize_shorter(im, self.new_size)
        h, w = self.crop
        if im.size[1] < h or im.size[0] < w:
            raise DataError(f"image of size {im.size} after resizing is smaller than the crop {self.crop}")
        top = rng.randint(0, im.size[1] - h)
        left = rng.randint(0, im.size[0] - w)
        return pil_to_tensor(im.crop((left, top, left + w, top + h)))


class TrainPairLoader:
    """Endless deterministic batches (x_a, x_b) from trainA and trainB.

    ``state()`` / ``load_state()`` give the position; a loader restored to a state yields exactly the
    batches the original would have yielded next.
    """

    def __init__(self, data_root: str | os.PathLike, config: dict, seed: int, num_threads: int | None = None):
        self.batch_size = config["batch_size"]
        self.transform = TrainTransform.from_config(config)
        self.seed = int(seed)
        root = os.fspath(data_root)
        self.paths = {d: list_images(os.path.join(root, f), self.batch_size) for d, f in DOMAIN_FOLDERS.items()}
        self.bad: set[str] = set()
        self.epoch = 0
        self.positions = {d: 0 for d in DOMAIN_FOLDERS}
        self._orders = {}
        threads = config.get("num_workers", 0) if num_threads is None else num_threads
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads and threads > 1 else None

    def __len__(self) -> int:
        """Batches per epoch (before any unreadable image is skipped)."""
        return min(len(p) for p in self.paths.values()) // self.batch_size

    def state(self) -> dict:
        return {"epoch": self.epoch, "positions": dict(self.positions)}

    def load_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.positions = {d: int(state["positions"][d]) for d in DOMAIN_FOLDERS}

    def _order(self, domain: str) -> list[int]:
        key = (domain, self.epoch)
        if key not in self._orders:
            order = list(range(len(self.paths[domain])))
            random.Random(f"{self.seed}/{domain}/{self.epoch}/order").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[1] == self.epoch}
            self._orders[key] = order
        return self._orders[key]

    def _load(self, domain: str, index: int) -> torch.Tensor | None:
        path = self.paths[domain][index]
        if path in self.bad:
            return None
        try:
            im = open_rgb(path)
        except ImageReadError as e:
            self.bad.add(path)
            warnings.warn(f"skipping unreadable training image: {e}")
            return None
        return self.transform(im, random.Random(f"{self.seed}/{domain}/{self.epoch}/{index}"))

    def _take(self, domain: str) -> tuple[list[torch.Tensor], int] | None:
        """The next batch of one domain and the position after it; None at the end of the epoch."""
        order, pos, out = self._order(domain), self.positions[domain], []
        while len(out) < self.batch_size:
            need = self.batch_size - len(out)
            chunk = order[pos:pos + need]
            if len(chunk) < need:
                return None
            mapper = self._pool.map if self._pool is not None else map
            out += [t for t in mapper(lambda i: self._load(domain, i), chunk) if t is not None]
            pos += need
        return out, pos

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(3):
            taken = {d: self._take(d) for d in DOMAIN_FOLDERS}
            if all(t is not None for t in taken.values()):
                for d, (_, pos) in taken.items():
                    self.positions[d] = pos
                return torch.stack(taken["A"][0]), torch.stack(taken["B"][0])
            self.epoch += 1
            self.positions = {d: 0 for d in DOMAIN_FOLDERS}
        readable = {d: len(p) - sum(x in self.bad for x in p) for d, p in self.paths.items()}
        raise DataError(f"not enough readable training images for a batch of {self.batch_size}: {readable}")

    def __iter__(self):
        while True:
            yield self.next_batch()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def load_test_images(data_root: str | os.PathLike, domain: str, new_size: int, count: int,
                     crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The first ``count`` readable test images of a domain (official test transform), (N, 3, H, W).

    Like the official test loader the default crop is new_size x new_size.
    """
    folder = os.path.join(os.fspath(data_root), TEST_FOLDERS[domain])
    h, w = crop if crop is not None else (new_size, new_size)
    images = []
    for path in list_images(folder):
        try:
            im = open_rgb(path)
        except ImageReadError as e:
            warnings.warn(f"skipping unreadable test image: {e}")
            continue
        images.append(pil_to_tensor(center_crop(resize_shorter(im, new_size), h, w)))
        if len(images) == count:
            break
    if not images:
        raise DataError(f"{folder}: no readable test images")
    return torch.stack(images)


# --------------------------------------------------------------------------- synthetic data

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    return x, y


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """Domain A: smooth gradient background, a soft-shaded round face-like blob with eyes."""
    x, y = _grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5, 0, 1)[..., None]
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    img = c0 * (1 - t) + c1 * t
    cx, cy = rng.uniform(0.4, 0.6, 2)
    rx, ry = rng.uniform(0.22, 0.3), rng.uniform(0.28, 0.36)
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    alpha = np.clip((1.0 - d) / 0.08, 0, 1)[..., None]  # soft edge
    skin = np.array([0.85, 0.65, 0.5]) * rng.uniform(0.75, 1.1)
    light = (1.15 - 0.45 * np.clip(np.sqrt((x - cx + 0.08) ** 2 + (y - cy + 0.1) ** 2) / rx, 0, 1.5))[..., None]
    img = img * (1 - alpha) + np.clip(skin * light, 0, 1) * alpha
    for ex in (cx - 0.35 * rx, cx + 0.35 * rx):
        eye = np.exp(-(((x - ex) ** 2 + (y - cy + 0.15 * ry) ** 2) / (2 * (0.03 * rx / 0.25) ** 2)))[..., None]
        img = img * (1 - 0.8 * eye) + 0.1 * 0.8 * eye
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)


def _anime(rng: np.random.Generator, size: int) -> np.ndarray:
    """Domain B: flat colours, a big dark-outlined face with big eyes, posterised."""
    x, y = _grid(size)
    img = np.ones((size, size, 3)) * rng.uniform(0.3, 1.0, 3)
    cx, cy = rng.uniform(0.42, 0.58, 2)
    rx, ry = rng.uniform(0.28, 0.36), rng.uniform(0.32, 0.4)
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    img[d < 1.0] = np.array([1.0, 0.85, 0.75])
    img[(d >= 0.9) & (d < 1.0)] = 0.05  # thick dark outline
    hair = (d < 1.05) & (y < cy - 0.45 * ry)
    img[hair] = rng.uniform(0.0, 0.8, 3)
    for ex in (cx - 0.4 * rx, cx + 0.4 * rx):
        e = np.sqrt(((x - ex) / (0.18 * rx)) ** 2 + ((y - cy) / (0.3 * ry)) ** 2)
        img[e < 1.0] = 0.05
        img[e < 0.8] = rng.uniform(0.1, 0.7, 3)
        hl = np.sqrt(((x - ex + 0.05 * rx) / (0.06 * rx)) ** 2 + ((y - cy + 0.1 * ry) / (0.08 * ry)) ** 2)
        img[hl < 1.0] = 1.0
    return np.round(img * 4) / 4  # posterise to 5 levels


def make_synthetic_dataset(root: str | os.PathLike, n_train: int = 24, n_test: int = 4, size: int = 64,
                           seed: int = 0) -> str:
    """Write a small two-domain PNG dataset in the official layout (no downloads); returns root.

    Domain A looks like soft photos of round faces, domain B like flat-shaded, outlined anime faces.
    """
    return _write_domains(root, {"A": _photo, "B": _anime}, n_train, n_test, size, seed)


# --------------------------------------------------------------------------- the demo's shapes set

SHAPES_B_TO_A = ("B: cool-coloured shapes (blue, teal, violet) -> A: the same kinds of shapes in warm colours "
                 "(red, orange, yellow), on the same light background")
_SHAPE_KINDS = ("circle", "square", "triangle")
_COOL = np.array([[0.15, 0.35, 0.85], [0.1, 0.65, 0.7], [0.45, 0.3, 0.8]])
_WARM = np.array([[0.9, 0.2, 0.15], [0.95, 0.55, 0.1], [0.95, 0.85, 0.2]])


def _shape_mask(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """A filled circle, axis-aligned square or upright triangle of 'radius' r centred at (cx, cy)."""
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
    top, bottom = cy - r, cy + r * 0.8  # apex at the top, base at the bottom
    half_width = (y - top) / (bottom - top) * r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def _shapes_image(rng: np.random.Generator, size: int, background: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """One or two shapes of random kind, place and size, each filled with a jittered palette colour."""
    x, y = _grid(size)
    img = np.broadcast_to(background * rng.uniform(0.9, 1.1), (size, size, 3)).copy()
    for _ in range(rng.integers(1, 3)):
        kind = _SHAPE_KINDS[rng.integers(len(_SHAPE_KINDS))]
        r = rng.uniform(0.14, 0.26)
        cx, cy = rng.uniform(r + 0.02, 0.98 - r, 2)
        colour = palette[rng.integers(len(palette))] + rng.normal(0, 0.04, 3)
        img[_shape_mask(kind, x, y, cx, cy, r)] = colour
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)


def _shapes_b(rng: np.random.Generator, size: int) -> np.ndarray:
    return _shapes_image(rng, size, np.array([0.92, 0.92, 0.88]), _COOL)


def _shapes_a(rng: np.random.Generator, size: int) -> np.ndarray:
    return _shapes_image(rng, size, np.array([0.92, 0.92, 0.88]), _WARM)


def make_shapes_dataset(root: str | os.PathLike, n_train: int = 200, n_test: int = 16, size: int = 32,
                        seed: int = 0) -> str:
    """The demo's learnable two-domain set in the official layout (no downloads); returns root.

    Both domains hold circles, squares and triangles on a light background; only the shapes' colours
    differ (:data:`SHAPES_B_TO_A`), so a b2a translation must repaint each shape and leave its outline
    and the background alone (what Council-GAN's masks are for), and the style noise may pick among
    the warm colours. Unpaired, as in the real task: the A and B images are drawn independently.
    """
    return _write_domains(root, {"A": _shapes_a, "B": _shapes_b}, n_train, n_test, size, seed)


def _write_domains(root, makers: dict, n_train: int, n_test: int, size: int, seed: int) -> str:
    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for domain, make in makers.items():
            folder = os.path.join(root, f"{split}{domain}")
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                arr = (make(rng, size) * 255 + 0.5).astype(np.uint8)
                Image.fromarray(arr, "RGB").save(os.path.join(folder, f"{k:05d}.png"))
    return root
