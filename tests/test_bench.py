"""council-fast bench: tiny sizes on the CPU, JSON with every documented field."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from council_fast.bench import suites, time_callable
from council_fast.cli import bench

# Written out here (not taken from bench.py) so a field dropped there is caught.
RESULT_FIELDS = {"name", "engine", "status", "reason", "median_ms", "min_ms", "mean_ms", "times_ms", "img_per_s",
                 "speedup", "peak_mem_mib", "first_call_s", "max_rel_diff", "launches", "launch_unit"}
ENV_FIELDS = {"date", "council_fast", "python", "torch", "triton", "cuda", "device", "device_name", "cpu_model",
              "cpu_threads", "cpu_count", "platform", "load_average"}
SETTINGS_FIELDS = {"config", "device", "precision", "batch", "size", "repeats", "warmup", "compile", "backend"}


def run_bench(tmp_path, *argv: str, config: str = "tiny") -> tuple[int, dict, str]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.json"
    # One torch thread: on a busy 2-core host, OpenMP threads spinning against each other make tiny
    # workloads 10-100x slower.
    status = bench.run(parser.parse_args([*argv, "--config", config, "--device", "cpu", "--threads", "1",
                                          "--json", str(path)]))
    return status, json.loads(path.read_text()), path.read_text()


def check_report(report: dict, what: str, batch: int, size: int) -> None:
    assert report["benchmark"] == what
    assert set(report["settings"]) == SETTINGS_FIELDS
    assert report["settings"]["batch"] == batch and report["settings"]["size"] == size
    assert set(report["environment"]) == ENV_FIELDS
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["cpu_threads"] == 1 and env["cpu_count"] >= 1 and env["cpu_model"] and env["date"][:2] == "20"
    for row in report["results"]:
        assert set(row) == RESULT_FIELDS, row["name"]
        assert row["status"] in ("ok", "failed", "not available", "skipped")
        if row["status"] == "ok":
            assert len(row["times_ms"]) == report["settings"]["repeats"]
            assert all(t > 0 for t in row["times_ms"])
            assert row["min_ms"] <= row["median_ms"] and row["min_ms"] > 0 and row["mean_ms"] > 0
            assert row["img_per_s"] == pytest.approx(batch / (row["median_ms"] / 1e3), rel=1e-6)
            assert row["first_call_s"] > 0 and row["speedup"] > 0
            assert row["peak_mem_mib"] is None  # CPU: no device memory counter
            if row["engine"] == "reference+compile":  # counting would run the compiled code eagerly
                assert row["launches"] is None
            else:
                assert row["launches"] > 0 and row["launch_unit"] == "ops"  # computing ops dispatched per call
        else:
            assert row["reason"], row


def test_bench_convert_json(tmp_path, capsys):
    status, report, _ = run_bench(tmp_path, "convert", "--batch", "2", "--size", "16", "--repeats", "3",
                                  "--warmup", "1", "--no-compile")
    assert status == 0
    check_report(report, "convert", 2, 16)
    rows = {r["engine"].split(" ")[0]: r for r in report["results"]}
    assert rows["reference"]["status"] == "ok" and rows["reference"]["speedup"] == 1.0
    assert rows["reference"]["max_rel_diff"] is None
    assert rows["reference+compile"]["status"] == "skipped"
    fused = rows["fused"]
    if fused["status"] == "ok":  # the fused engine must match the reference
        assert fused["max_rel_diff"] < 1e-4
    else:
        assert fused["status"] == "not available" and fused["reason"]
    table = capsys.readouterr().out
    assert "translate 2x16" in table and "reference" in table and "median ms" in table


def test_bench_convert_fused_column(tmp_path, monkeypatch):
    """The fused column runs FastGenerator with the reference weights and reports its difference."""
    from council_fast.reference.networks import AdaINGen

    class FakeFast(AdaINGen):
        backend = "reference"

        def __init__(self, input_dim, params, backend=None, strict=None):
            super().__init__(input_dim, params)
    monkeypatch.setattr(suites, "FastGenerator", FakeFast)
    status, report, _ = run_bench(tmp_path, "convert", "--batch", "2", "--size", "16", "--repeats", "2",
                                  "--warmup", "1", "--no-compile")
    assert status == 0
    fused = report["results"][-1]
    assert fused["engine"] == "fused (reference)" and fused["status"] == "ok"
    assert fused["max_rel_diff"] == 0.0 and fused["img_per_s"] > 0


def test_bench_convert_compile(tmp_path, monkeypatch):
    """The torch.compile column: traced by dynamo (the eager backend keeps inductor's minutes of
    C++ compilation out of the test; the column itself uses the default backend)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    status, report, _ = run_bench(tmp_path, "convert", "--batch", "1", "--size", "16", "--repeats", "2",
                                  "--warmup", "1", "--backend", "reference")
    assert status == 0
    compiled = next(r for r in report["results"] if r["engine"] == "reference+compile")
    assert compiled["status"] == "ok", compiled["reason"]
    assert compiled["max_rel_diff"] < 1e-5
    check_report(report, "convert", 1, 16)


def test_bench_reports_a_failing_engine(tmp_path, monkeypatch):
    def broken_compile(model):
        def fail(*args):
            raise RuntimeError("inductor exploded")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    status, report, text = run_bench(tmp_path, "convert", "--batch", "1", "--size", "16", "--repeats", "1",
                                     "--warmup", "1")
    assert status == 0  # a failing compile is a finding, not a crash
    compiled = next(r for r in report["results"] if r["engine"] == "reference+compile")
    assert compiled["status"] == "failed" and "inductor exploded" in compiled["reason"]


def test_bench_train_json(tmp_path, micro_config):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config))
    status, report, _ = run_bench(tmp_path, "train", "--batch", "1", "--size", "16", "--repeats", "2",
                                  "--warmup", "1", config=str(config))
    assert status == 0
    check_report(report, "train", 1, 16)
    rows = {r["engine"]: r for r in report["results"]}
    assert rows["reference"]["status"] == "ok", rows["reference"]["reason"]
    assert rows["reference"]["name"] == "train iter 1x16 council 2"
    assert rows["fused"]["status"] == "ok", rows["fused"]["reason"]
    # the council batched: far fewer ops per iteration than member by member
    assert rows["fused"]["launches"] < rows["reference"]["launches"] / 1.5


def test_bench_ops_reference_backend(tmp_path):
    """With --backend reference the fused column runs the op modules' plain-PyTorch paths."""
    status, report, _ = run_bench(tmp_path, "ops", "--batch", "2", "--size", "8", "--repeats", "2",
                                  "--warmup", "1", "--backend", "reference")
    assert status == 0
    check_report(report, "ops", 2, 8)
    names = {r["name"] for r in report["results"]}
    assert {"AdaIN + ReLU fwd", "AdaIN + ReLU fwd+bwd", "decoder tail (1x1 convs + mask blend) fwd"} <= names
    for row in report["results"]:
        if row["engine"].startswith("fused") and row["status"] == "ok":
            assert row["max_rel_diff"] < 1e-5, row["name"]


def test_time_callable_counts_and_synchronises():
    calls = []
    timing = time_callable(lambda: calls.append(1), torch.device("cpu"), warmup=3, repeats=4)
    assert len(calls) == 3 + 4 and len(timing["times_ms"]) == 4 and timing["peak_mem_mib"] is None


def test_bad_options(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["convert", "--config", "tiny", "--device", "cpu", "--size", "18"])) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert bench.run(parser.parse_args(["convert", "--config", "tiny", "--device", "cpu",
                                        "--precision", "fp16"])) == 2
    assert "fp16" in capsys.readouterr().err


def test_engine_failing_during_the_timed_rounds_and_a_failing_reference(tmp_path, monkeypatch):
    """Round-robin timing: an engine that fails after its warm-up is reported; when the reference
    itself fails there is nothing to compare with, and the exit status says so."""
    from council_fast.reference.networks import AdaINGen

    calls = {"n": 0}
    real = AdaINGen.translate

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # first call and warm-up pass, the timed rounds fail
            raise RuntimeError("flaky engine")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(AdaINGen, "translate", flaky)
    status, report, _ = run_bench(tmp_path, "convert", "--batch", "1", "--size", "16", "--repeats", "2",
                                  "--warmup", "1", "--no-compile")
    reference = next(r for r in report["results"] if r["engine"] == "reference")
    assert reference["status"] == "failed" and "flaky engine" in reference["reason"]
    assert status == 1
    others = [r for r in report["results"] if r["engine"] != "reference" and r["status"] == "ok"]
    assert others and all(r["speedup"] is None and r["max_rel_diff"] is None for r in others)
