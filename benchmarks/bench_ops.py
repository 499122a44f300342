"""pytest-benchmark suite: the generator (reference and fused) and the op benchmark cases of
``council-fast bench ops`` (:mod:`council_fast.bench.cases`), at small sizes.

The plain ``pytest`` of the README collects it with ``--benchmark-disable`` (pyproject.toml), so CI
runs each case once as a correctness check. For timings::

    pytest benchmarks --benchmark-enable --benchmark-only      # GPU: real sizes via the variables below

Sizes come from COUNCIL_FAST_BENCH_BATCH / COUNCIL_FAST_BENCH_SIZE (default 2 and 32, the tiny
config); the Winograd case runs at COUNCIL_FAST_BENCH_WINOGRAD_CHANNELS (default 256, the anime
config's width, where it applies). Back-ends: reference, triton and the C++ extension of the device.
"""
from __future__ import annotations

import os

import pytest
import torch

from council_fast import FastGenerator
from council_fast.bench import KINDS, NotApplicable, op_call, op_cases
from council_fast.config import packaged_config
from council_fast.ops import _backend
from council_fast.reference.networks import AdaINGen

BATCH = int(os.environ.get("COUNCIL_FAST_BENCH_BATCH", "2"))
SIZE = int(os.environ.get("COUNCIL_FAST_BENCH_SIZE", "32"))
WINOGRAD_CHANNELS = int(os.environ.get("COUNCIL_FAST_BENCH_WINOGRAD_CHANNELS", "256"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = packaged_config(os.environ.get("COUNCIL_FAST_BENCH_CONFIG", "tiny"))
CASE_NAMES = [case.name for case in op_cases(CONFIG, 1, 2 ** CONFIG["gen"]["n_downsample"], torch.device("cpu"))]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _backends() -> list:
    params = [pytest.param("reference", id="reference")]
    for name in ("triton", DEVICE.type):
        reason = _backend._why_unavailable(name, DEVICE)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return AdaINGen(CONFIG["input_dim_b"], CONFIG["gen"]).to(DEVICE).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    x = torch.rand(BATCH, CONFIG["input_dim_b"], SIZE, SIZE, device=DEVICE) * 2 - 1
    z = torch.randn(BATCH, CONFIG["gen"]["style_dim"], 1, 1, device=DEVICE)
    return x, z


def test_reference_translate(benchmark, generator, batch):
    x, z = batch

    def run():
        with torch.inference_mode():
            out = generator.translate(x, z)
        _sync()
        return out
    out = benchmark(run)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fused_generator_translate(benchmark, generator, batch):
    fused = FastGenerator(CONFIG["input_dim_b"], CONFIG["gen"])
    fused.load_state_dict(generator.state_dict())
    fused = fused.to(DEVICE).eval()
    x, z = batch

    def run():
        with torch.inference_mode():
            out = fused.translate(x, z)
        _sync()
        return out
    out = benchmark(run)
    with torch.inference_mode():
        want = generator.translate(x, z)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", CASE_NAMES)
def test_op_case(benchmark, name, backend, kind):
    """One case of ``bench ops``: the fused op timed, then held to the case's tolerance."""
    torch.manual_seed(2)
    case = next(c for c in op_cases(CONFIG, BATCH, SIZE, DEVICE, winograd_channels=WINOGRAD_CHANNELS)
                if c.name == name)
    try:
        fused = case.fused(backend)
    except NotApplicable as e:
        pytest.skip(str(e))
    call = op_call(fused, case.inputs, kind, DEVICE)

    def run():
        out = call()
        _sync()
        return out.detach().clone()
    got = benchmark(run)
    want = op_call(case.reference, case.inputs, kind, DEVICE)()
    problem = case.check(kind, got, want)
    assert problem is None, problem
