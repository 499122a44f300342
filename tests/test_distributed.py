"""Data-parallel fused training: 2 gloo processes with batch b == 1 process with batch 2b."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from council_fast.config import packaged_config
from council_fast.training.distributed import TorchDistributedHooks, is_writer, shard
from council_fast.training import DataParallelHooks, FusedCouncilTrainer
from council_fast.parity import GradientRecorder, synthetic_batch

WORLD = 2
PER_RANK = 1
SIZE = 32
# How many times the effect of one input rounding the 2-process run may differ from the 1-process one.
# Calibrated over 10 yardsticks (sign seeds 0, 200, ..., 1800 of the perturbation, 2-core AMD EPYC, torch
# 2.13.0): the factor each needed (beside the 1e-5 norm term) was 0.76-2.05, median 1.0, always for the
# style MLP's first bias; 8 is 4x the largest. A wrong or missing average is off by orders of magnitude more.
ROUNDING_FACTOR = 8.0


def _train(trainer, hooks, perturb: float = 0.0, sign_seed: int = 0) -> dict:
    """Two iterations: the council on (from the initial weights), then off; losses and gradients of both.

    In this order every update runs from weights where the tiny council is well conditioned: after
    a training step its council-D first-layer gradient is not (the reference engine's own moves by
    ~9e-4 when its inputs move by 1e-7), and the council-D does not update with the council off.
    """
    config = trainer.config
    recorder = GradientRecorder(trainer)
    out = {"losses": [], "grads": [], "initial": trainer.network_states()}
    for step, iteration in enumerate((config["council"]["council_start_at_iter"], 0)):
        x_a, x_b = synthetic_batch(config, WORLD * PER_RANK, SIZE, 40 + step, "cpu")
        if perturb:  # every input moved by `perturb` relative, signs at random (the rounding yardstick)
            signs = torch.randint(0, 2, x_a.shape, generator=torch.Generator().manual_seed(sign_seed + step)) * 2 - 1
            x_a, x_b = x_a * (1 + perturb * signs), x_b * (1 + perturb * signs.flip(0))
        trainer.iteration = iteration
        recorder.grads = {}
        losses = trainer.step(shard(x_a, hooks), shard(x_b, hooks))
        out["losses"].append({k: float(v) for k, v in losses.items()})
        out["grads"].append(dict(recorder.grads))
    out["networks"] = trainer.network_states()
    out["history"] = trainer.state_dict()["loss_history"]
    return out


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        hooks = TorchDistributedHooks()
        trainer = FusedCouncilTrainer(packaged_config("tiny"), "cpu", seed=0, hooks=hooks)
        result = _train(trainer, hooks)
        if is_writer(hooks):
            torch.save(result, result_file)
    finally:
        dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    result_file = str(tmp / "rank0.pt")
    mp.spawn(_worker, args=(str(tmp / "init"), result_file), nprocs=WORLD, join=True)
    parallel = torch.load(result_file, weights_only=True)
    torch.set_num_threads(2)
    single = _train(FusedCouncilTrainer(packaged_config("tiny"), "cpu", seed=0), DataParallelHooks())
    # The yardstick: the same single-process run with its inputs moved by about one fp32 ulp (2^-23 relative).
    # Two processes round differently than one (their batch splits, the all-reduce); how far rounding-level
    # differences carry through this computation is what this run measures, per tensor.
    yardstick = _train(FusedCouncilTrainer(packaged_config("tiny"), "cpu", seed=0), DataParallelHooks(),
                       perturb=2.0 ** -23)
    single["rounding"] = [{k: (y[k] - g).norm() for k, g in gs.items()}
                          for y, gs in zip(yardstick["grads"], single["grads"])]
    return parallel, single


def test_losses_match_the_doubled_batch(results):
    parallel, single = results
    for lp, ls in zip(parallel["losses"], single["losses"]):
        assert set(lp) == set(ls)
        assert any("/council/" in k for k in ls) == (lp is parallel["losses"][0])
        for k in ls:
            assert math.isclose(lp[k], ls[k], rel_tol=1e-5), k


def test_gradients_are_averaged_to_the_doubled_batch(results):
    parallel, single = results
    from council_fast.parity import dead_parameter_keys
    dead = dead_parameter_keys(packaged_config("tiny"))
    ratios = []
    for gp, gs, rounding in zip(parallel["grads"], single["grads"], single["rounding"]):
        assert set(gp) == set(gs) and gs
        for k, g in gs.items():
            if k[1] == "gen" and k[3] in dead:
                continue  # zero up to rounding (the norm cancels these biases)
            # Norm-wise, against what one rounding of the inputs moves this tensor by in the same computation
            # (instance norms over 8x8 planes amplify rounding ~100x in some tensors): the two processes may
            # differ by ROUNDING_FACTOR times that, plus 1e-5 of the tensor (for tensors rounding barely moves);
            # a missing or wrong average would be an O(1) error.
            diff = (gp[k] - g).norm()
            ratios.append((float(diff / rounding[k]) if rounding[k] > 0 else float("inf"), k))
            assert diff <= ROUNDING_FACTOR * rounding[k] + 1e-5 * g.norm(), (k, float(diff), float(rounding[k]))
    print("largest ratios of the 2-process difference to the rounding yardstick:", sorted(ratios)[-5:])
    assert any(k[1] == "dis_council" for k in gs) is False and any(k[1] == "dis_council" for k in parallel["grads"][0])


def test_parameters_and_histories_match(results):
    parallel, single = results
    from council_fast.parity import dead_parameter_keys
    dead = dead_parameter_keys(packaged_config("tiny"))
    for d, kinds in single["networks"].items():
        for kind, states in kinds.items():
            for i, sd in enumerate(states):
                for key, t in sd.items():
                    if (kind == "gen" and key in dead) or not t.is_floating_point() or t.norm() == 0:
                        continue
                    # Updates, norm-wise (Adam turns rounding noise in near-zero gradient elements into
                    # steps of up to lr; see council_fast.parity): a missing average is an O(1) error.
                    start = single["initial"][d][kind][i][key]
                    mine, want = parallel["networks"][d][kind][i][key] - start, t - start
                    if want.norm() > 0:
                        assert ((mine - want).norm() / want.norm()) < 1e-2, (kind, i, key)
    for h in ("gan", "council"):
        for qp, qs in zip(parallel["history"]["b2a"][h], single["history"]["b2a"][h]):
            assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(qp, qs))
    assert parallel["history"]["b2a"]["council"][0][-1] != 1.0  # the council loss was recorded


def test_shard_splits_evenly():
    class Two(DataParallelHooks):
        world, rank = 2, 1
    x = torch.arange(6).view(6, 1)
    assert shard(x, Two()).flatten().tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="does not split"):
        shard(torch.zeros(3, 1), Two())
    assert is_writer(None) and not is_writer(Two())
