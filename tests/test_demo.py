"""The demo: its shapes set, its colour-histogram distance, its config and the notice of ignored official keys."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from council_fast.cli import demo
from council_fast.colour_distance import channel_quantiles, colour_distance
from council_fast.config import ignored_official_keys, load_config, official_keys_notice, packaged_config
from council_fast.data import TrainPairLoader, make_shapes_dataset
from council_fast.training import why_not_fused
from council_fast.training.reference import CouncilTrainer


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255 for p in sorted(folder.glob("*.png"))])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return Path(make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=12, n_test=6, size=32, seed=3))


def test_shapes_set_layout_and_determinism(shapes, tmp_path):
    for folder, count in (("trainA", 12), ("trainB", 12), ("testA", 6), ("testB", 6)):
        files = sorted((shapes / folder).glob("*.png"))
        assert len(files) == count
        assert all(Image.open(f).size == (32, 32) and Image.open(f).mode == "RGB" for f in files)
    again = make_shapes_dataset(tmp_path / "again", n_train=12, n_test=6, size=32, seed=3)
    assert _digest(Path(again)) == _digest(shapes)
    other = make_shapes_dataset(tmp_path / "other", n_train=12, n_test=6, size=32, seed=4)
    assert _digest(Path(other)) != _digest(shapes)


def test_shapes_domains_differ_in_shape_colours_only(shapes):
    b, a = _pixels(shapes / "trainB"), _pixels(shapes / "trainA")
    # The same light background (a shape may cover a corner now and then: the median is background).
    assert np.median(b[:, 0, 0].mean(-1)) > 0.75 and np.median(a[:, 0, 0].mean(-1)) > 0.75
    # Shape pixels (far from the light grey): blue dominates red in B, red dominates blue in A.
    shape_b = b[np.abs(b - b[:, :1, :1]).max(-1) > 0.25]
    shape_a = a[np.abs(a - a[:, :1, :1]).max(-1) > 0.25]
    assert len(shape_b) > 0.05 * b[..., 0].size and len(shape_a) > 0.05 * a[..., 0].size
    assert (shape_b[:, 2] > shape_b[:, 0]).mean() > 0.9
    assert (shape_a[:, 0] > shape_a[:, 2]).mean() > 0.9


def test_channel_quantiles_are_the_sorted_values():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0  # red channel: half the pixels white, half mid-grey
    q = channel_quantiles(x, count=4)
    assert q.dtype == torch.float64 and q.shape == (3, 4)
    assert q[0].tolist() == [0.5, 0.5, 1.0, 1.0] and q[1].tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="N, 3, H, W"):
        channel_quantiles(torch.zeros(3, 4, 4))


def test_colour_distance_bounds_and_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    assert colour_distance(x, x) == 0
    assert colour_distance(x, x.flip(0).flip(-1)) == 0  # a set's colours, not their order or place
    black, white = torch.full((1, 3, 4, 4), -1.0), torch.ones(1, 3, 4, 4)
    assert colour_distance(black, white) == 1
    assert colour_distance(torch.cat([black, white], dim=-1), white) == 0.5
    grey = torch.zeros(1, 3, 4, 4)
    assert colour_distance(grey, white) == 0.5  # the distance grows with the colour gap, not in steps
    y = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    assert colour_distance(x, y) == colour_distance(y, x)


def test_demo_config_keeps_its_learning_rate_and_runs_fused():
    config = packaged_config("demo")
    assert why_not_fused(config) == []
    assert config["lr_policy"] == "constant" or config["step_size"] > demo.DEMO_ITERS
    assert config["council"]["council_start_at_iter"] < demo.DEMO_ITERS
    assert config["gen"]["n_downsample"] == 2 and config["new_size"] % 4 == 0
    trainer = CouncilTrainer(config, "cpu", seed=0)
    for _ in range(demo.DEMO_ITERS):
        trainer.update_learning_rate()
    lrs = {g["lr"] for opts in trainer.optimizers for opt in opts.values() if opt is not None for g in opt.param_groups}
    assert lrs == {config["lr"]}


def test_official_switches_that_are_ignored_are_named_once(tmp_path):
    assert official_keys_notice(packaged_config("selfie2anime")) is None  # all off
    path = tmp_path / "official.yaml"
    path.write_text("misc:\n  do_test_Fid: true\n  start_tensor_board: true\n  do_telegram_report: true\n"
                    "  do_telegram_send_config_file: false\n")
    config = load_config(path)
    ignored = ignored_official_keys(config)
    assert [k.split(" ")[0] for k in ignored] == ["misc.do_test_Fid", "misc.start_tensor_board",
                                                   "misc.do_telegram_report"]
    notice = official_keys_notice(config, str(path))
    assert notice.count("\n") == 0 and str(path) in notice and "do_telegram_send_config_file" not in notice


def test_council_colour_distance_is_reproducible(shapes):
    config = packaged_config("demo")
    x_b, x_a = demo._test_sets(str(shapes), config)
    assert x_b.shape == (6, 3, 32, 32)
    first = demo.council_colour_distance(CouncilTrainer(config, "cpu", seed=0), x_b, x_a)
    assert 0 < first <= 1
    assert demo.council_colour_distance(CouncilTrainer(config, "cpu", seed=0), x_b, x_a) == first


def test_sixty_iterations_of_the_demo_council_lower_the_colour_distance(shapes):
    """Not luck: the untrained council paints grey noise (distance 0.33-0.46 to the light test A images for
    seeds 0 and 1 here); the first updates pull its output towards the light background that fills most
    pixels (0.13-0.16 after 60 iterations for those seeds), a drop far larger than the margin asserted."""
    config = packaged_config("demo")
    trainer = CouncilTrainer(config, "cpu", seed=0)
    loader = TrainPairLoader(str(shapes), config, seed=0)
    x_b, x_a = demo._test_sets(str(shapes), config)
    before = demo.council_colour_distance(trainer, x_b, x_a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is faster, and steady on a busy host
    try:
        for _ in range(60):
            trainer.step(*loader.next_batch())
    finally:
        torch.set_num_threads(threads)
    after = demo.council_colour_distance(trainer, x_b, x_a)
    assert before > 0.3 and after < before - 0.1, (before, after)
