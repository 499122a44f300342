"""Official and full-state checkpoints: round trips, clear errors, atomic writes."""
from __future__ import annotations

import os

import pytest
import torch

from council_fast import checkpoint as ckpt
from council_fast.fileio import atomic_torch_save
from council_fast.reference import AdaINGen, MsImageDis, MsImageDisCouncil


def _nets(config, members=2, seed=0):
    torch.manual_seed(seed)
    return {"gen": [AdaINGen(3, config["gen"]) for _ in range(members)],
            "dis": [MsImageDis(3, config["dis"]) for _ in range(members)],
            "dis_council": [MsImageDisCouncil(3, config["dis"]) for _ in range(members)]}


def _states(nets):
    return {k: [n.state_dict() for n in v] for k, v in nets.items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_official_round_trip_and_every_way_to_name_it(tiny_config, tmp_path):
    nets = _nets(tiny_config)
    optimizers = [{kind: torch.optim.Adam(nets[kind][i].parameters()).state_dict() for kind in nets}
                  for i in range(2)]
    written = ckpt.save_official(tmp_path, 11, {"b2a": _states(nets)}, optimizers)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted([f"b2a_{k}_{i}_00000011.pt" for k in ("gen", "dis", "dis_council") for i in range(2)]
                           + ["optimizer_0.pt", "optimizer_1.pt"])
    paths = ckpt.official_member_paths(tmp_path, 11, 2, "b2a")
    assert paths[1]["dis_council"] == os.path.join(tmp_path, "b2a_dis_council_1_00000011.pt")
    for i in range(2):
        for kind in ("gen", "dis", "dis_council"):
            loaded = ckpt.load_file(paths[i][kind])
            assert list(loaded) == ["b2a"]
            _assert_same_state(loaded["b2a"], nets[kind][i].state_dict())
        assert set(ckpt.load_file(paths[i]["optimizer"])) == {"gen", "dis", "dis_council"}

    for name in (tmp_path / "00000011", tmp_path / "gen_00000011", tmp_path / "b2a_gen_00000011", tmp_path):
        states = ckpt.load_generator_states(name)
        assert states.direction == "b2a" and states.members == [0, 1], name
        for i in range(2):
            _assert_same_state(states.states[i], nets["gen"][i].state_dict())
    member = ckpt.load_generator_states(tmp_path / "b2a_gen_1_00000011.pt")
    assert member.members == [1]
    _assert_same_state(member.states[0], nets["gen"][1].state_dict())


def test_both_directions_need_a_choice(tiny_config, tmp_path):
    nets = _nets(tiny_config, members=1)
    ckpt.save_official(tmp_path, 5, {"a2b": {"gen": _states(nets)["gen"]}, "b2a": {"gen": _states(nets)["gen"]}})
    with pytest.raises(ckpt.CheckpointError, match="--direction"):
        ckpt.load_generator_states(tmp_path / "00000005")
    assert ckpt.load_generator_states(tmp_path / "00000005", direction="a2b").direction == "a2b"
    both = tmp_path / "both.pt"
    torch.save({"a2b": nets["gen"][0].state_dict(), "b2a": nets["gen"][0].state_dict()}, both)
    with pytest.raises(ckpt.CheckpointError, match="--direction"):
        ckpt.load_generator_states(both)
    assert ckpt.load_generator_states(both, direction="b2a").direction == "b2a"


def test_nothing_matches_says_what_was_looked_for(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"_gen_<member>_00000099\.pt"):
        ckpt.load_generator_states(tmp_path / "00000099")
    with pytest.raises(ckpt.CheckpointError, match="no official generator files"):
        ckpt.load_generator_states(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not found|no such"):
        ckpt.load_generator_states(tmp_path / "missing" / "thing.pt")


def _full_state(config, nets):
    return {"config": config, "iteration": 7, "engine": "reference",
            "networks": {"b2a": _states(nets)},
            "rng": {"torch_cpu": torch.get_rng_state(), "python": {"version": 3, "state": [1, 2, 3], "gauss": None}},
            "loss_history": {"b2a": {"gan": [[1.0, 2.5], [1.0, 1.0]]}},
            "data": {"epoch": 2, "positions": {"A": 4, "B": 6}}}


def test_full_state_round_trip_weights_only(tiny_config, tmp_path):
    nets = _nets(tiny_config)
    path = ckpt.full_state_path(tmp_path, 7)
    assert os.path.basename(path) == "state_00000007.pt"
    original = _full_state(tiny_config, nets)
    ckpt.save_full_state(path, original)
    ckpt.write_latest(tmp_path, path)
    assert ckpt.latest_full_state_path(tmp_path) == path
    raw = torch.load(path, weights_only=True)  # loadable without unpickling arbitrary objects
    assert raw["format"] == ckpt.FULL_STATE_FORMAT and raw["version"] == ckpt.FULL_STATE_VERSION
    state = ckpt.load_full_state(path)
    assert state["config"] == tiny_config and state["iteration"] == 7
    assert state["data"] == {"epoch": 2, "positions": {"A": 4, "B": 6}}
    assert torch.equal(state["rng"]["torch_cpu"], original["rng"]["torch_cpu"])
    assert state["rng"]["python"] == original["rng"]["python"]
    for source in (path, tmp_path):
        gens = ckpt.load_generator_states(source)
        assert gens.config == tiny_config and gens.members == [0, 1] and gens.direction == "b2a"
        _assert_same_state(gens.states[1], nets["gen"][1].state_dict())


def test_full_state_wrong_format_or_version(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "version": 1}, other)
    with pytest.raises(ckpt.CheckpointError, match="other.pt.*not a council-fast full-state"):
        ckpt.load_full_state(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": ckpt.FULL_STATE_FORMAT, "version": 99, "config": {}, "iteration": 0,
                "engine": "reference", "networks": {}}, newer)
    with pytest.raises(ckpt.CheckpointError, match="newer.pt.*version 99"):
        ckpt.load_full_state(newer)
    with pytest.raises(ckpt.CheckpointError, match="lacks"):
        ckpt.save_full_state(tmp_path / "incomplete.pt", {"config": {}})
    assert not (tmp_path / "incomplete.pt").exists()


def test_corrupt_truncated_and_missing_files_name_the_file(tiny_config, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    good = tmp_path / "b2a_gen_0_00000001.pt"
    torch.save({"b2a": AdaINGen(3, tiny_config["gen"]).state_dict()}, good)
    truncated = tmp_path / "b2a_gen_1_00000001.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(ckpt.CheckpointError, match=path.name):
            ckpt.load_file(path)
    with pytest.raises(ckpt.CheckpointError, match="b2a_gen_1_00000001.pt"):
        ckpt.load_generator_states(tmp_path / "00000001")
    with pytest.raises(ckpt.CheckpointError, match="missing.pt.*not found"):
        ckpt.load_file(tmp_path / "missing.pt")


def test_mismatched_state_dict_lists_missing_unexpected_and_misshaped_keys(tiny_config):
    gen = AdaINGen(3, tiny_config["gen"])
    sd = dict(gen.state_dict())
    del sd["mlp.model.0.fc.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["dec.model.0.model.0.model.0.conv.bias"] = torch.zeros(5)
    expected_shape = tuple(gen.state_dict()["dec.model.0.model.0.model.0.conv.bias"].shape)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_state_dict(gen, sd, "some/file.pt")
    message = str(err.value)
    assert "some/file.pt" in message
    assert "missing keys (1): mlp.model.0.fc.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert f"dec.model.0.model.0.model.0.conv.bias: expected {expected_shape}, found (5,)" in message
    with pytest.raises(ckpt.CheckpointError, match="expected a state dict"):
        ckpt.check_state_dict(gen, [1, 2], "list.pt")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "state_00000001.pt"

    def failing_save(obj, tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"x": torch.ones(2)}, target, save=failing_save)
    assert list(tmp_path.iterdir()) == []
    atomic_torch_save({"x": torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": torch.zeros(2)}, target, save=failing_save)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert torch.equal(ckpt.load_file(target)["x"], torch.ones(2))  # the old file is intact
