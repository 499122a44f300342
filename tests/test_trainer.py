"""The reference trainer: what each update touches, the council schedule, loss matching, exact resume,
the data pipeline it reads, and the `train` command end to end."""
from __future__ import annotations

import copy
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from council_fast import checkpoint as ckpt
from council_fast.cli import main
from council_fast.data import DataError, TrainPairLoader, make_synthetic_dataset
from council_fast.training.reference import CouncilTrainer

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(config, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (config["batch_size"], 3, config["crop_image_height"], config["crop_image_width"])
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1


def _snapshot(trainer):
    return {kind: [p.detach().clone() for p in trainer.parameters(kind)] for kind in ("gen", "dis", "dis_council")}


def _changed(before, trainer, kind):
    return [not torch.equal(a, b) for a, b in zip(before[kind], trainer.parameters(kind))]


def _replay_noise(trainer, batch):
    g = torch.Generator()
    g.set_state(trainer.noise.get_state())
    return torch.randn(batch, trainer.config["gen"]["style_dim"], 1, 1, generator=g)


def test_each_update_changes_only_its_own_networks(micro_config):
    trainer = CouncilTrainer(micro_config, "cpu")
    trainer.iteration = micro_config["council"]["council_start_at_iter"]
    x_a, x_b = _batch(micro_config, 0)
    for update, kind in ((trainer.dis_update, "dis"), (trainer.dis_council_update, "dis_council"),
                         (trainer.gen_update, "gen")):
        before = _snapshot(trainer)
        update(x_a, x_b)
        for other in ("gen", "dis", "dis_council"):
            changed = _changed(before, trainer, other)
            if other == kind:
                assert any(changed), f"{update.__name__} left {kind} unchanged"
            else:
                assert not any(changed), f"{update.__name__} changed {other}"
    # The style encoder is never used by translation, so it never receives a gradient.
    style = [p for p in trainer.gen("b2a", 0).enc_style.parameters()]
    assert all(p.grad is None for p in style)


def test_dis_loss_of_b2a_is_not_scaled_by_gan_w(micro_config):
    trainer = CouncilTrainer(micro_config, "cpu")
    x_a, x_b = _batch(micro_config, 1)
    z = _replay_noise(trainer, x_a.size(0))
    dis = copy.deepcopy(trainer.nets["b2a"]["dis"][0])
    with torch.no_grad():
        fake = trainer.gen("b2a", 0).translate(x_b, z)
    c = micro_config
    opt = torch.optim.Adam(dis.parameters(), lr=c["lr"], betas=(c["beta1"], c["beta2"]), weight_decay=c["weight_decay"])
    loss = dis.calc_dis_loss(fake, x_a)
    loss.backward()
    opt.step()
    losses = trainer.dis_update(x_a, x_b)
    assert float(losses["b2a/dis/0"]) == float(loss.detach())
    for ours, expected in zip(trainer.nets["b2a"]["dis"][0].parameters(), dis.parameters()):
        assert torch.equal(ours, expected)


class _FirstChoice:
    """Stands in for the trainer's choice RNG: always the first candidate, and records the pools."""

    def __init__(self):
        self.pools = []

    def choice(self, pool):
        self.pools.append(list(pool))
        return pool[0]


def test_council_dis_comparisons_refill_the_pool_and_divide_by_the_configured_count(micro_config):
    c = micro_config
    c["council"].update(council_size=3, numberOfCouncil_dis_relative_iteration=4)
    trainer = CouncilTrainer(c, "cpu")
    trainer.iteration = c["council"]["council_start_at_iter"]
    trainer.choices = _FirstChoice()
    x_a, x_b = _batch(c, 2)
    z = _replay_noise(trainer, x_a.size(0))
    less = c["council"]["discriminetro_less_style_by"]
    with torch.no_grad():
        y = [trainer.gen("b2a", i).translate(x_b, z) for i in range(3)]
        y_less = [trainer.gen("b2a", i).translate(x_b, z * less) for i in range(3)]
        d0 = trainer.nets["b2a"]["dis_council"][0]
        # Member 0: pool [1, 2] -> 1, pool [2] -> 2, refilled [1, 2] -> 1, then k == council_size stops.
        expected = sum(float(d0.calc_dis_loss(y[0], y_less[j], x_b)) for j in (1, 2, 1)) / 4
    losses = trainer.dis_council_update(x_a, x_b)
    assert trainer.choices.pools[:3] == [[1, 2], [2], [1, 2]]
    assert len(trainer.choices.pools) == 9
    assert float(losses["b2a/dis_council/0"]) == pytest.approx(expected, rel=1e-6)


def test_council_losses_start_at_council_start_at_iter(micro_config):
    start = micro_config["council"]["council_start_at_iter"]
    trainer = CouncilTrainer(micro_config, "cpu")
    x_a, x_b = _batch(micro_config, 3)
    trainer.iteration = start - 1
    before = _snapshot(trainer)
    assert trainer.dis_council_update(x_a, x_b) == {}
    assert not any(_changed(before, trainer, "dis_council"))
    losses = trainer.gen_update(x_a, x_b)
    assert not any("council" in k or "match" in k for k in losses)
    assert all(v == 1.0 for q in trainer.history["b2a"]["council"] for v in q)

    trainer.iteration = start
    assert set(trainer.dis_council_update(x_a, x_b)) == {f"b2a/dis_council/{i}" for i in range(2)}
    losses = trainer.gen_update(x_a, x_b)
    assert {f"b2a/council/{i}" for i in range(2)} <= set(losses)
    assert trainer.history["b2a"]["council"][0][-1] == float(losses["b2a/council/0"])


def test_loss_matching_factor_uses_histories_after_appending(micro_config):
    c = micro_config
    n = c["loss_matching_hist_size"]
    trainer = CouncilTrainer(c, "cpu")
    trainer.iteration = c["council"]["council_start_at_iter"]
    gan_hist = [0.5 + 0.25 * k for k in range(n)]
    council_hist = [3.0 - 0.125 * k for k in range(n)]
    trainer.history["b2a"]["gan"][0].extend(gan_hist)
    trainer.history["b2a"]["council"][0].extend(council_hist)
    losses = trainer.gen_update(*_batch(c, 4))
    adv, council = float(losses["b2a/adv/0"]), float(losses["b2a/council/0"])
    expected = (sum(gan_hist[1:]) + adv) / n / ((sum(council_hist[1:]) + council) / n)
    assert losses["b2a/match/0"] == pytest.approx(expected, rel=1e-12)
    total = c["gan_w"] * adv + c["council_w"] * expected * council
    assert float(losses["total/0"]) == pytest.approx(total, rel=1e-5)
    # Member 1 kept the initial histories of ones.
    m1 = (n - 1 + float(losses["b2a/adv/1"])) / (n - 1 + float(losses["b2a/council/1"]))
    assert losses["b2a/match/1"] == pytest.approx(m1, rel=1e-12)


def _assert_trainers_equal(a, b):
    for kind in ("gen", "dis", "dis_council"):
        for p, q in zip(a.parameters(kind), b.parameters(kind)):
            assert torch.equal(p, q), kind
    for oa, ob in zip(a.optimizers, b.optimizers):
        for kind in oa:
            sa, sb = oa[kind].state_dict()["state"], ob[kind].state_dict()["state"]
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


def test_resume_is_exact(micro_config, tmp_path):
    c = micro_config
    c["council"].update(council_start_at_iter=1, council_size=3)  # 3 members: the pair choices are random
    c["step_size"] = 2  # the LR schedule changes inside the window
    batches = [_batch(c, 10 + k) for k in range(4)]
    straight = CouncilTrainer(c, "cpu")
    for x_a, x_b in batches:
        straight.step(x_a, x_b)

    first = CouncilTrainer(c, "cpu")
    for x_a, x_b in batches[:2]:
        first.step(x_a, x_b)
    path = ckpt.full_state_path(tmp_path, first.iteration)
    ckpt.save_full_state(path, first.state_dict())
    del first
    resumed = CouncilTrainer(c, "cpu", seed=123)  # a different seed: everything must come from the file
    resumed.load_state_dict(ckpt.load_full_state(path), path)
    assert resumed.iteration == 2
    for x_a, x_b in batches[2:]:
        resumed.step(x_a, x_b)
    _assert_trainers_equal(straight, resumed)
    assert resumed.history == straight.history
    assert resumed.optimizers[0]["gen"].param_groups[0]["lr"] == straight.optimizers[0]["gen"].param_groups[0]["lr"]


def test_unsupported_loss_weight_is_a_clear_error(micro_config):
    micro_config["vgg_w"] = 1.0
    with pytest.raises(NotImplementedError, match="vgg_w"):
        CouncilTrainer(micro_config, "cpu")


def test_both_directions_train(micro_config):
    micro_config["do_a2b"] = True
    trainer = CouncilTrainer(micro_config, "cpu")
    trainer.iteration = micro_config["council"]["council_start_at_iter"]
    losses = trainer.step(*_batch(micro_config, 5), as_floats=True)
    for d in ("a2b", "b2a"):
        assert {f"{d}/dis/0", f"{d}/dis_council/0", f"{d}/adv/0", f"{d}/council/0"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    assert len(trainer.optimizers[0]["gen"].param_groups[0]["params"]) == 2 * len(
        list(trainer.gen("b2a", 0).parameters()))


def test_flip_on_off_schedule():
    from council_fast.training.common import flip_on as _flip_on
    council = {"flipOnOff_On_iteration": 3, "flipOnOff_Off_iteration": 2, "flipOnOff_start_with": True}
    assert [_flip_on(council, it) for it in range(7)] == [True, True, True, False, False, True, True]
    council["flipOnOff_start_with"] = False  # starts off for Off iterations, then on
    assert [_flip_on(council, it) for it in range(7)] == [False, False, True, True, True, False, False]


@pytest.mark.parametrize("switch, keys", [
    ({"council_abs_w": 0.5}, {"b2a/council_abs/0"}),
    ({"mask_zero_or_one_w": 0.1, "mask_total_w": 0.2, "mask_tv_w": 0.3},
     {"b2a/mask_zero_one/0", "b2a/mask_total/0", "b2a/mask_tv/0"}),
    ({"abs_beginning_end": 1.0, "abs_beginning_end_less_by": 0.5}, {"b2a/beginning_end/0"}),
    ({"gen": {"useRandomDis": True}, "dis": {"useRandomGen": True, "do_Dis_only_gray": True}}, {"b2a/adv/0"}),
    ({"council": {"flipOnOff": True}}, {"b2a/council/0"}),
])
def test_optional_official_switches_run(micro_config, switch, keys):
    c = micro_config
    for key, value in switch.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    c["focus_loss"]["focus_loss_start_at_iter"] = 0
    trainer = CouncilTrainer(c, "cpu")
    trainer.iteration = c["council"]["council_start_at_iter"]
    losses = trainer.step(*_batch(c, 6), as_floats=True)
    assert keys <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())


def test_mask_losses_match_hand_computation(micro_config):
    c = micro_config
    c.update(mask_zero_or_one_w=0.1, mask_total_w=0.2, mask_tv_w=0.3)
    c["focus_loss"].update(mask_small_use_abs=True, mask_small_use_square=True)
    trainer = CouncilTrainer(c, "cpu")
    mask = torch.rand(2, 3, 4, 5)
    total, logs = trainer._focus_losses("b2a", 0, mask)
    m = mask.double().numpy()
    zero_one = np.sum(1 / (np.abs(m - 0.5) + 0.01)) / m.size
    tv = (np.abs(np.diff(m, axis=2)).sum() + np.abs(np.diff(m, axis=3)).sum()) / m.size
    small = abs(m.sum()) / m.size + (m.sum() / m.size) ** 2
    assert float(logs["b2a/mask_zero_one/0"]) == pytest.approx(zero_one, rel=1e-5)
    assert float(logs["b2a/mask_tv/0"]) == pytest.approx(tv, rel=1e-5)
    assert float(logs["b2a/mask_total/0"]) == pytest.approx(small, rel=1e-5)
    assert float(total) == pytest.approx(0.1 * zero_one + 0.3 * tv + 0.2 * small, rel=1e-5)


# ---------------------------------------------------------------------- data pipeline

def test_data_loader_restarts_exactly_from_its_state(micro_config, synthetic_data):
    loader = TrainPairLoader(synthetic_data, micro_config, seed=5)
    for _ in range(3):  # 8 images, batch 2: crosses into the second epoch at batch 5
        loader.next_batch()
    state = copy.deepcopy(loader.state())
    expected = [loader.next_batch() for _ in range(4)]
    assert loader.epoch == 1
    again = TrainPairLoader(synthetic_data, micro_config, seed=5)
    again.load_state(state)
    for (ea, eb), (ga, gb) in zip(expected, (again.next_batch() for _ in range(4))):
        assert torch.equal(ea, ga) and torch.equal(eb, gb)
    assert ga.shape == (2, 3, 16, 16) and float(ga.min()) >= -1 and float(ga.max()) <= 1


def test_data_errors_name_the_folder(micro_config, tmp_path, synthetic_data):
    with pytest.raises(DataError, match="trainA"):
        TrainPairLoader(tmp_path, micro_config, seed=0)
    small = make_synthetic_dataset(tmp_path / "small", n_train=1, n_test=1, size=16)
    with pytest.raises(DataError, match=r"trainA.*at least 2"):
        TrainPairLoader(small, micro_config, seed=0)


def test_unreadable_images_are_skipped_with_a_warning(micro_config, tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_test=1, size=16)
    bad = os.path.join(root, "trainA", "00001.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    loader = TrainPairLoader(root, micro_config, seed=0)
    with pytest.warns(UserWarning, match="00001.png"):
        batches = [loader.next_batch() for _ in range(4)]
    assert all(a.shape[0] == 2 for a, _ in batches)


# ---------------------------------------------------------------------- the train command

def _write_config(config, path, **overrides):
    config = copy.deepcopy(config)
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _train(*args):
    return main(["train", "--device", "cpu", *map(str, args)])


def test_train_command_end_to_end_and_cli_resume(micro_config, synthetic_data, tmp_path):
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=2, snapshot_save_iter=3)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 3) == 0
    images = sorted(os.listdir(out / "images"))
    assert images == ["test_00000002.png", "test_00000004.png"]
    checkpoints = set(os.listdir(out / "checkpoints"))
    # Official names: n = iterations done + 1 (saved after 2 iterations as 3, and at the end as 4).
    assert {f"b2a_{k}_{i}_{n:08d}.pt" for k in ("gen", "dis", "dis_council") for i in range(2)
            for n in (3, 4)} <= checkpoints
    assert {"optimizer_0.pt", "optimizer_1.pt", "latest.txt", "state_00000002.pt", "state_00000003.pt"} <= checkpoints
    assert (out / "config.yaml").is_file()
    gens = ckpt.load_generator_states(out / "checkpoints" / "00000004")
    assert gens.members == [0, 1]

    assert _train("--resume", "--out", out, "--iters", 5) == 0
    straight = tmp_path / "straight"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", straight, "--iters", 5) == 0
    a = ckpt.load_full_state(out / "checkpoints" / "state_00000005.pt")
    b = ckpt.load_full_state(straight / "checkpoints" / "state_00000005.pt")
    assert a["data"] == b["data"]
    for kind in ("gen", "dis", "dis_council"):
        for sa, sb in zip(a["networks"]["b2a"][kind], b["networks"]["b2a"][kind]):
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (kind, k)


def test_ctrl_c_saves_a_full_state_at_an_iteration_boundary(micro_config, synthetic_data, tmp_path, monkeypatch):
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=100, snapshot_save_iter=100)
    original = CouncilTrainer.step

    def step_then_interrupt(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(CouncilTrainer, "step", step_then_interrupt)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 50) == 130
    assert ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))["iteration"] == 2


def test_train_command_errors(micro_config, synthetic_data, tmp_path, capsys):
    assert _train("--config", "tiny", "--data", synthetic_data, "--out", tmp_path / "x", "--precision", "bf16") == 2
    assert "--precision bf16 needs --engine fused" in capsys.readouterr().err
    assert _train("--resume", "--out", tmp_path / "nothing") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _train("--config", "tiny", "--data", tmp_path / "no_data", "--out", tmp_path / "y", "--iters", 1) == 2
    assert "trainA" in capsys.readouterr().err


def test_train_command_fused_engine_resumes_a_reference_run(micro_config, synthetic_data, tmp_path):
    """--engine fused trains through the same command and continues a reference engine's checkpoint."""
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=100, snapshot_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 2) == 0
    assert _train("--resume", "--out", out, "--iters", 3, "--engine", "fused") == 0
    state = ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))
    assert state["iteration"] == 3
    gens = ckpt.load_generator_states(out / "checkpoints" / "00000004")
    assert gens.members == [0, 1]


def test_a_second_run_into_the_same_folder_is_refused(micro_config, synthetic_data, tmp_path, capsys):
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=100, snapshot_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 1) == 0
    before = sorted(os.listdir(out / "checkpoints"))
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 2) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == before
    assert _train("--config", cfg, "--data", synthetic_data, "--out", tmp_path / "neg", "--iters", -3) == 2
    assert "--iters -3: must be at least 1" in capsys.readouterr().err


def test_convert_takes_the_config_of_a_training_run(micro_config, synthetic_data, tmp_path):
    """A run's checkpoints/ converts without --config: its full state carries the config."""
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=100, snapshot_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 1) == 0
    converted = tmp_path / "converted"
    assert main(["convert", "--checkpoint", str(out / "checkpoints"), "--input", str(synthetic_data / "testB"),
                 "--output", str(converted), "--seed", "0", "--quiet", "--device", "cpu"]) == 0
    assert len(os.listdir(converted)) == 2 * len(os.listdir(synthetic_data / "testB"))  # 2 members


def test_keep_last_notes_and_threads_of_the_train_command(micro_config, synthetic_data, tmp_path, capsys, recwarn):
    micro_config["misc"]["do_test_Fid"] = True
    cfg = _write_config(micro_config, tmp_path / "micro.yaml", image_save_iter=100, snapshot_save_iter=1)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 4, "--keep-last", 1,
                  "--threads", 1) == 0
    assert torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert err.count("misc.do_test_Fid") == 1 and "start_tensor_board" not in err
    left = sorted(os.listdir(out / "checkpoints"))
    assert [n for n in left if n.startswith("state_")] == ["state_00000004.pt"]
    assert {n.rsplit("_", 1)[1] for n in left if n.startswith("b2a_")} == {"00000005.pt"}
    # Resuming with a different --config: a note on stderr, not a Python warning with its source line.
    other = _write_config(micro_config, tmp_path / "other.yaml", lr=0.5)
    assert _train("--resume", "--config", other, "--out", out, "--iters", 5) == 0
    err = capsys.readouterr().err
    assert "differs from the config saved in" in err and "warn" not in err.lower()
    assert not [w for w in recwarn if "differs from the config" in str(w.message)]
    assert _train("--config", cfg, "--data", synthetic_data, "--out", tmp_path / "x", "--keep-last", -1) == 2
