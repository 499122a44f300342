"""Graph capture of the fused training iteration (council_fast.training.graphs).

On the CPU the CUDA graph is emulated (tests/_graph_emulator.py: the captured ops are recorded with
their tensors and replayed on them, host reads inside the capture raise), so what a graph gets wrong
shows up here too: a value baked in at capture that should change (learning rate, z, council
partners, images, Adam's step count), a host synchronisation, a stale optimizer state after a load.
The same comparisons run with real CUDA graphs on a GPU (marked gpu).
"""
from __future__ import annotations

import copy
import importlib
import math
import warnings

import pytest
import torch

from _compare import assert_states_close
from _graph_emulator import HostReadDuringCapture, RecordingCapturer
from council_fast.config import packaged_config
from council_fast.cuda_graphs import CudaGraphError
from council_fast.training import DataParallelHooks, FusedCouncilTrainer, make_trainer
from council_fast.parity import dead_parameter_keys, synthetic_batch

SIZE = 32
COUNCIL_START = 5  # iterations 0-1 warm up, 2 is captured, 2-4 replay; 5-6 warm up, 7 captured, 7-9 replay
ITERATIONS = 10
# capturable fp32 Adam vs plain fp32 Adam, both against float64 Adam: their error ratio measured 1.0-1.6 (6 seeds)
ADAM_FACTOR = 4.0


@pytest.fixture
def config():
    c = packaged_config("tiny")
    c["council"]["council_start_at_iter"] = COUNCIL_START
    c["council"]["council_size"] = 4  # 2 partners of 3 others: the partner sets vary, not just their order
    c["step_size"] = 1  # the learning rate changes every iteration: a baked-in lr cannot pass
    return c


@pytest.fixture
def capturable_adam_on_cpu(monkeypatch):
    """torch allows capturable Adam on accelerators only; its capturable path is plain tensor code."""
    adam_module = importlib.import_module("torch.optim.adam")  # torch.optim.adam is also a function's name
    supported = adam_module._get_capturable_supported_devices
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices",
                        lambda supports_xla=True: [*supported(supports_xla), "cpu"])


def _batches(config, device, n=ITERATIONS):
    return [synthetic_batch(config, 2, SIZE, 50 + i, device) for i in range(n)]


class _RefusingCapturer(RecordingCapturer):
    """Refuses every capture: the trainer then runs each iteration eagerly (after one warning)."""

    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def _eager_twin(config, device="cpu", seed=3, precision="fp32") -> FusedCouncilTrainer:
    """The graphed engine's exact eager counterpart: the same capturable Adam, no capture."""
    return FusedCouncilTrainer(config, device, seed=seed, precision=precision, cuda_graphs=True,
                               graph_capturer=_RefusingCapturer(), strict=False)


def _assert_identical(got: dict, expected: dict) -> None:
    for d in expected:
        for kind in expected[d]:
            for i, (g, e) in enumerate(zip(got[d][kind], expected[d][kind])):
                for k, t in e.items():
                    assert torch.equal(g[k], t), (d, kind, i, k)


def _run_side_by_side(config, eager, graphed, batches, tol: tuple[float, float] | None = None):
    """Step both; compare losses, parameters, histories, optimizers, RNG states.

    ``tol=None``: bit for bit (against the eager twin); else (losses, updates) relative tolerances.
    """
    start = copy.deepcopy(eager.network_states())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="council-fast: CUDA graph capture")  # the twin's refusal
        for x_a, x_b in batches:
            expected, got = eager.step(x_a, x_b), graphed.step(x_a, x_b)
            assert list(got) == list(expected)
            for k in expected:
                if tol is None:
                    assert torch.equal(got[k], expected[k]), k
                else:
                    assert math.isclose(float(got[k]), float(expected[k]), rel_tol=tol[0], abs_tol=1e-7), k
    if tol is None:
        _assert_identical(graphed.network_states(), eager.network_states())
    else:
        # Capturable Adam computes its bias corrections on the device (eager Adam in float64 on the host):
        # rounding-level differences, which gradients at the rounding floor (the normalised-away generator
        # biases, skipped) turn into steps anywhere in [-lr, lr]. The updates are small against the weights:
        # fp32 storage rounding (2e-7 of the weights) is allowed on top.
        assert_states_close(graphed.network_states(), eager.network_states(), tol[1], dead_parameter_keys(config),
                            start, storage_floor=2e-7)
    assert torch.equal(graphed.noise.get_state(), eager.noise.get_state())
    assert graphed.choices.getstate() == eager.choices.getstate()
    for d in eager.match_history:
        for h, hist in eager.match_history[d].items():
            torch.testing.assert_close(graphed.match_history[d][h], hist, rtol=0 if tol is None else tol[0], atol=0)
    for kind, opt in eager.stacked_optimizers.items():
        mine = graphed.stacked_optimizers[kind]
        assert [g["lr"] for g in mine.param_groups] == [g["lr"] for g in opt.param_groups]
        steps = {float(s["step"]) for s in mine.state.values()}
        assert steps == {float(s["step"]) for s in opt.state.values()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_emulated_graphs_replay_the_eager_iteration_exactly(config, capturable_adam_on_cpu, precision):
    capturer = RecordingCapturer()
    graphed = FusedCouncilTrainer(config, "cpu", seed=3, precision=precision, cuda_graphs=True,
                                  graph_capturer=capturer, strict=True)
    _run_side_by_side(config, _eager_twin(config, precision=precision), graphed, _batches(config, "cpu"))
    assert graphed.graphs.captures == capturer.captures == 2  # before and after council_start_at_iter
    assert graphed.graphs.replays == capturer.replays == 6
    assert capturer.ops_recorded > 1000  # forward, backward and Adam of three updates
    assert len(graphed.graphs._slots) == 1  # the council stays on: the graph without it was dropped


@pytest.mark.parametrize("between", ["dis_update", "sample", "state_round_trip", "council_loss_only"])
def test_emulated_graphs_stay_exact_with_work_between_steps(config, capturable_adam_on_cpu, between):
    """What the training loop does between steps: extra D-only updates (numberOf_dis_relative_iteration
    > 1), samples, a checkpoint; and a config where only the council loss starts (no council-D)."""
    if between == "council_loss_only":
        config["council"]["flipOnOff_start_with"] = False
    eager = _eager_twin(config)
    graphed = FusedCouncilTrainer(config, "cpu", seed=3, cuda_graphs=True, graph_capturer=RecordingCapturer(),
                                  strict=True)
    batches = _batches(config, "cpu", 12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="council-fast: CUDA graph capture")
        for i, (x_a, x_b) in enumerate(batches):
            for trainer in (eager, graphed):
                if between == "dis_update":
                    trainer.dis_update(*batches[(i + 3) % len(batches)])
                elif between == "sample":
                    trainer.sample(x_a)
                elif between == "state_round_trip" and i == 7:
                    trainer.load_state_dict(copy.deepcopy(trainer.state_dict()))
            expected, got = eager.step(x_a, x_b), graphed.step(x_a, x_b)
            assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected), i
    _assert_identical(graphed.network_states(), eager.network_states())
    assert graphed.graphs.replays >= 3
    assert len(graphed.graphs._slots) == 1  # the graph from before the council's start was dropped


def test_emulated_graphs_stay_within_parity_of_the_plain_engine(config, capturable_adam_on_cpu):
    """The graphed engine is its capturable-Adam eager twin bit for bit (the tests above); the twin differs from
    the plain engine only in Adam: capturable Adam computes its bias corrections in fp32 tensors, plain Adam in
    float64 on the host. Over training steps a GAN turns any rounding difference into chaotic divergence, so
    engines side by side could only pass by luck; the one difference is bounded here instead, on the config's
    Adam settings, against a float64 yardstick: capturable Adam in fp32 may be at most ADAM_FACTOR times as far
    from float64 Adam as plain fp32 Adam is. A wrong bias correction is off by a share of lr per step,
    ~1e3 times that."""
    settings = dict(lr=config["lr"], betas=(config["beta1"], config["beta2"]), weight_decay=config["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4096, generator=gen, dtype=torch.float64) * 0.1
    # gradients from large to the rounding floor (as the normalised-away biases get), one set per step
    scales = torch.logspace(-12, 0, 4096, dtype=torch.float64)
    grads = [torch.randn(4096, generator=gen, dtype=torch.float64) * scales for _ in range(ITERATIONS)]

    def run(dtype, capturable):
        p = torch.nn.Parameter(start.to(dtype).clone())
        opt = torch.optim.Adam([p], capturable=capturable, **settings)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return p.detach().double()

    truth = run(torch.float64, False)
    plain = (run(torch.float32, False) - truth).abs().max().item()
    capturable = (run(torch.float32, True) - truth).abs().max().item()
    assert 0 < plain, "the yardstick must measure fp32 rounding"
    assert capturable <= ADAM_FACTOR * plain, (capturable, plain)
    assert ADAM_FACTOR * plain < 1e-2 * settings["lr"]  # far below what a wrong bias correction moves


def test_loading_a_state_drops_the_graphs(config, capturable_adam_on_cpu, tmp_path):
    """The load replaces the optimizer states a captured graph points at: capture again, stay exact."""
    config["council"]["council_start_at_iter"] = 100
    donor = FusedCouncilTrainer(config, "cpu", seed=5)
    for x_a, x_b in _batches(config, "cpu", 2):
        donor.step(x_a, x_b)
    state = donor.state_dict()
    graphed = FusedCouncilTrainer(config, "cpu", seed=3, cuda_graphs=True, graph_capturer=RecordingCapturer(),
                                  strict=True)
    for x_a, x_b in _batches(config, "cpu", 4):
        graphed.step(x_a, x_b)
    assert graphed.graphs.captures == 1
    eager = _eager_twin(config)
    eager.load_state_dict(copy.deepcopy(state))
    graphed.load_state_dict(copy.deepcopy(state))
    _run_side_by_side(config, eager, graphed, _batches(config, "cpu", 5))  # 2-3 warm up, 4 captured, 4-6 replay
    assert graphed.graphs.captures == 2 and graphed.graphs.replays == 2 + 3


def test_failed_capture_runs_eagerly_with_one_warning(config, capturable_adam_on_cpu):
    graphed = _eager_twin(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x_a, x_b in _batches(config, "cpu", 5):
            graphed.step(x_a, x_b)
    messages = [str(w.message) for w in caught if "CUDA graph capture" in str(w.message)]
    assert len(messages) == 1 and "council-D off" in messages[0] and "stream is capturing" in messages[0]
    assert graphed.graphs.captures == 0 and graphed.graphs.replays == 0


def test_failed_capture_raises_in_strict_mode(config, capturable_adam_on_cpu):
    graphed = FusedCouncilTrainer(config, "cpu", seed=3, cuda_graphs=True, graph_capturer=_RefusingCapturer(),
                                  strict=True)
    batches = _batches(config, "cpu", 3)
    for x_a, x_b in batches[:2]:
        graphed.step(x_a, x_b)
    with pytest.raises(CudaGraphError, match="training iteration .*stream is capturing"):
        graphed.step(*batches[2])


def test_graphs_are_refused_where_they_cannot_work(config):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        FusedCouncilTrainer(config, "cpu", cuda_graphs=True)

    class TwoProcesses(DataParallelHooks):
        world = 2

    class TorchrunOfOne(DataParallelHooks):
        world = 1

    for hooks in (TwoProcesses(), TorchrunOfOne()):
        with pytest.raises(NotImplementedError, match="one process only"):
            FusedCouncilTrainer(config, "cpu", cuda_graphs=True, hooks=hooks, graph_capturer=RecordingCapturer())
    config["council"]["flipOnOff"] = True  # not in the fused step: the reference step would run, ungraphed
    with pytest.raises(NotImplementedError, match="--cuda-graphs: the fused engine does not implement.*flipOnOff"):
        make_trainer(config, "auto", "cpu", cuda_graphs=True, graph_capturer=RecordingCapturer())


# ---------------------------------------------------------------------- the emulator itself

def test_emulator_capture_changes_nothing_and_replays_on_the_captured_tensors():
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    acc = torch.zeros(3, 2)
    capturer = RecordingCapturer()

    def fn():
        y = torch.relu(x @ w)
        acc.add_(y)
        return y

    replay, y = capturer.capture(fn)
    assert torch.equal(acc, torch.zeros(3, 2))  # as on a GPU, capturing ran nothing
    x.copy_(torch.randn(3, 4))  # new input in the static buffer
    replay()
    expected = torch.relu(x @ w)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(acc, expected, rtol=0, atol=0)
    replay()
    torch.testing.assert_close(acc, 2 * expected, rtol=0, atol=0)
    x_grad = torch.randn(3, 4, requires_grad=True)
    replay_grad, g = capturer.capture(lambda: torch.autograd.grad((x_grad * w.sum(1)).sum(), x_grad)[0])
    replay_grad()
    torch.testing.assert_close(g, w.sum(1).expand(3, 4))


@pytest.mark.parametrize("what,fn", [
    ("_local_scalar_dense", lambda t: t * float(t.sum())),
    ("to the host", lambda t: t * sum(t.tolist())),
    ("data-dependent", lambda t: t[t > 0]),
    ("data-dependent", lambda t: torch.nonzero(t)),
    ("data-dependent", lambda t: t.clone().index_put_((t > 0,), torch.tensor(0.0))),
    ("host data", lambda t: t + torch.tensor([1.0, 2.0, 3.0])),
    ("random numbers", lambda t: t + torch.randn(3)),
], ids=["item", "tolist", "bool-index", "nonzero", "bool-index_put", "host-tensor", "randn"])
def test_emulator_refuses_what_a_graph_cannot_capture(what, fn):
    t = torch.ones(3)
    with pytest.raises(HostReadDuringCapture, match=what):
        RecordingCapturer().capture(lambda: fn(t))
    assert torch.equal(t, torch.ones(3))


# ---------------------------------------------------------------------- real CUDA graphs

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_follow_the_eager_engine(config, precision):
    """Against the eager twin (same capturable Adam); GPU kernels may use atomics, so not bit for bit."""
    graphed = FusedCouncilTrainer(config, "cuda", seed=3, precision=precision, cuda_graphs=True, strict=True)
    tol = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 5e-2)}[precision]
    _run_side_by_side(config, _eager_twin(config, "cuda", precision=precision), graphed, _batches(config, "cuda"),
                      tol=tol)
    assert graphed.graphs.captures == 2 and graphed.graphs.replays == 6


def test_train_command_refuses_graphs_it_cannot_use(synthetic_data, tmp_path, capsys):
    from council_fast.cli import main

    base = ["train", "--config", "tiny", "--data", str(synthetic_data), "--iters", "1", "--cuda-graphs"]
    assert main(base + ["--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "--cuda-graphs needs --engine fused" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--device", "cpu", "--engine", "fused"]) == 2
    assert "--cuda-graphs: CUDA graphs need a CUDA device" in capsys.readouterr().err
