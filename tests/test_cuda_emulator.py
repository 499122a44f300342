"""The CUDA emulator (tests/_cuda_emulator.py, tests/cuda_emu/) that runs csrc/*_cuda.cu on the CPU.

Its own claims are checked with the small kernels of tests/cuda_emu/selftest_cuda.cu: barriers, warp
shuffles, shared memory starting as garbage, and the errors for what a GPU would refuse or leave
undefined. The last tests check that the ``cuda-emulated`` back-end really runs the CUDA kernels.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

import _cuda_emulator as emu
from _backends import HAS_CUDA
from council_fast.ops import adain as adain_mod
from council_fast.ops import decoder_tail as tail_mod


@pytest.fixture(scope="module")
def selftest():
    emu.build()
    return torch.ops.cuda_emu_selftest


def _nan(n):
    return torch.full((n,), float("nan"))


def test_rewrite_leaves_no_cuda_syntax():
    sources = emu.cuda_sources() + sorted(glob.glob(os.path.join(emu.EMU_DIR, "*_cuda.cu")))
    assert len(sources) >= 3
    for path in sources:
        text = open(path).read()
        rewritten = emu.rewrite(text)
        assert text.count("<<<") == rewritten.count("::cf_emu::launch(") > 0, path
        for construct in ("<<<", ">>>", "__shared__", "<c10/cuda/", "<cuda_"):
            assert construct not in rewritten, (path, construct)


def test_barrier_orders_shared_memory(selftest):
    out = _nan(64)
    selftest.broadcast(out, True)
    assert torch.equal(out, torch.full((64,), 42.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_missing_barrier_reads_garbage(selftest, seed):
    """Without the barrier, threads scheduled before thread 0 read shared memory nobody wrote (NaN)."""
    torch.ops.cuda_emu.set_seed(seed)
    out = _nan(64)
    selftest.broadcast(out, False)
    assert out.isnan().any() and (out == 42).any()


def test_warp_shuffles(selftest):
    xor_sums, down_sums = _nan(64), _nan(64)
    selftest.warp_sums(xor_sums, down_sums)
    warp_totals = torch.tensor([sum(range(32)), sum(range(32, 64))], dtype=torch.float32)
    assert torch.equal(xor_sums, warp_totals.repeat_interleave(32))
    assert torch.equal(down_sums[[0, 32]], warp_totals)


def _shuffle_source(kind, lane, arg, width):
    """The lane each lane reads, as the CUDA programming guide defines the shuffles."""
    first = lane - lane % width
    if kind == 0:  # xor: a later group of lanes is out of reach
        return lane if (lane ^ arg) >= first + width else lane ^ arg
    if kind == 1:  # down: past the end of the group, the lane's own value
        return lane + arg if lane % width + arg < width else lane
    return first + arg % width


@pytest.mark.parametrize("kind, arg, width", [(0, 1, 32), (0, 16, 16), (0, 5, 8), (0, 24, 32), (1, 3, 32),
                                              (1, 4, 8), (1, 16, 16), (2, 7, 32), (2, 19, 16), (2, 3, 4)])
def test_every_lane_of_a_shuffle(selftest, kind, arg, width):
    out = _nan(64)
    selftest.shuffle(out, kind, arg, width)
    expected = [float(32 * (t // 32) + _shuffle_source(kind, t % 32, arg, width)) for t in range(64)]
    assert out.tolist() == expected


def test_divergent_barrier_is_a_deadlock(selftest):
    with pytest.raises(RuntimeError, match="deadlock.*divergent __syncthreads"):
        selftest.divergent_barrier(_nan(32))
    out = _nan(32)  # the emulator recovers for the next launch
    selftest.broadcast(out, True)
    assert torch.equal(out, torch.full((32,), 42.0))


def test_shuffle_with_an_exited_lane_is_an_error(selftest):
    with pytest.raises(RuntimeError, match="reads lane 5, which did not take part"):
        selftest.exited_lane(_nan(32))


def test_dynamic_shared_memory_limit(selftest):
    small = torch.randn(3, 100)
    out = _nan(3)
    selftest.dynamic_shared(small, out, False)
    torch.testing.assert_close(out, small.sum(1))
    large = torch.randn(2, 20000)  # 80 KB: over the 48 KB a kernel gets without opting in
    with pytest.raises(RuntimeError, match="80000 bytes of dynamic shared memory, the kernel allows 49152"):
        selftest.dynamic_shared(large, _nan(2), False)
    out = _nan(2)
    selftest.dynamic_shared(large, out, True)
    torch.testing.assert_close(out, large.sum(1), rtol=1e-5, atol=1e-3)  # 20,000 terms summed in another order


def test_static_and_dynamic_shared_memory_share_one_limit(selftest):
    out = _nan(32)
    selftest.mixed_shared(out, 16 * 1024)  # 16 KB static + 16 KB dynamic: fits in 48 KB
    assert torch.equal(out, torch.full((32,), 3.0))
    with pytest.raises(RuntimeError, match="16384 bytes of static and 40960 of dynamic shared memory: more than "
                                           "the 49152 a block gets without cudaFuncSetAttribute"):
        selftest.mixed_shared(_nan(32), 40 * 1024)


def test_rewrite_refuses_file_scope_shared_memory():
    with pytest.raises(RuntimeError, match="__shared__ outside a function"):
        emu.rewrite("namespace {\n__shared__ float table[32];\n__global__ void k(float* o) { o[0] = table[0]; }\n}\n")
    assert "shared_var" in emu.rewrite("__global__ void k(float* o) {\n  __shared__ float t[32];\n  o[0] = t[0];\n}\n")


def test_launch_geometry(selftest):
    out = _nan(3 * 2 * 5 * 7)
    selftest.indices(out, 3, 2, 5, 7)
    assert torch.equal(out, torch.arange(out.numel(), dtype=torch.float32))
    with pytest.raises(RuntimeError, match="invalid block size"):
        selftest.indices(_nan(1025), 1, 1, 1025, 1)


@pytest.mark.skipif(HAS_CUDA, reason="the real cuda back-end runs on this machine")
def test_emulated_backend_runs_the_cuda_kernels(monkeypatch):
    backend = emu.install(monkeypatch)
    monkeypatch.setattr(adain_mod, "CUDA_SPLIT_THRESHOLD", 64)
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    before = emu.launches()
    y = adain_mod.adain(x, torch.randn(2, 3), torch.randn(2, 3), relu=True, backend=backend)
    assert emu.launches() - before == 2  # split path: statistics, then normalise
    y.sum().backward()
    assert emu.launches() - before == 4

    h = torch.randn(2, 5, 4, 3, requires_grad=True)
    w = [torch.randn(5, 5), torch.randn(5), torch.randn(5, 5), torch.randn(5), torch.randn(8, 5), torch.randn(8)]
    before = emu.launches()
    out, masks = tail_mod.decoder_tail(h, *w, torch.rand(2, 3, 4, 3), 2, backend=backend)
    (out.sum() + masks.sum()).backward()
    assert emu.launches() - before == 2
