"""Shared pytest fixtures: small configs, seeding, the shared official facts, synthetic data."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from council_fast.config import packaged_config
from council_fast.ops import registry

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True, scope="session")
def exact_fp32_on_cuda():
    """fp32 comparisons mean fp32: cuDNN convolutions default to TF32 on Ampere and newer (~1e-3 off),
    which the reference path would use and the fused fp32 kernels do not."""
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    yield


@pytest.fixture(autouse=True, scope="session")
def poisoned_kernel_outputs():
    """Every fused op's outputs start as NaN in tests (ops/registry.py), so an element a kernel never
    writes fails the comparison with its reference twin."""
    with registry.poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def restore_cudnn_benchmark():
    """`council-fast` commands turn cuDNN autotuning on for the process; a test that runs one must not
    change the algorithms of the tests after it."""
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of the packaged 'tiny' config (safe to modify)."""
    return copy.deepcopy(packaged_config("tiny"))


@pytest.fixture
def micro_config(tiny_config) -> dict:
    """Smaller still: 2 members, 16x16 crops, 4-channel networks (for multi-iteration tests)."""
    c = tiny_config
    c["council"]["council_size"] = 2
    c["gen"].update(dim=4, mlp_dim=8, style_dim=4)
    c["dis"]["dim"] = 4
    c.update(new_size=16, crop_image_height=16, crop_image_width=16, batch_size=2)
    return c


@pytest.fixture
def seeded():
    """Seed torch, numpy and python's random with 0; returns the seed."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return 0


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder beside the repository (official facts); skips when absent."""
    if not (SHARED_DIR / "official").is_dir():
        pytest.skip(f"{SHARED_DIR}/official not found (CI puts ../shared beside the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small two-domain dataset in the official layout (8 train, 2 test images per domain, 32x32)."""
    from council_fast.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, n_train=8, n_test=2, size=32, seed=0)
    return root


@pytest.fixture
def single_thread():
    """Run torch on one intra-op thread for the test (tiny tensors on a shared 2-core machine run far
    faster without OpenMP barriers); restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and steady on a busy host
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
