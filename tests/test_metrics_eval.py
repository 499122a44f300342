"""The eval and report commands, the run log, and evaluation during training (train --eval-every)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _inception import save_random_inception
from council_fast import checkpoint as ckpt
from council_fast.cli import main
from council_fast.config import packaged_config
from council_fast.data import make_synthetic_dataset
from council_fast.evalrecord import EvalRecord
from council_fast.metrics import evaluate_members, load_inception
from council_fast.report import summarize
from council_fast.runlog import RunLog, read_log, tensorboard_available
from council_fast.training import make_trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    """Random weights in the exact format of pt_inception-2015-12-05-6726825d.pth (CI cannot download it)."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth", seed=0)


# ---------------------------------------------------------------------------------------------- library


def test_evaluate_members_scores_each_translation(inception_file):
    """An identity 'translator' scores exactly as the source images; a different one does not; every member
    gets the same style codes, each image once per style."""
    model = load_inception(inception_file)
    g = torch.Generator().manual_seed(0)
    source, target = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    seen = {0: [], 1: []}

    def translate(member, x, z):
        seen[member].append(z.clone())
        return x if member == 0 else -x

    result = evaluate_members(model, translate, [0, 1], source, target, style_dim=5, styles=1, seed=3, batch=2,
                              kid_subsets=4, kid_subset_size=3)
    assert result["members"][0] == result["source"]
    assert result["members"][1]["fid"] != result["source"]["fid"]
    assert result["members"][0]["images"] == 3 and result["source"]["images"] == 3 and result["target_images"] == 4
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert torch.cat(seen[0]).shape == (3, 5, 1, 1)
    twice = evaluate_members(model, translate, [1], source, target, style_dim=5, styles=2, seed=3, batch=2,
                             kid_subsets=4, kid_subset_size=3)
    assert twice["members"][1]["images"] == 6 and len(seen[1]) == 2 + 4  # 2 batches per style
    assert all(math.isfinite(v) for v in (result["members"][1]["fid"], result["members"][1]["kid_mean"]))


def test_run_log_reads_no_device_value_per_iteration(tmp_path):
    """record() must not read tensors: meta tensors (which cannot be read at all) go through it."""
    log = RunLog(tmp_path, tensorboard=False)
    log.record(1, {"b2a/dis/0": torch.zeros((), device="meta"), "lr/gen": 1e-4})
    log._pending.clear()  # a flush would (rightly) fail to read them
    log.close()


def test_run_log_round_trip(tmp_path):
    with RunLog(tmp_path, tensorboard=False) as log:
        value = torch.tensor(1.5)
        log.record(1, {"b2a/dis/0": value, "lr/gen": 1e-4, "b2a/match/0": 0.5})
        value.add_(10)  # the trainer may update its buffers in place: the log keeps the recorded value
        log.record(2, {"b2a/dis/0": value, "lr/gen": torch.tensor(5e-5)})
        log.scalars(2, {"eval/fid/0": 12.0, "eval/fid/source": float("nan")})
        (tmp_path / "sheet.png").write_bytes(PNG_MAGIC)
        log.image(2, "samples", str(tmp_path / "sheet.png"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "scal')  # a crash mid-line
    series, images = read_log(tmp_path)
    assert series["b2a/dis/0"] == ([1, 2], [1.5, 11.5])
    assert series["lr/gen"][0] == [1, 2] and series["lr/gen"][1] == pytest.approx([1e-4, 5e-5], rel=1e-7)
    assert series["b2a/match/0"] == ([1], [0.5])
    assert series["eval/fid/0"] == ([2], [12.0]) and math.isnan(series["eval/fid/source"][1][0])
    assert images == [{"step": 2, "time": images[0]["time"], "image": "samples", "path": "sheet.png"}]


def test_report_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    with RunLog(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.record(step, {f"b2a/dis/{i}": 1.0 / step + i for i in range(2)} | {"lr/gen": 1e-4,
                                                                                    "perf/img_per_s": 3.0})
        log.scalars(3, {"eval/fid/0": 20.0, "eval/fid/1": 30.0, "eval/fid/source": 50.0})
        log.scalars(5, {"eval/fid/0": 25.0, "eval/fid/1": 22.0, "eval/fid/source": 50.0})
    series, images = read_log(tmp_path)
    text = summarize(series, images)
    assert "iterations logged: 1..5" in text and "median 3.00 img/s" in text
    assert "best member now: 1 (FID 22.00)" in text
    assert "member 0: best FID 20.00 at iteration 3" in text
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_eval_record_best_member():
    record = EvalRecord()
    assert record.best_member() is None
    record.update(10, {0: 5.0, 1: 4.0})
    record.update(20, {0: 3.0, 1: 6.0})
    assert record.best_member() == 0
    assert record.best == {0: {"iteration": 20, "fid": 3.0}, 1: {"iteration": 10, "fid": 4.0}}
    assert EvalRecord.from_state(record.state()).state() == record.state()


# ---------------------------------------------------------------------------------------------- eval command


def _tiny_checkpoint(tmp_path) -> str:
    config = packaged_config("tiny")
    trainer = make_trainer(config, "reference", device="cpu", seed=0)
    trainer.save_official(tmp_path / "ckpt")
    return str(tmp_path / "ckpt" / "00000001")


def test_eval_errors(tmp_path, inception_file, capsys):
    data = make_synthetic_dataset(tmp_path / "data", n_train=1, n_test=2, size=32)
    prefix = _tiny_checkpoint(tmp_path)
    base = ["eval", "--checkpoint", prefix, "--config", "tiny", "--data", data, "--device", "cpu",
            "--backend", "reference"]
    assert main(base) == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert main(base + ["--inception-weights", inception_file, "--members", "0,7"]) == 2
    assert "--members 7" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_two_members_on_100_images(tmp_path, inception_file, capsys):
    """The suite's end-to-end run: 2 members x 100 test images at the tiny config (random Inception weights)."""
    data = make_synthetic_dataset(tmp_path / "data", n_train=1, n_test=100, size=32)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", _tiny_checkpoint(tmp_path), "--config", "tiny", "--data", data,
               "--members", "0,2", "--inception-weights", inception_file, "--batch", "50", "--device", "cpu",
               "--backend", "reference",
               "--kid-subsets", "20", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "member 0" in table and "member 2" in table and "source images" in table
    result = json.loads(out.read_text())
    assert set(result["members"]) == {"0", "2"}
    assert result["source_images"] == 100 and result["target_images"] == 100 and result["direction"] == "b2a"
    for scores in list(result["members"].values()) + [result["source"]]:
        assert scores["images"] == 100 and scores["kid_subset_size"] == 100
        assert math.isfinite(scores["fid"]) and scores["fid"] > 0
        assert math.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0
    assert result["members"]["0"]["fid"] != result["members"]["2"]["fid"]


# ---------------------------------------------------------------------------------------------- training


def test_train_eval_every_logs_remembers_best_and_convert_picks_it(micro_config, tmp_path, inception_file,
                                                                   capsys, single_thread):
    data = Path(make_synthetic_dataset(tmp_path / "data", n_train=4, n_test=3, size=16))
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(dict(micro_config, image_save_iter=2, snapshot_save_iter=100)))
    out = tmp_path / "run"
    train = ["train", "--device", "cpu", "--config", str(cfg), "--data", str(data), "--out", str(out)]
    assert main(train + ["--iters", "2", "--eval-every", "1"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert main(train + ["--iters", "2", "--eval-every", "1", "--eval-images", "3",
                         "--inception-weights", inception_file]) == 0

    series, images = read_log(out)
    for key in ("b2a/dis/0", "b2a/dis/1", "b2a/adv/1", "total/0", "lr/gen", "lr/dis", "perf/img_per_s"):
        assert key in series, key
    assert series["b2a/dis/0"][0] == [1, 2]
    for key in ("eval/fid/0", "eval/fid/1", "eval/fid/source", "eval/kid_mean/0", "eval/kid_std/1"):
        assert series[key][0] == [1, 2], key
    # sheets after iteration 1 (named 2, image_save_iter) and at the end (named 3)
    assert [(r["step"], r["path"]) for r in images] == [(1, os.path.join("images", "test_00000002.png")),
                                                        (2, os.path.join("images", "test_00000003.png"))]
    assert os.path.isdir(out / "tensorboard") == tensorboard_available()

    state = ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))
    record = EvalRecord.from_state(state["eval"])
    fids = {k: series[f"eval/fid/{k}"][1] for k in (0, 1)}
    assert record.latest["iteration"] == 2 and record.latest["fid"] == {k: v[-1] for k, v in fids.items()}
    assert record.best == {k: {"iteration": 1 + int(np.argmin(v)), "fid": min(v)} for k, v in fids.items()}
    best = record.best_member()
    assert best == min(fids, key=lambda k: fids[k][-1])

    converted = tmp_path / "converted"
    assert main(["convert", "--checkpoint", str(out / "checkpoints"), "--input", str(data / "testA"),
                 "--output", str(converted), "--member", "best", "--device", "cpu", "--backend", "reference",
                 "--quiet"]) == 0
    assert {name.split("_m")[1][0] for name in os.listdir(converted)} == {str(best)}

    assert main(train[:-2] + ["--out", str(out), "--resume", "--iters", "3"]) == 0  # no eval: record kept
    resumed = ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))
    assert EvalRecord.from_state(resumed["eval"]).state() == record.state()
    assert read_log(out)[0]["b2a/dis/0"][0] == [1, 2, 3]
