"""CUDA-graph replay of conversion calls: argument checks everywhere; replay against eager on a GPU
and, through the capture emulator (tests/_graph_emulator.py), on the CPU."""
from __future__ import annotations

import pytest
import torch

from _backends import CPU_AND_CUDA, HAS_CUDA
from _graph_emulator import RecordingCapturer
from council_fast.cli.convert import add_arguments
from council_fast.inference import ConvertError, Converter
from council_fast.cuda_graphs import CudaGraphError, GraphedCall
from council_fast.lowering import FastGenerator

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device; this machine has none")


def _graphed_call(fn, device, **kwargs) -> GraphedCall:
    return GraphedCall(fn, capturer=RecordingCapturer() if device == "cpu" else None, **kwargs)


def test_rejects_cpu_tensors_and_mismatched_batches():
    graphed = GraphedCall(lambda x: x * 2, name="double")
    with pytest.raises(ValueError, match="double: CUDA graphs need CUDA tensors"):
        graphed(torch.ones(2, 3))
    with pytest.raises(TypeError, match="tensor arguments only"):
        graphed()


def test_converter_refuses_graphs_on_the_cpu(tiny_config):
    gen = FastGenerator(3, tiny_config["gen"], backend="reference")
    with pytest.raises(ConvertError, match="CUDA graphs need a CUDA device"):
        Converter([gen], "cpu", cuda_graphs=True, style_dim=tiny_config["gen"]["style_dim"])
    assert not Converter([gen], "cpu", style_dim=tiny_config["gen"]["style_dim"]).cuda_graphs


def test_convert_flag():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--checkpoint", "k", "--input", "i", "--output", "o"]
    assert parser.parse_args(base).cuda_graphs is True
    assert parser.parse_args(base + ["--no-cuda-graphs"]).cuda_graphs is False


def _generator(tiny_config, dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    gen = FastGenerator(3, tiny_config["gen"]).to(device).to(dtype).eval()
    return gen


def _inputs(batch, tiny_config, dtype=torch.float32, seed=1, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1).to(device).to(dtype)
    z = torch.randn(batch, tiny_config["gen"]["style_dim"], 1, 1, generator=gen).to(device).to(dtype)
    return x, z


def _assert_close(actual, expected, tol=1e-5):
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", CPU_AND_CUDA)  # cpu: the capture emulated
def test_replay_matches_eager_full_and_partial_batches(tiny_config, dtype, device):
    gen = _generator(tiny_config, dtype, device)
    graphed = _graphed_call(lambda x, z: gen.translate(x, z, return_mask=True), device, name="translate")
    with torch.inference_mode():
        for batch, seed in ((4, 1), (4, 2), (3, 3), (1, 4)):  # the last two reuse the batch-4 graph
            x, z = _inputs(batch, tiny_config, dtype, seed, device)
            out, masks = graphed(x, z)
            ref_out, ref_masks = gen.translate(x, z, return_mask=True)
            assert out.shape == ref_out.shape and masks.shape == ref_masks.shape
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            _assert_close(out, ref_out, tol)
            _assert_close(masks, ref_masks, tol)
        assert graphed.captures == 1
        x, z = _inputs(6, tiny_config, dtype, 5, device)  # a larger batch: captured again
        _assert_close(graphed(x, z)[0], gen.translate(x, z), 1e-5 if dtype == torch.float32 else 2e-2)
        assert graphed.captures == 2


@pytest.mark.gpu
@requires_cuda
def test_converter_with_and_without_graphs_agree(tiny_config):
    gen = _generator(tiny_config)
    style_dim = tiny_config["gen"]["style_dim"]
    x, z = _inputs(3, tiny_config)
    eager = Converter([gen], "cuda", cuda_graphs=False, style_dim=style_dim)
    graphed = Converter([gen], "cuda", cuda_graphs=True, style_dim=style_dim)
    for return_mask in (False, True):
        expected = eager.translate_batch(0, x, z, return_mask=return_mask)
        got = graphed.translate_batch(0, x, z, return_mask=return_mask)
        for e, g in zip(expected if return_mask else [expected], got if return_mask else [got]):
            _assert_close(g, e)
    assert graphed._graphed and all(g.captures == 1 for g in graphed._graphed.values())


@pytest.mark.parametrize("device", CPU_AND_CUDA)  # cpu: the capture emulated
def test_failed_capture_falls_back_or_raises_when_strict(device):
    def syncs(x):
        return x * float(x.sum().item())  # a host sync: not capturable

    x = torch.ones(2, 3, device=device)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        assert torch.equal(_graphed_call(syncs, device, name="syncs")(x), x * 6.0)
    with pytest.raises(CudaGraphError, match="syncs"):
        _graphed_call(syncs, device, name="syncs", strict=True)(x)
