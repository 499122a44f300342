"""Thread settings (threads.py), snapshot retention (retention.py) and the build announcements
(ops/build_progress.py)."""
from __future__ import annotations

import argparse
import io
import os
import threading
import time

import pytest
import torch

from council_fast import threads
from council_fast.ops.build_progress import announced_build, object_name
from council_fast.retention import prune_snapshots


@pytest.fixture
def restore_threads():
    before, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(before)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def test_default_threads_follow_affinity_torchrun_and_omp(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.usable_cores() == 6 and threads.default_threads() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert threads.default_threads() == 3  # never above the cores this process may use
    monkeypatch.setenv("OMP_NUM_THREADS", "bogus")
    assert threads.default_threads() == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.default_threads() == 6


def test_set_threads_sizes_torch_and_omp(restore_threads, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.set_threads() == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        threads.set_threads(0)


def test_threads_argument_refuses_zero():
    parser = argparse.ArgumentParser()
    threads.add_threads_argument(parser)
    assert parser.parse_args([]).threads is None and parser.parse_args(["--threads", "3"]).threads == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])


def _snapshot(folder, n: int, members: int = 3, state: bool = True, gens=None) -> None:
    for i in range(members):
        for kind in ("dis", "dis_council") + (("gen",) if gens is None or i in gens else ()):
            (folder / f"b2a_{kind}_{i}_{n + 1:08d}.pt").write_bytes(b"x")
        (folder / f"optimizer_{i}.pt").write_bytes(b"x")
    if state:
        (folder / f"state_{n:08d}.pt").write_bytes(b"x")
        (folder / "latest.txt").write_text(f"state_{n:08d}.pt\n")


def test_keep_last_prunes_older_snapshots(tmp_path):
    for n in (9, 19, 29, 39, 49):
        _snapshot(tmp_path, n)
    before = set(os.listdir(tmp_path))
    removed = prune_snapshots(str(tmp_path), keep=2)
    left = set(os.listdir(tmp_path))
    assert left == before - {os.path.basename(p) for p in removed}
    assert sorted(n for n in left if n.startswith("state_")) == ["state_00000039.pt", "state_00000049.pt"]
    assert {n.rsplit("_", 1)[1] for n in left if n.startswith("b2a_")} == {"00000040.pt", "00000050.pt"}
    assert {f"optimizer_{i}.pt" for i in range(3)} <= left and "latest.txt" in left
    assert prune_snapshots(str(tmp_path), keep=2) == []  # nothing more to do
    assert prune_snapshots(str(tmp_path), keep=0) == [] and set(os.listdir(tmp_path)) == left


def test_keep_last_never_drops_the_newest_complete_iteration_or_latest(tmp_path):
    _snapshot(tmp_path, 9)
    _snapshot(tmp_path, 19, gens={0})  # interrupted while writing: only member 0's generator
    (tmp_path / "latest.txt").write_text("state_00000009.pt\n")  # the pointer still names the older state
    prune_snapshots(str(tmp_path), keep=1, council_size=3)
    left = set(os.listdir(tmp_path))
    assert {f"b2a_gen_{i}_00000010.pt" for i in range(3)} <= left  # newest complete official iteration
    assert "state_00000009.pt" in left and "state_00000019.pt" in left  # latest.txt's and the newest
    with pytest.raises(ValueError):
        prune_snapshots(str(tmp_path), keep=-1)


def test_object_names():
    assert object_name("/x/csrc/adain_cpu.cpp") == "adain_cpu.o"
    assert object_name("/x/csrc/adain_cuda.cu") == "adain_cuda.cuda.o"


def _wait_for(stream: io.StringIO, text: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while text not in stream.getvalue():
        assert time.monotonic() < end, f"never printed {text!r}: {stream.getvalue()!r}"
        time.sleep(0.01)


def test_a_build_says_what_it_builds_and_each_file_done(tmp_path):
    out = io.StringIO()
    sources = [str(tmp_path / "a_cpu.cpp"), str(tmp_path / "b_cpu.cpp")]
    with announced_build("ext_1234", sources, str(tmp_path), "for the cpu kernel back-end", announce_after_s=0,
                         heartbeat_s=3600, poll_s=0.01, stream=out):
        _wait_for(out, "building the C++ kernels ext_1234 for the cpu kernel back-end: 2 files")
        (tmp_path / "b_cpu.o").write_bytes(b"")
        _wait_for(out, "compiled b_cpu.cpp (1/2")
        (tmp_path / "a_cpu.o").write_bytes(b"")
        _wait_for(out, "compiled a_cpu.cpp (2/2")
    text = out.getvalue()
    assert f"cached in {tmp_path}" in text and "once" in text
    assert text.rstrip().splitlines()[-1].startswith("council-fast: built ext_1234 in ")


def test_a_cached_build_prints_nothing_and_a_failed_one_no_success(tmp_path):
    out = io.StringIO()
    with announced_build("ext", [str(tmp_path / "a.cpp")], str(tmp_path), "why", announce_after_s=60, stream=out):
        pass
    assert out.getvalue() == ""
    with pytest.raises(RuntimeError):
        with announced_build("ext", [str(tmp_path / "a.cpp")], str(tmp_path), "why", announce_after_s=0,
                             poll_s=0.01, stream=out):
            _wait_for(out, "building")
            raise RuntimeError("compiler error")
    assert "built ext" not in out.getvalue()
    assert not any(type(t).__name__ == "_Watcher" and t.is_alive() for t in threading.enumerate())
