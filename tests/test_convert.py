"""council-fast convert: end to end on the CPU with small checkpoints written here."""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from council_fast import checkpoint as ckpt_mod
from council_fast import conversion, inference
from council_fast.cli import main
from council_fast.cli import convert
from council_fast.config import packaged_config
from council_fast import images as cf_images
from council_fast.reference.networks import AdaINGen
from _tiny import tiny_generator

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_convert(*argv: str) -> int:
    """The convert command, on the CPU with the reference engine unless the test says otherwise."""
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    defaults = [] if "--backend" in argv else ["--backend", "reference"]
    defaults += [] if "--device" in argv else ["--device", "cpu"]
    return convert.run(parser.parse_args(["--quiet", "--workers", "2", *defaults, *argv]))


@pytest.fixture(scope="module")
def cfg():
    return packaged_config("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cfg):
    """Official files: members 0 and 1 of iteration 10, and a lone member file of member 3."""
    root = tmp_path_factory.mktemp("ckpt")
    gens = {i: tiny_generator(cfg, 100 + i) for i in (0, 1, 3)}
    for i in (0, 1):
        torch.save({"b2a": gens[i].state_dict()}, root / f"b2a_gen_{i}_00000010.pt")
    lone = root / "single"
    lone.mkdir()
    torch.save({"b2a": gens[3].state_dict()}, lone / "b2a_gen_3_00000020.pt")
    return {"root": root, "prefix": str(root / "00000010"), "member3": str(lone / "b2a_gen_3_00000020.pt"),
            "gens": gens}


def random_image(seed: int, w: int = 48, h: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 3] = (250, 20, 20)  # a structure, so rotations and crops are visible
    return Image.fromarray(arr).convert(mode)


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    random_image(1).save(folder / "cat.jpg", quality=95)
    random_image(2).save(folder / "dog.png")
    random_image(3).save(folder / "sub" / "bird.webp", lossless=True)
    return folder


def read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def z_for(seed: int, rel: str, styles: int, style_dim: int) -> torch.Tensor:
    """The documented style-code rule, recomputed independently of convert.py."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(rel.encode())) % (2 ** 63))
    return torch.randn(styles, style_dim, generator=g)


def expected_output(gen: AdaINGen, image_path, z: torch.Tensor) -> np.ndarray:
    with Image.open(image_path) as im:
        x = cf_images.test_transform(im.convert("RGB"), SIZE).unsqueeze(0)
    with torch.no_grad():
        y = gen.translate(x, z.view(1, -1, 1, 1))[0]
    return ((y.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)


def digest(folder) -> dict[str, str]:
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))}


# --------------------------------------------------------------------------- happy paths

def test_official_member_file_outputs_equal_the_model(tmp_path, images, ckpt, cfg):
    out = tmp_path / "out"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images),
                       "--output", str(out), "--styles", "2", "--seed", "7", "--batch", "2") == 0
    names = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*.png"), recursive=True))
    assert names == sorted(f"{stem}_m3_s{s}.png" for stem in ("cat", "dog", os.path.join("sub", "bird"))
                           for s in (0, 1))
    gen = ckpt["gens"][3]
    for stem, src in (("cat", "cat.jpg"), ("dog", "dog.png"), ("sub/bird", "sub/bird.webp")):
        z = z_for(7, stem, 2, cfg["gen"]["style_dim"])
        for s in (0, 1):
            got = read(out / f"{stem}_m3_s{s}.png")
            assert got.shape == (SIZE, SIZE, 3)
            want = expected_output(gen, images / src, z[s])
            assert np.abs(got - want).max() <= 1, (stem, s)
    # Different styles of one input differ, and the outputs are not the input.
    assert np.abs(read(out / "cat_m3_s0.png") - read(out / "cat_m3_s1.png")).mean() > 0.5


def test_official_prefix_members(tmp_path, images, ckpt):
    out = tmp_path / "all"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images / "dog.png"),
                       "--output", str(out), "--member", "all", "--seed", "1") == 0
    assert sorted(os.listdir(out)) == ["dog_m0_s0.png", "dog_m1_s0.png"]
    assert np.abs(read(out / "dog_m0_s0.png") - read(out / "dog_m1_s0.png")).mean() > 0.5

    one = tmp_path / "one"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images / "dog.png"),
                       "--output", str(one), "--member", "1", "--seed", "1") == 0
    assert os.listdir(one) == ["dog_m1_s0.png"]
    # The same member, seed and input give the same image whichever members run beside it.
    assert np.array_equal(read(one / "dog_m1_s0.png"), read(out / "dog_m1_s0.png"))

    rnd = tmp_path / "random"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(rnd), "--member", "random", "--seed", "1") == 0
    outputs = glob.glob(str(rnd / "**" / "*.png"), recursive=True)
    assert len(outputs) == 3 and all(("_m0_" in p) or ("_m1_" in p) for p in outputs)


def test_unknown_member_is_an_error(tmp_path, images, ckpt, capsys):
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(tmp_path / "o"), "--member", "5") == 2
    assert "members 0, 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_full_state_checkpoint_carries_its_config(tmp_path, images, ckpt, cfg):
    path = tmp_path / "state_00000010.pt"
    ckpt_mod.save_full_state(path, {"config": cfg, "iteration": 9, "engine": "reference",
                                      "networks": {"b2a": {"gen": [ckpt["gens"][0].state_dict(),
                                                                   ckpt["gens"][1].state_dict()]}}})
    out = tmp_path / "out"
    assert run_convert("--checkpoint", str(path), "--input", str(images / "dog.png"), "--output", str(out),
                       "--seed", "1") == 0  # no --config: the full state has it
    ref = tmp_path / "ref"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images / "dog.png"),
                       "--output", str(ref), "--seed", "1") == 0
    assert digest(out) == digest(ref)


def test_official_checkpoint_without_config_is_a_clear_error(tmp_path, images, ckpt, capsys):
    assert run_convert("--checkpoint", ckpt["prefix"], "--input", str(images), "--output", str(tmp_path / "o")) == 2
    assert "--config" in capsys.readouterr().err


def test_seed_determinism(tmp_path, images, ckpt):
    def run(name, seed, batch="2"):
        out = tmp_path / name
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                           "--output", str(out), "--styles", "2", "--seed", seed, "--batch", batch) == 0
        return digest(out)
    a, b, c = run("a", "5"), run("b", "5"), run("c", "6")
    assert len(a) == 12 and a == b
    assert all(a[k] != c[k] for k in a)
    # Batching changes nothing but float rounding order: at most one grey level anywhere.
    d = run("d", "5", batch="1")
    assert d.keys() == a.keys()
    for name in a:
        assert np.abs(read(tmp_path / "a" / name) - read(tmp_path / "d" / name)).max() <= 1
    # Loading in the main thread (--workers 0) instead of worker threads changes nothing.
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(tmp_path / "e"), "--styles", "2", "--seed", "5", "--batch", "2",
                       "--workers", "0") == 0
    assert digest(tmp_path / "e") == a


def test_masks_and_contact_sheet(tmp_path, images, ckpt):
    out = tmp_path / "out"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(out), "--styles", "2", "--seed", "3", "--save-masks", "--grid") == 0
    masks = sorted(glob.glob(str(out / "**" / "*_mask.png"), recursive=True))
    assert len(masks) == 3 * 2 * 2
    # A row per input named on the left; columns: the input, then members 0 and 1 with styles 0 and 1.
    columns = ["input"] + [f"member {m}\nstyle {s}" for m in (0, 1) for s in (0, 1)]
    layout = cf_images.sheet_layout([[(128, 128)] * 5] * 3, row_labels=["cat", "dog", "sub/bird"],
                                    col_labels=columns)
    with Image.open(out / conversion.GRID_NAME) as sheet:
        assert sheet.size == layout.size
        x, y = layout.origin(0, 0)
        first_cell = np.asarray(sheet.convert("RGB"))[y:y + 128, x:x + 128].astype(np.int16)
    # Row 0 starts with the first input (cat.jpg) as the model saw it, scaled up 4x (nearest).
    with Image.open(images / "cat.jpg") as im:
        want = ((cf_images.test_transform(im.convert("RGB"), SIZE) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(first_cell - want.repeat(4, 0).repeat(4, 1)).max() <= 1


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bf16_on_cpu_is_close_to_fp32(tmp_path, images, ckpt, backend):
    """Reference under autocast; the fused engine (auto, where it exists) cast to bf16."""
    for precision in ("fp32", "bf16"):
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images / "dog.png"),
                           "--output", str(tmp_path / precision), "--seed", "1", "--precision", precision,
                           "--backend", backend if precision == "bf16" else "reference") == 0
    diff = np.abs(read(tmp_path / "fp32" / "dog_m3_s0.png") - read(tmp_path / "bf16" / "dog_m3_s0.png"))
    assert diff.mean() < 6


# --------------------------------------------------------------------------- names

def test_names_are_unique_and_inputs_never_overwritten(tmp_path, ckpt):
    folder = tmp_path / "pics"
    folder.mkdir()
    random_image(1).save(folder / "a.png")
    random_image(2).save(folder / "a.jpg", quality=95)
    random_image(3).save(folder / "a_2.png")  # the name the second 'a' would take first
    random_image(4).save(folder / "b_m3_s0.png")  # would be overwritten by b.png's output
    random_image(5).save(folder / "b.png")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    # An input folder as the output folder is refused (outputs would become inputs on the next run)...
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(folder),
                       "--output", str(folder), "--seed", "1") == 2
    assert set(os.listdir(folder)) == set(before)
    # ...but its files may be named one by one: then outputs go beside them and clobber none of them.
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", *sorted(
        str(folder / name) for name in before), "--output", str(folder), "--seed", "1") == 0
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, name
    outputs = sorted(set(os.listdir(folder)) - set(before))
    assert len(outputs) == 5
    assert {"a_m3_s0.png", "a_2_m3_s0.png"} <= set(outputs)
    assert "a_3_m3_s0.png" in outputs  # a.jpg: 'a' and 'a_2' were taken


def test_glob_and_case_insensitive_extensions(tmp_path, ckpt):
    folder = tmp_path / "g"
    folder.mkdir()
    random_image(1).save(folder / "UPPER.JPG", format="JPEG")
    random_image(2).save(folder / "x.PnG", format="PNG")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(folder),
                       str(folder / "*.PnG"), "--output", str(out), "--seed", "1") == 0
    assert sorted(os.listdir(out)) == ["UPPER_m3_s0.png", "x_m3_s0.png"]  # x.PnG listed twice, converted once


# --------------------------------------------------------------------------- bad input

def test_corrupt_file_among_good_ones(tmp_path, images, ckpt, capsys):
    data = (images / "dog.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "text.jpg").write_text("this is not a JPEG")
    (images / "empty.bmp").write_bytes(b"")
    out = tmp_path / "out"
    status = run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images),
                         str(tmp_path / "missing.png"), "--output", str(out), "--seed", "1")
    captured = capsys.readouterr()
    assert status == 1
    assert "converted 3 of 7 inputs; 4 failed" in captured.out
    for bad in ("truncated.png", "text.jpg", "empty.bmp", "missing.png"):
        assert bad in captured.out
    produced = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*.png"), recursive=True))
    assert produced == sorted(["cat_m3_s0.png", "dog_m3_s0.png", os.path.join("sub", "bird_m3_s0.png")])


def test_no_inputs_is_a_clear_error(tmp_path, ckpt, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(empty),
                       str(tmp_path / "nothing*.png"), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "no input images found" in err and "matches no images" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "exif"])
def test_unusual_image_modes(tmp_path, ckpt, mode):
    """Each odd file converts exactly like the plain RGB picture it shows."""
    base = random_image(9, w=48, h=40)
    odd, plain = tmp_path / "odd", tmp_path / "plain"
    odd.mkdir()
    plain.mkdir()
    if mode == "L":
        grey = base.convert("L")
        grey.save(odd / "pic.png")
        grey.convert("RGB").save(plain / "pic.png")
    elif mode == "RGBA":
        rgba = base.convert("RGBA")
        alpha = np.full((40, 48), 255, np.uint8)
        alpha[:, :10] = 0  # transparent strip: composited on white
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(odd / "pic.png")
        arr = np.asarray(base).copy()
        arr[:, :10] = 255
        Image.fromarray(arr).save(plain / "pic.png")
    elif mode == "P":
        pal = base.quantize(colors=16)
        pal.save(odd / "pic.png")
        pal.convert("RGB").save(plain / "pic.png")
    elif mode == "I;16":
        grey = np.asarray(base.convert("L"), dtype=np.uint16)
        Image.fromarray(grey * 257).save(odd / "pic.png")  # 16-bit grey, full 0..65535 range
        Image.fromarray(grey.astype(np.uint8)).convert("RGB").save(plain / "pic.png")
        with Image.open(odd / "pic.png") as check:
            assert check.mode.startswith("I")
    else:  # stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)
        exif = Image.Exif()
        exif[0x0112] = 6
        base.transpose(Image.Transpose.ROTATE_90).save(odd / "pic.png", exif=exif.tobytes())
        base.save(plain / "pic.png")
    results = {}
    for name, folder in (("odd", odd), ("plain", plain)):
        out = tmp_path / f"out_{name}"
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(folder),
                           "--output", str(out), "--seed", "2") == 0
        results[name] = read(out / "pic_m3_s0.png")
    assert results["odd"].shape == (SIZE, SIZE, 3)
    assert np.abs(results["odd"] - results["plain"]).max() <= 1


def test_exif_orientation_matters(tmp_path, ckpt):
    """Guard for the test above: without the EXIF tag the sideways file converts differently."""
    base = random_image(9, w=48, h=40)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base.transpose(Image.Transpose.ROTATE_90).save(a / "pic.png")
    base.save(b / "pic.png")
    outs = []
    for folder in (a, b):
        out = folder.with_name(folder.name + "_out")
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(folder),
                           "--output", str(out), "--seed", "2") == 0
        outs.append(read(out / "pic_m3_s0.png"))
    assert np.abs(outs[0] - outs[1]).max() > 10


# --------------------------------------------------------------------------- model errors

def test_config_that_does_not_fit_fails_before_writing(tmp_path, images, ckpt, cfg, capsys):
    wide = dict(cfg)
    wide["gen"] = dict(cfg["gen"], dim=16)
    config_path = tmp_path / "wide.yaml"
    config_path.write_text(yaml.safe_dump(wide))
    out = tmp_path / "out"
    assert run_convert("--config", str(config_path), "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(out)) == 2
    err = capsys.readouterr().err
    # What the checkpoint was trained with and the size at fault, not a key dump (issue 17).
    assert "trained with dim 8, mlp_dim 16, style_dim 8, n_downsample 2, n_res 1, 3 masks, 2 members" in err
    assert "differs in dim 8 (config: 16)" in err and "mis-shaped keys" not in err
    assert not out.exists()


def test_missing_and_unexpected_keys_are_named(tmp_path, images, ckpt, capsys):
    state = ckpt["gens"][0].state_dict()
    state.pop("mlp.model.0.fc.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "b2a_gen_0_00000001.pt"
    torch.save({"b2a": state}, path)
    out = tmp_path / "out"
    assert run_convert("--config", "tiny", "--checkpoint", str(path), "--input", str(images),
                       "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert "mlp.model.0.fc.weight" in err and "extra.weight" in err
    assert not out.exists()


def test_option_errors(tmp_path, images, ckpt, capsys):
    common = ["--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images)]
    assert run_convert(*common, "--output", str(tmp_path / "o"), "--precision", "fp16", "--device", "cpu") == 2
    assert "fp16" in capsys.readouterr().err
    assert run_convert(*common, "--output", str(tmp_path / "o"), "--size", "30") == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert run_convert(*common, "--output", str(tmp_path / "o"), "--direction", "a2b") == 2
    assert "a2b" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_explicit_fused_backend_when_the_fused_engine_cannot_be_built(tmp_path, images, ckpt, capsys, monkeypatch):
    def unbuildable(*args, **kwargs):
        raise RuntimeError("the fused engine exploded")
    monkeypatch.setattr(inference, "FastGenerator", unbuildable)
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images),
                       "--output", str(tmp_path / "o"), "--backend", "cpu") == 2
    assert "fused engine cannot run here: the fused engine exploded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # auto falls back to the reference engine and converts.
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images / "dog.png"),
                       "--output", str(tmp_path / "o"), "--backend", "auto") == 0


class TranslateOnlyGenerator(AdaINGen):
    """Stands in for FastGenerator: same state dict, only translate() (no encode/decode split)."""
    backend = "reference"
    instances = 0

    def __init__(self, input_dim, params, backend=None, strict=None):
        if backend == "cuda":
            raise RuntimeError("back-end 'cuda' is unavailable: no GPU")
        super().__init__(input_dim, params)
        TranslateOnlyGenerator.instances += 1

    def __getattribute__(self, name):
        if name in ("encode_content", "decode"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def translate(self, images, style, return_mask=False):
        return AdaINGen.decode(self, AdaINGen.encode_content(self, images), style, images, return_mask)


@pytest.fixture()
def fake_fused(monkeypatch):
    monkeypatch.setattr(inference, "FastGenerator", TranslateOnlyGenerator)
    TranslateOnlyGenerator.instances = 0
    return TranslateOnlyGenerator


def test_fused_engine_protocol(tmp_path, images, ckpt, fake_fused, capsys):
    """auto and an explicit back-end build FastGenerator; a translate-only engine still works."""
    ref = tmp_path / "ref"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(ref), "--seed", "4", "--styles", "2", "--save-masks") == 0
    assert fake_fused.instances == 0
    for backend in ("auto", "cpu"):
        out = tmp_path / backend
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                           "--output", str(out), "--seed", "4", "--styles", "2", "--save-masks",
                           "--backend", backend) == 0
        assert digest(out).keys() == digest(ref).keys()
        for name in digest(ref):
            assert np.abs(read(out / name) - read(ref / name)).max() <= 1, name
    assert fake_fused.instances == 4  # two members, two runs
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(tmp_path / "o"), "--backend", "cuda") == 2
    assert "no GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_size_option_and_size_default(tmp_path, images, ckpt):
    out = tmp_path / "o"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(images / "dog.png"),
                       "--output", str(out), "--size", "16", "--seed", "1") == 0
    assert read(out / "dog_m3_s0.png").shape == (16, 16, 3)


# --------------------------------------------------------------------------- Python API

def test_converter_reuses_content_and_matches_translate(ckpt, cfg):
    gen = ckpt["gens"][0]
    conv = inference.Converter({0: gen}, "cpu")
    torch.manual_seed(0)
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    z = torch.randn(3, cfg["gen"]["style_dim"], 1, 1)
    with torch.no_grad():
        want = gen.translate(x, z)
    assert torch.allclose(conv.translate_batch(0, x, z), want, atol=1e-6)
    content = conv.encode(0, x)
    for k in range(3):  # one content code, several styles
        zk = z[k:k + 1].expand(3, -1, -1, -1)
        with torch.no_grad():
            want_k = gen.translate(x, zk)
        assert torch.allclose(conv.decode(0, content, zk, x), want_k, atol=1e-6)
    out, masks = conv.translate_batch(0, x, z, return_mask=True)
    assert masks.shape == (3, 3, SIZE, SIZE) and 0 <= masks.min() and masks.max() <= 1


def test_find_inputs_and_plan_outputs(tmp_path):
    (tmp_path / "d" / "s").mkdir(parents=True)
    for name in ("d/x.png", "d/s/x.png", "d/y.txt", "d/s/Z.JPEG"):
        (tmp_path / name).write_bytes(b"")
    items, problems = conversion.find_inputs([str(tmp_path / "d"), str(tmp_path / "none*.png")])
    assert [i.rel for i in items] == ["x", os.path.join("s", "Z"), os.path.join("s", "x")]
    assert problems and "none*.png" in problems[0]
    planned = conversion.plan_outputs(items + [conversion.InputItem(str(tmp_path / "other" / "x.png"), "x")],
                                   str(tmp_path / "out"), [0], 1)
    assert [p.rel for p in planned][-1] == "x_2"


def test_cli_routes_convert(tmp_path, images, ckpt):
    status = main(["convert", "--config", "tiny", "--checkpoint", ckpt["member3"], "--input",
                   str(images / "dog.png"), "--output", str(tmp_path / "o"), "--quiet", "--seed", "1"])
    assert status == 0 and os.listdir(tmp_path / "o") == ["dog_m3_s0.png"]


def test_running_out_of_memory_halves_the_batch(tmp_path, images, ckpt, capsys, monkeypatch):
    """A device out of memory at batch 4 goes on at batch 2 (for the rest of the run): every output is
    written once, with the images a batch-2 run writes."""
    real_decode = inference.Converter.decode
    seen = []

    def decode_needing_memory(self, member, content, z, x, return_mask=False):
        seen.append(z.shape[0])
        if z.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(self, member, content, z, x, return_mask=return_mask)

    def run(name, batch):
        out = tmp_path / name
        assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                           "--output", str(out), "--seed", "3", "--batch", batch, "--styles", "2", "--grid") == 0
        return digest(out)

    expected = run("batch2", "2")
    monkeypatch.setattr(inference.Converter, "decode", decode_needing_memory)
    capsys.readouterr()
    got = run("batch4", "4")
    assert "out of device memory at batch 4: continuing with batch 2" in capsys.readouterr().err
    assert seen[0] == 4 and set(seen[1:]) == {2}  # halved once, for good
    assert got == expected


def test_default_batch_follows_the_free_gpu_memory(monkeypatch):
    assert conversion.default_batch(torch.device("cpu"), 256) == 8
    gib = 2 ** 30
    for free, size, precision, expected in ((80 * gib, 256, "fp32", 32), (2 * gib, 256, "fp32", 8),
                                             (2 * gib, 256, "bf16", 16), (8 * gib, 1024, "fp32", 2),
                                             (gib // 4, 1024, "fp32", 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * gib))
        assert conversion.default_batch(torch.device("cuda"), size, precision) == expected, (free, size, precision)


def test_random_members_get_a_caption_per_tile(tmp_path, images, ckpt):
    out = tmp_path / "out"
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images),
                       "--output", str(out), "--member", "random", "--seed", "4", "--grid") == 0
    chosen = [sorted(glob.glob(str(out / f"{stem}_m*_s0.png")))[0].rsplit("_m", 1)[1][0]
              for stem in ("cat", "dog", "sub/bird")]
    captions = [["input", f"member {m}\nstyle 0"] for m in chosen]
    layout = cf_images.sheet_layout([[(128, 128)] * 2] * 3, row_labels=["cat", "dog", "sub/bird"],
                                    cell_labels=captions)
    with Image.open(out / conversion.GRID_NAME) as sheet:
        assert sheet.size == layout.size and layout.caption > 0


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_fit_decides_how_inputs_become_squares(tmp_path, ckpt, fit):
    wide = random_image(7, w=90, h=40)
    wide.save(tmp_path / "wide.png")
    out = tmp_path / fit
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["member3"], "--input", str(tmp_path / "wide.png"),
                       "--output", str(out), "--seed", "2", "--fit", fit) == 0
    z = z_for(2, "wide", 1, packaged_config("tiny")["gen"]["style_dim"])
    x = cf_images.pil_to_tensor(cf_images.fit_square(wide, SIZE, fit)).unsqueeze(0)
    with torch.no_grad():
        y = ckpt["gens"][3].translate(x, z.view(1, -1, 1, 1))[0]
    want = ((y.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(read(out / "wide_m3_s0.png") - want).max() <= 1


def test_a_checkpoint_of_another_size_says_what_it_was_trained_with(tmp_path, images, ckpt, capsys):
    small = dict(packaged_config("tiny")["gen"], dim=4, n_res=2)
    torch.save({"b2a": AdaINGen(3, small).state_dict()}, tmp_path / "b2a_gen_0_00000005.pt")
    torch.save({"b2a": AdaINGen(3, small).state_dict()}, tmp_path / "b2a_gen_1_00000005.pt")
    assert run_convert("--config", "tiny", "--checkpoint", str(tmp_path / "00000005"), "--input", str(images),
                       "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "trained with dim 4, mlp_dim 16, style_dim 8, n_downsample 2, n_res 2, 3 masks, 2 members" in err
    assert "dim 4 (config: 8)" in err and "n_res 2 (config: 1)" in err and "drop --config" in err
    assert "missing keys" not in err and len(err) < 500


def test_a_training_run_folder_is_a_checkpoint(tmp_path, images, ckpt):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "images").mkdir()
    for i in (0, 1):
        torch.save({"b2a": ckpt["gens"][i].state_dict()}, run / "checkpoints" / f"b2a_gen_{i}_00000010.pt")
    assert inference.run_checkpoints(str(run)) == str(run / "checkpoints")
    assert inference.run_checkpoints(str(run / "checkpoints")) == str(run / "checkpoints")
    assert run_convert("--config", "tiny", "--checkpoint", str(run), "--input", str(images / "dog.png"),
                       "--output", str(tmp_path / "a"), "--seed", "1") == 0
    assert run_convert("--config", "tiny", "--checkpoint", ckpt["prefix"], "--input", str(images / "dog.png"),
                       "--output", str(tmp_path / "b"), "--seed", "1") == 0
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b")) == ["dog_m0_s0.png",
                                                                                        "dog_m1_s0.png"]
    for name in os.listdir(tmp_path / "a"):
        assert np.array_equal(read(tmp_path / "a" / name), read(tmp_path / "b" / name))
