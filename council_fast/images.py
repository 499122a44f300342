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
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .fileio import atomic_write_bytes

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "ImageTooLargeError", "open_rgb", "decode_rgb", "as_rgb8", "max_image_pixels", "PixelBudget",
           "DECODE_BUDGET", "resize_shorter", "center_crop", "pil_to_tensor", "tensor_to_pil", "save_image", "FITS",
           "fit_square", "make_grid", "save_grid", "test_transform", "upscale_nearest", "SheetLayout", "sheet_layout",
           "labelled_sheet", "save_labelled_sheet", "SHEET_MIN_TILE"]

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


class ImageTooLargeError(ImageReadError):
    """The image has more pixels than allowed (a decompression bomb, or just too large)."""


def decode_rgb(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """``open_rgb`` for bytes in memory (an upload named ``name``): images over ``max_pixels`` (and over
    :func:`max_image_pixels`) are refused before they are decoded (ImageTooLargeError), so a small file
    cannot expand into gigabytes."""
    limit = min(max_pixels or max_image_pixels(), max_image_pixels())
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limit:
                raise ImageTooLargeError(f"{name}: {w}x{h} = {w * h} pixels, more than the {limit} allowed")
            with DECODE_BUDGET.reserve(w * h):
                im.load()
                return as_rgb8(im)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{name}: cannot read image ({e})") from None


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


FITS = ("crop", "pad", "stretch")
PAD_COLOUR = (128, 128, 128)  # mid-grey: 0 in the model's [-1, 1]


def fit_square(im: Image.Image, size: int, fit: str = "crop") -> Image.Image:
    """A ``size`` x ``size`` image from any aspect ratio: ``crop`` (shorter side to size, centre crop: the
    official test transform; a wide photo loses its sides), ``pad`` (longer side to size, the rest filled
    with mid-grey: nothing is lost), ``stretch`` (both sides to size: the aspect ratio changes)."""
    if fit == "crop":
        return center_crop(resize_shorter(im, size), size, size)
    if fit == "stretch":
        return im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)
    if fit == "pad":
        w, h = im.size
        scale = size / max(w, h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new("RGB", (size, size), PAD_COLOUR)
        canvas.paste(im.convert("RGB").resize(inner, Image.BILINEAR) if inner != im.size else im.convert("RGB"),
                     ((size - inner[0]) // 2, (size - inner[1]) // 2))
        return canvas
    raise ValueError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")


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


# --------------------------------------------------------------------------- labelled contact sheets

SHEET_MIN_TILE = 128  # small tiles are scaled up (nearest, by a whole factor) to at least this size
_LABEL_PAD = 4
_INK, _PAPER = (0, 0, 0), (255, 255, 255)


def upscale_nearest(im: Image.Image, min_side: int = SHEET_MIN_TILE) -> Image.Image:
    """Scale up by the smallest whole factor that makes the shorter side at least ``min_side``
    (nearest neighbour: every pixel becomes a visible block); images already that large are unchanged."""
    factor = max(1, -(-min_side // max(1, min(im.size))))
    return im if factor == 1 else im.resize((im.size[0] * factor, im.size[1] * factor), Image.NEAREST)


def _as_pil(cell: torch.Tensor | Image.Image) -> Image.Image:
    return cell.convert("RGB") if isinstance(cell, Image.Image) else tensor_to_pil(cell)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Each line of ``text``, shortened (ending in '..') until it fits ``width`` pixels."""
    lines = []
    for line in text.split("\n"):
        while line and _text_size(draw, line, font)[0] > width:
            line = line[:-3] + ".." if len(line) > 3 else line[:-1]
        lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class SheetLayout:
    """Where everything of a labelled contact sheet goes (pixels)."""
    tile: tuple[int, int]  # (width, height) of the largest tile
    columns: int
    rows: int
    left: int  # width of the row-label column
    head: int  # height of the column-label row
    caption: int  # height of the caption under each tile (0 without cell labels)
    pad: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.pad + self.left + self.columns * (self.tile[0] + self.pad),
                self.pad + self.head + self.rows * (self.tile[1] + self.caption + self.pad))

    def origin(self, r: int, c: int) -> tuple[int, int]:
        """Top-left corner of tile (r, c)."""
        return (self.pad + self.left + c * (self.tile[0] + self.pad),
                self.pad + self.head + r * (self.tile[1] + self.caption + self.pad))


def sheet_layout(tile_sizes: Sequence[Sequence[tuple[int, int]]], row_labels: Sequence[str] | None = None,
                 col_labels: Sequence[str] | None = None, cell_labels: Sequence[Sequence[str]] | None = None,
                 pad: int = 4) -> SheetLayout:
    """The layout :func:`labelled_sheet` uses for tiles of these (scaled) sizes and these labels."""
    font, probe = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def block_height(labels) -> int:
        sizes = [_text_size(probe, text, font)[1] for text in labels or () if text]
        return max(sizes) + 2 * _LABEL_PAD if sizes else 0

    tile = (max(w for row in tile_sizes for w, _ in row), max(h for row in tile_sizes for _, h in row))
    widths = [_text_size(probe, text, font)[0] for text in row_labels or () if text]
    left = min(max(widths) + 2 * _LABEL_PAD, 2 * tile[0]) if widths else 0
    return SheetLayout(tile, max(len(row) for row in tile_sizes), len(tile_sizes), left, block_height(col_labels),
                       block_height([t for row in cell_labels or () for t in row]), pad)


def labelled_sheet(rows: Sequence[Sequence[torch.Tensor | Image.Image]], row_labels: Sequence[str] | None = None,
                   col_labels: Sequence[str] | None = None,
                   cell_labels: Sequence[Sequence[str]] | None = None, min_tile: int = SHEET_MIN_TILE,
                   pad: int = 4) -> Image.Image:
    """Contact sheet with labels, as an RGB image.

    ``rows[r][c]`` is a tensor in [-1, 1] or a PIL image; tiles are scaled up to ``min_tile`` pixels
    (:func:`upscale_nearest`). ``col_labels`` head the columns, ``row_labels`` stand left of the rows,
    ``cell_labels[r][c]`` go under single tiles (when the columns differ from row to row). Labels may
    hold line breaks; a line too wide for its place is shortened. Pillow's default font.
    """
    if not rows or not any(rows):
        raise ValueError("labelled_sheet needs at least one image")
    tiles = [[upscale_nearest(_as_pil(cell), min_tile) for cell in row] for row in rows]
    layout = sheet_layout([[t.size for t in row] for row in tiles], row_labels, col_labels, cell_labels, pad)
    sheet = Image.new("RGB", layout.size, _PAPER)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    width = layout.tile[0] - _LABEL_PAD
    for c, text in enumerate(col_labels or ()):
        x, y = layout.origin(0, c)
        draw.multiline_text((x + _LABEL_PAD, y - layout.head + _LABEL_PAD // 2), _fit_text(draw, text, font, width),
                            fill=_INK, font=font)
    for r, row in enumerate(tiles):
        if row_labels and r < len(row_labels) and row_labels[r]:
            draw.multiline_text((pad, layout.origin(r, 0)[1] + _LABEL_PAD),
                                _fit_text(draw, row_labels[r], font, layout.left - _LABEL_PAD), fill=_INK, font=font)
        for c, tile in enumerate(row):
            x, y = layout.origin(r, c)
            sheet.paste(tile, (x, y))
            if cell_labels and r < len(cell_labels) and c < len(cell_labels[r]):
                draw.multiline_text((x + 1, y + layout.tile[1] + _LABEL_PAD // 2),
                                    _fit_text(draw, cell_labels[r][c], font, width), fill=_INK, font=font)
    return sheet


def save_labelled_sheet(rows, path: str | os.PathLike, **labels) -> None:
    """:func:`labelled_sheet` written atomically to ``path`` (format from the extension)."""
    save_image(labelled_sheet(rows, **labels), path)
