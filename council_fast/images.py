"""Images in and out, with Pillow and numpy only (no torchvision).

Tensors are float (C, H, W) or (B, C, H, W) in [-1, 1], the range Council-GAN works in.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .fileio import atomic_write_bytes

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "open_rgb", "as_rgb8", "max_image_pixels", "PixelBudget", "DECODE_BUDGET",
           "resize_shorter", "center_crop",
           "pil_to_tensor", "tensor_to_pil", "save_image", "make_grid", "save_grid", "test_transform"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# Decoded pixels allowed per image (JPEGs above it are decoded at 1/2, 1/4 or 1/8 scale; other images are
# refused): 64 megapixels is a 9248x6936 photo, 192 MB as RGB. COUNCIL_FAST_MAX_IMAGE_PIXELS changes it.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class ImageReadError(ValueError):
    """An input file is missing, unreadable, truncated or not an image; the message names it."""


def max_image_pixels() -> int:
    value = os.environ.get("COUNCIL_FAST_MAX_IMAGE_PIXELS")
    try:
        return max(1, int(value)) if value else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS


class PixelBudget:
    """Pixels being decoded at once in this process, across loader threads: a decode waits until the
    images already being decoded leave room for it (one image alone always fits)."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


# Two images of the per-image limit: with N loader threads, at most this many pixels are decoded at once.
DECODE_BUDGET = PixelBudget(2 * DEFAULT_MAX_IMAGE_PIXELS)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any image as 8-bit RGB: EXIF rotation applied; grey, palette, RGBA, 16-bit handled.

    Only regular files are read (a FIFO or device named like an image is refused, never waited on);
    images over :func:`max_image_pixels` are reduced while decoding (JPEG) or refused, by name.
    """
    path = os.fspath(path)
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            _bound_pixels(im, path)
            with DECODE_BUDGET.reserve(im.size[0] * im.size[1]):
                im.load()  # truncated files fail here, not later
                return as_rgb8(im)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{path}: cannot read image ({e})") from None


@contextlib.contextmanager
def _open_regular(path: str) -> Iterator[io.BufferedReader]:
    """Open for reading without blocking on a FIFO, and refuse anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "FIFO" if stat.S_ISFIFO(mode) else "folder" if stat.S_ISDIR(mode) else "special file"
            raise ImageReadError(f"{path}: not a regular file ({kind}); skipped")
        os.set_blocking(fd, True)
        yield f


def _bound_pixels(im: Image.Image, path: str) -> None:
    """Reduce a JPEG over the pixel limit while decoding (draft mode); refuse any other such image."""
    limit = max_image_pixels()
    w, h = im.size
    if w * h <= limit:
        return
    if im.format == "JPEG":
        scale = next((k for k in (2, 4, 8) if math.ceil(w / k) * math.ceil(h / k) <= limit), None)
        if scale is not None:
            im.draft(im.mode, (math.ceil(w / scale), math.ceil(h / scale)))
            if im.size[0] * im.size[1] <= limit:
                return
    raise ImageReadError(f"{path}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the {limit / 1e6:.0f}-megapixel "
                         f"limit per image (decoding it would take {w * h * 3 / 2**30:.1f} GB or more); shrink "
                         f"it, or raise COUNCIL_FAST_MAX_IMAGE_PIXELS")


def as_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, as read from a file: EXIF rotation applied, transparency on white."""
    return _to_rgb8(ImageOps.exif_transpose(im))


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio (bilinear)."""
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        new = (size, max(1, int(size * h / w)))
    else:
        new = (max(1, int(size * w / h)), size)
    return im.resize(new, Image.BILINEAR)


def center_crop(im: Image.Image, height: int, width: int) -> Image.Image:
    w, h = im.size
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    return im.crop((left, top, left + width, top + height))


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) tensor in [-1, 1] -> 8-bit image (values outside are clipped)."""
    t = t.detach().float().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def test_transform(im: Image.Image, size: int, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The official test transform: shorter side to ``size``, centre crop, to [-1, 1]."""
    im = resize_shorter(im, size)
    h, w = crop if crop is not None else (size, size)
    return pil_to_tensor(center_crop(im, h, w))


def _encode(im: Image.Image, path: str) -> bytes:
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(
        os.path.splitext(path)[1].lower(), "PNG")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def save_image(t: torch.Tensor | Image.Image, path: str | os.PathLike) -> None:
    """Write one image atomically; the format follows the extension (PNG when unknown)."""
    im = t if isinstance(t, Image.Image) else tensor_to_pil(t)
    atomic_write_bytes(path, _encode(im, os.fspath(path)))


def make_grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """Contact sheet: ``rows[r][c]`` is a (C, H, W) image; cells are padded to the largest size."""
    if not rows or not any(rows):
        raise ValueError("make_grid needs at least one image")
    cells = [img for row in rows for img in row]
    h = max(c.shape[-2] for c in cells)
    w = max(c.shape[-1] for c in cells)
    ncols = max(len(row) for row in rows)
    sheet = torch.ones(3, pad + len(rows) * (h + pad), pad + ncols * (w + pad))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            img = img.detach().float().cpu()
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[:, y:y + img.shape[-2], x:x + img.shape[-1]] = img[:3]
    return sheet


def save_grid(rows: Sequence[Sequence[torch.Tensor]], path: str | os.PathLike, pad: int = 2) -> None:
    save_image(make_grid(rows, pad), path)
