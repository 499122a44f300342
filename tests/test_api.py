"""The public Python API: council_fast.FastGenerator, load_generators, translate."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import council_fast
from council_fast import checkpoint as ckpt
from council_fast.checkpoint import CheckpointError
from council_fast.cli import convert as convert_cmd
from council_fast.config import packaged_config
from council_fast.lowering import FastGenerator
from council_fast.reference.networks import AdaINGen
from _tiny import tiny_generator

SIZE = 32  # the tiny config's new_size
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg():
    return packaged_config("tiny")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cfg):
    """Random weights as an official member file (member 2) and as a council-fast full state (members 0, 1)."""
    root = tmp_path_factory.mktemp("api")
    gens = {i: tiny_generator(cfg, 10 + i, random_biases=True) for i in range(3)}
    member = root / "official" / "b2a_gen_2_00000005.pt"
    member.parent.mkdir()
    torch.save({"b2a": gens[2].state_dict()}, member)
    full = root / "run" / "state_00000005.pt"
    full.parent.mkdir()
    networks = {"b2a": {"gen": [gens[0].state_dict(), gens[1].state_dict()]}}
    ckpt.save_full_state(full, {"config": cfg, "iteration": 5, "engine": "reference", "networks": networks})
    return {"member": str(member), "full": str(full), "gens": gens}


def _image(seed: int, w: int = 44, h: int = 36) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _assert_close(actual, expected, tol, what):
    """max|actual - expected| <= tol * max|expected| (the parity tolerances: fp32 1e-5, bf16 2e-2)."""
    expected = expected.detach().float()
    err = (actual.detach().float() - expected).abs().max().item()
    assert torch.isfinite(actual).all() and err <= tol * expected.abs().max().item(), (what, err)


def test_public_names():
    assert council_fast.FastGenerator is FastGenerator
    for name in ("FastGenerator", "load_generators", "translate"):
        assert name in council_fast.__all__
    for name in council_fast.__all__:
        assert getattr(council_fast, name) is not None, name


def test_official_member_file_reference_and_fused_agree(saved, cfg):
    ref = council_fast.load_generators(saved["member"], config="tiny", engine="reference")
    fused = council_fast.load_generators(saved["member"], config=cfg, engine="fused", backend="cpu")
    assert list(ref) == list(fused) == [2] and ref.direction == "b2a"
    assert isinstance(ref[2], AdaINGen) and not isinstance(ref[2], FastGenerator)
    assert isinstance(fused[2], FastGenerator) and not fused[2].training
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    got_ref = council_fast.translate(ref, x, seed=3)
    got_fused = council_fast.translate(fused, x, seed=3)
    assert got_ref.shape == x.shape
    _assert_close(got_fused, got_ref, 1e-5, "fused vs reference")
    # the published flow, computed independently: the seed's style codes for names "0" and "1"
    z = torch.stack([council_fast.inference.draw_plan(3, str(i), [2], "all", 1, cfg["gen"]["style_dim"])[1][0]
                     for i in range(2)])
    gen = saved["gens"][2]
    with torch.no_grad():
        want = gen.decode(gen.encode(x)[0], z.view(2, -1, 1, 1), x)
    _assert_close(got_ref, want, 1e-5, "reference vs the published model")


def test_full_state_members_and_bf16(saved):
    both = council_fast.load_generators(saved["full"])  # the config travels in the full state
    assert sorted(both) == [0, 1] and both.config["gen"]["style_dim"] == packaged_config("tiny")["gen"]["style_dim"]
    one = council_fast.load_generators(saved["full"], members=1, engine="reference")
    assert list(one) == [1]
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    want = council_fast.translate(one, x, member=1, seed=0)
    bf16 = council_fast.load_generators(saved["full"], members=[1], precision="bf16")
    assert next(bf16[1].parameters()).dtype == torch.bfloat16
    _assert_close(council_fast.translate(bf16, x, member=1, seed=0), want, 2e-2, "bf16 vs fp32")


def test_pil_in_pil_out_and_styles(saved):
    gens = council_fast.load_generators(saved["member"], config="tiny")
    out = council_fast.translate(gens, _image(1), seed=5)
    assert isinstance(out, Image.Image) and out.size == (SIZE, SIZE) and out.mode == "RGB"
    many = council_fast.translate(gens, [_image(1), _image(2)], styles=2, seed=5, names=["0", "b"])
    assert len(many) == 2 and all(len(per) == 2 and all(isinstance(im, Image.Image) for im in per) for per in many)
    again = council_fast.translate(gens, [_image(1), _image(2)], styles=2, seed=5, names=["0", "b"])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for per, per2 in zip(many, again) for a, b in zip(per, per2))
    other = council_fast.translate(gens, _image(1), seed=6)
    assert not np.array_equal(np.asarray(other), np.asarray(out))  # another seed: another style
    assert not np.array_equal(np.asarray(many[0][0]), np.asarray(many[0][1]))  # styles differ
    tensor = council_fast.translate(gens, torch.zeros(2, 3, SIZE, SIZE), styles=3, seed=5)
    assert tensor.shape == (2, 3, 3, SIZE, SIZE)


def test_same_seed_same_output_as_convert(saved, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {"cat": _image(7), "dog": _image(8, 40, 52)}
    for name, im in images.items():
        im.save(folder / f"{name}.png")
    parser = argparse.ArgumentParser()
    convert_cmd.add_arguments(parser)
    out = tmp_path / "out"
    assert convert_cmd.run(parser.parse_args(
        ["--config", "tiny", "--checkpoint", saved["member"], "--input", str(folder), "--output", str(out),
         "--seed", "11", "--styles", "2", "--batch", "2", "--device", "cpu", "--quiet", "--backend", "cpu"])) == 0
    gens = council_fast.load_generators(saved["member"], config="tiny", backend="cpu")
    got = council_fast.translate(gens, list(images.values()), styles=2, seed=11, names=list(images))
    for (name, _), per_style in zip(images.items(), got):
        for s, im in enumerate(per_style):
            with Image.open(out / f"{name}_m2_s{s}.png") as written:
                assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(im)), (name, s)


def test_one_generator_and_errors(saved, cfg, tmp_path):
    gen = saved["gens"][2]
    x = torch.rand(3, SIZE, SIZE) * 2 - 1
    out = council_fast.translate(gen, x, seed=1)
    assert out.shape == x.shape
    fast = FastGenerator.from_reference(gen)
    _assert_close(council_fast.translate(fast, x, seed=1), out, 1e-5, "FastGenerator vs AdaINGen")
    with pytest.raises(CheckpointError, match="a2b"):
        council_fast.load_generators(saved["member"], config="tiny", direction="a2b")
    with pytest.raises(CheckpointError, match="missing.pt"):
        council_fast.load_generators(tmp_path / "missing.pt", config="tiny")
    with pytest.raises(council_fast.ConvertError, match="carries no config"):
        council_fast.load_generators(saved["member"])
    with pytest.raises(council_fast.ConvertError, match="members 2"):
        council_fast.load_generators(saved["member"], config="tiny", members=0)
    with pytest.raises(council_fast.ConvertError, match="tensor"):
        council_fast.translate(gen, torch.zeros(1, 5, SIZE, SIZE))
