"""Labelled contact sheets and the square fits of convert --fit (images.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from council_fast.images import (PAD_COLOUR, SHEET_MIN_TILE, fit_square, labelled_sheet, pil_to_tensor, sheet_layout,
                                 upscale_nearest)


def _tile(seed: int, size: int = 32) -> torch.Tensor:
    """A tile whose every pixel is a multiple of 1/127.5 - 1, so the round trip through 8 bits is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g).float() / 127.5 - 1


def test_upscale_nearest_uses_a_whole_factor():
    im = Image.new("RGB", (32, 20))
    assert upscale_nearest(im, 128).size == (224, 140)  # factor 7: 20 * 7 = 140 >= 128
    assert upscale_nearest(Image.new("RGB", (256, 300)), 128).size == (256, 300)
    small = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    big = np.asarray(upscale_nearest(small, 6))
    assert big.shape == (6, 6, 3) and (big[:3, :3] == np.asarray(small)[0, 0]).all()


def test_labelled_sheet_places_every_scaled_tile_where_the_layout_says():
    rows = [[_tile(r * 10 + c) for c in range(3)] for r in range(2)]
    labels = dict(row_labels=["first", "second\nline"], col_labels=["input", "member 0", "member 1"])
    sheet = labelled_sheet(rows, **labels)
    layout = sheet_layout([[(128, 128)] * 3] * 2, **labels)
    assert sheet.size == layout.size and layout.left > 0 and layout.head > 0 and layout.caption == 0
    arr = np.asarray(sheet).astype(np.int16)
    for r in range(2):
        for c in range(3):
            x, y = layout.origin(r, c)
            want = np.asarray(upscale_nearest(Image.fromarray(
                ((rows[r][c] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()), SHEET_MIN_TILE))
            assert (arr[y:y + 128, x:x + 128] == want).all(), (r, c)
    # The labels are drawn: dark pixels in the header row and the label column, none without labels.
    assert (arr[:layout.head, layout.left:] < 128).any() and (arr[layout.head:, :layout.left] < 128).any()
    bare = labelled_sheet(rows)
    assert bare.size == sheet_layout([[(128, 128)] * 3] * 2).size == (4 + 3 * 132, 4 + 2 * 132)


def test_cell_captions_take_their_own_band():
    rows = [[_tile(1), _tile(2)], [_tile(3)]]
    layout = sheet_layout([[(128, 128)] * 2, [(128, 128)]], cell_labels=[["input", "m0 s0"], ["input"]])
    assert layout.caption > 0 and layout.origin(1, 0)[1] == 4 + 128 + layout.caption + 4
    sheet = labelled_sheet(rows, cell_labels=[["input", "m0 s0"], ["input"]])
    assert sheet.size == layout.size


def test_labelled_sheet_needs_an_image():
    with pytest.raises(ValueError):
        labelled_sheet([[]])


def test_fit_square_crop_pad_stretch():
    wide = Image.new("RGB", (300, 200), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 50, 200))  # a blue band on the left: crop loses it, pad and stretch keep it
    crop = np.asarray(fit_square(wide, 40, "crop"))
    assert crop.shape == (40, 40, 3) and (crop[..., 2] < 128).all()
    pad = np.asarray(fit_square(wide, 30, "pad"))
    assert pad.shape == (30, 30, 3)
    assert (pad[:5] == PAD_COLOUR).all() and (pad[-5:] == PAD_COLOUR).all()  # 300x200 -> 30x20: 5-row bands
    assert (pad[5:25, 0, 2] > 128).all() and (pad[5:25, -1, 0] > 128).all()
    stretch = np.asarray(fit_square(wide, 30, "stretch"))
    assert stretch.shape == (30, 30, 3) and (stretch[:, 0, 2] > 128).all() and (stretch[:, -1, 0] > 128).all()
    square = Image.new("RGB", (30, 30), (1, 2, 3))
    for fit in ("crop", "pad", "stretch"):
        assert torch.equal(pil_to_tensor(fit_square(square, 30, fit)), pil_to_tensor(square))
    with pytest.raises(ValueError, match="crop, pad, stretch"):
        fit_square(square, 30, "zoom")
