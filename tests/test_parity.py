"""The `parity` command: fused engine vs reference engine, exit status."""
from __future__ import annotations

import argparse

import pytest
import torch

from council_fast import fused_trainer, parity

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
