"""The `parity` command: fused engine vs reference engine, exit status."""
from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from council_fast.cli import parity
from council_fast.training import fused as fused_trainer
from council_fast.config import load_config
from council_fast.parity import compare_iteration

torch.set_num_threads(2)


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)  # what council_fast.cli does with a command module
    status = parity.run(parser.parse_args(argv))
    return status, capsys.readouterr().out


def test_default_parity_passes(capsys):
    status, out = _run([], capsys)
    assert status == 0, out
    assert "PASS" in out and "FAIL" not in out
    assert "iteration 0 (council off)" in out and "(council on)" in out
    for check in ("losses", "gradients", "parameters", "parameter updates"):
        assert f"ok   {check}" in out


def test_a_perturbed_loss_fails(capsys, monkeypatch):
    real = fused_trainer.lsgan_gen_loss_per_member
    monkeypatch.setattr(fused_trainer, "lsgan_gen_loss_per_member", lambda outs: real(outs) * (1 + 1e-3))
    status, out = _run(["--batch", "1"], capsys)
    assert status == 1, out
    assert "FAIL losses" in out and "adv" in out


def test_perturbed_gradients_fail_even_where_adam_hides_them(capsys, monkeypatch):
    """Adam is invariant to a gradient scale, so only the gradient check can see this one."""
    original = fused_trainer.FusedCouncilTrainer._step_optimizer

    def scaled(self, kind):
        if kind == "dis":
            for group in self.stacked_optimizers[kind].param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(1.01)
        original(self, kind)

    monkeypatch.setattr(fused_trainer.FusedCouncilTrainer, "_step_optimizer", scaled)
    status, out = _run(["--batch", "1"], capsys)
    assert status == 1, out
    assert "FAIL gradients" in out and "/dis/" in out
    assert "ok   losses" in out


def test_cuda_request_without_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    status, _ = _run(["--device", "cuda"], capsys)
    assert status == 2


def test_a_config_the_fused_engine_does_not_implement_is_refused(tmp_path, capsys):
    config = load_config("tiny")
    config["dis"]["gan_type"] = "nsgan"
    path = tmp_path / "nsgan.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    assert parity.run(parser.parse_args(["--config", str(path)])) == 2
    err = capsys.readouterr().err
    assert "does not implement dis.gan_type = nsgan" in err and "nothing to compare" in err


def _one_parameter_iteration(grad_ref, grad_fused, before, after_ref, after_fused, lr=1e-4):
    key = ("b2a", "gen", 0, "w")
    states = lambda t: {"b2a": {"gen": [{"w": t}]}}  # noqa: E731
    return compare_iteration("one", {"l": 1.0}, {"l": 1.0}, {key: grad_ref}, {key: grad_fused}, states(after_ref),
                             states(after_fused), states(before), set(), lr, 1e-4)


def _check(comparison, name):
    return next(c for c in comparison.checks if c.name.startswith(name))


def test_noise_floor_elements_are_compared_against_lr_not_norm_wise():
    """Element 2's gradient is rounding noise (1e-7 of the largest): Adam may move it anywhere in
    [-lr, lr] in each engine, so it leaves the norm-wise comparison and may differ by up to 2 lr."""
    lr = 1e-4
    grad = torch.tensor([1.0, -0.5, 1e-7])
    before = torch.zeros(3, dtype=torch.float64)
    after_ref = torch.tensor([-lr, lr, -lr], dtype=torch.float64)
    opposite = torch.tensor([-lr, lr, lr], dtype=torch.float64)  # the noise element stepped the other way
    ok = _one_parameter_iteration(grad, grad * (1 + 1e-6), before, after_ref, opposite, lr)
    assert ok.ok and _check(ok, "parameters (||a-b||").worst == 0.0
    assert abs(_check(ok, "noise-floor").worst - 2.0) < 1e-9
    too_far = torch.tensor([-lr, lr, 2 * lr], dtype=torch.float64)
    bad = _one_parameter_iteration(grad, grad, before, after_ref, too_far, lr)
    assert not bad.ok and not _check(bad, "noise-floor").ok
    live_difference = torch.tensor([-lr, 0.9 * lr, -lr], dtype=torch.float64)  # a real element differs
    bad = _one_parameter_iteration(grad, grad, before, after_ref, live_difference, lr)
    assert not _check(bad, "parameters (||a-b||").ok


def test_parity_passes_with_the_cuda_kernels_emulated(capsys, monkeypatch):
    """The fused engine on the cuda back-end's kernels (run by the CUDA emulator on the CPU)."""
    from _backends import require_backend
    import _cuda_emulator

    monkeypatch.setenv("COUNCIL_FAST_BACKEND", require_backend("cuda-emulated", monkeypatch))
    before = _cuda_emulator.launches()
    status, out = _run([], capsys)
    assert status == 0, out
    assert _cuda_emulator.launches() > before
