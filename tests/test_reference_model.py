"""The reference networks against independently computed values and the official key/shape list."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from council_fast.checkpoint import check_state_dict, load_generator_states
from council_fast.config import load_config
from council_fast.reference import (AdaINGen, MsImageDis, MsImageDisCouncil, blend_with_masks,
                                    lsgan_dis_loss, lsgan_gen_loss)


def _adain_layers(gen_params: dict) -> list[tuple[str, int]]:
    """Decoder AdaIN layers in the documented consumption order, with channel counts (by hand)."""
    dim = gen_params["dim"] * 2 ** gen_params["n_downsample"]
    layers = []
    for r in range(gen_params["n_res"]):
        layers += [(f"model.0.model.{r}.model.0.norm", dim), (f"model.0.model.{r}.model.1.norm", dim)]
    index = 1  # model.0 is the residual stack; each upsampling stage is Upsample, conv, conv
    for _ in range(gen_params["n_downsample"]):
        dim //= 2
        layers += [(f"model.{index + 1}.norm", dim), (f"model.{index + 2}.norm", dim)]
        index += 3
    return layers


def test_adain_parameters_are_sliced_bias_block_then_weight_block(tiny_config, seeded):
    params = tiny_config["gen"]
    gen = AdaINGen(3, params)
    layers = _adain_layers(params)
    total = sum(2 * c for _, c in layers)
    assert gen.mlp.model[-1].fc.out_features == total
    batch = 2
    adain = torch.randn(batch, total)
    gen.assign_adain_params(adain, gen.dec)
    start = 0
    for name, channels in layers:
        layer = gen.dec.get_submodule(name)
        bias = adain[:, start:start + channels].double()
        weight = adain[:, start + channels:start + 2 * channels].double()
        start += 2 * channels
        x = torch.randn(batch, channels, 5, 6)
        xd = x.double()
        mean = xd.mean(dim=(2, 3), keepdim=True)
        var = ((xd - mean) ** 2).mean(dim=(2, 3), keepdim=True)  # biased
        expected = (xd - mean) / torch.sqrt(var + 1e-5) * weight[:, :, None, None] + bias[:, :, None, None]
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    assert start == total


def test_mask_blending_matches_closed_form(seeded):
    masks_n, batch = 3, 2
    raw = torch.rand(batch, 3 * masks_n + masks_n, 4, 5) * 2 - 1
    image = torch.rand(batch, 3, 4, 5) * 2 - 1
    out, masks = blend_with_masks(raw, image, masks_n)
    # Closed form of the sequential blend: image * prod_k (1 - m_k) + sum_k m_k c_k prod_{l>k} (1 - m_l).
    r = raw.double().numpy()
    m = (np.tanh(10 * r[:, 9:12]) + 1) / 2
    expected = image.double().numpy() * np.prod(1 - m, axis=1, keepdims=True)
    for k in range(masks_n):
        later = np.prod(1 - m[:, k + 1:], axis=1, keepdims=True) if k + 1 < masks_n else 1.0
        expected = expected + m[:, k:k + 1] * r[:, 3 * k:3 * k + 3] * later
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masks.double().numpy(), m, rtol=1e-5, atol=1e-6)


def test_lsgan_losses_by_hand(seeded):
    fake = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)]
    real = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)]
    d_expected = sum(float(np.mean(f.numpy().astype(np.float64) ** 2))
                     + float(np.mean((r.numpy().astype(np.float64) - 1) ** 2)) for f, r in zip(fake, real))
    g_expected = sum(float(np.mean((f.numpy().astype(np.float64) - 1) ** 2)) for f in fake)
    assert float(lsgan_dis_loss(fake, real)) == pytest.approx(d_expected, rel=1e-6)
    assert float(lsgan_gen_loss(fake)) == pytest.approx(g_expected, rel=1e-6)


def _avg_pool_by_hand(x: np.ndarray) -> np.ndarray:
    """3x3, stride 2, padding 1, padding not counted in the average."""
    n, c, h, w = x.shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            rows = slice(max(2 * i - 1, 0), min(2 * i + 2, h))
            cols = slice(max(2 * j - 1, 0), min(2 * j + 2, w))
            out[:, :, i, j] = x[:, :, rows, cols].mean(axis=(2, 3))
    return out


def test_discriminators_average_pool_between_scales(tiny_config, seeded):
    dis = MsImageDis(3, tiny_config["dis"])
    x = torch.randn(1, 3, 9, 11)
    pooled = _avg_pool_by_hand(x.double().numpy())
    np.testing.assert_allclose(dis.downsample(x).double().numpy(), pooled, rtol=1e-6, atol=1e-6)
    pooled_t = torch.from_numpy(pooled).float()
    outs = dis(x)
    assert len(outs) == tiny_config["dis"]["num_scales"] == 2
    torch.testing.assert_close(outs[1], dis.cnns[1](pooled_t), rtol=1e-5, atol=1e-6)

    council = MsImageDisCouncil(3, tiny_config["dis"])
    src = torch.randn(1, 3, 9, 11)
    pooled_src = torch.from_numpy(_avg_pool_by_hand(src.double().numpy())).float()
    outs = council(x, src)
    torch.testing.assert_close(outs[0], council.cnns[0](torch.cat((x, src), 1)))
    torch.testing.assert_close(outs[1], council.cnns[1](torch.cat((pooled_t, pooled_src), 1)),
                               rtol=1e-5, atol=1e-6)


def test_state_dict_keys_and_shapes_match_official(shared_dir):
    config = load_config(shared_dir / "official" / "anime2face_config_values.yaml")
    official = json.loads((shared_dir / "official" / "anime_state_dict_shapes.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        nets = {"gen": AdaINGen(config["input_dim_b"], config["gen"]),
                "dis": MsImageDis(config["input_dim_b"], config["dis"]),
                "dis_council": MsImageDisCouncil(config["input_dim_b"], config["dis"])}
    for name, net in nets.items():
        ours = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert list(ours) == list(official[name]), f"{name}: key order or names differ"
        assert ours == official[name], name


def test_official_format_generator_file_loads_strictly(tiny_config, tmp_path, seeded):
    gen = AdaINGen(3, tiny_config["gen"])
    path = tmp_path / "b2a_gen_2_00000011.pt"
    torch.save({"b2a": gen.state_dict()}, path)
    states = load_generator_states(path)
    assert states.direction == "b2a" and states.members == [2]
    fresh = AdaINGen(3, tiny_config["gen"])
    check_state_dict(fresh, states.states[0], str(path))
    fresh.load_state_dict(states.states[0], strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, tiny_config["gen"]["style_dim"], 1, 1)
    assert torch.equal(fresh(x, z), gen(x, z))
