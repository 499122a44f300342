"""`council-fast info`: versions and, without building anything, which kernel back-ends can run."""
from __future__ import annotations

from council_fast.cli import main
from council_fast.ops import extension


def test_info_reports_the_cached_cpu_build(capsys):
    extension.load_extension("cpu")  # built (or loaded from the cache) by now
    assert extension.cached_build("cpu") is not None
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["torch"] and lines["cpu/reference"] == "available"
    assert lines["cpu/cpu"].startswith("built (") and extension.cached_build("cpu") in lines["cpu/cpu"]
    assert lines["cpu/cuda"].startswith("unavailable: the cuda back-end runs on CUDA tensors")


def test_cached_build_is_none_for_changed_sources(monkeypatch):
    """The cache key hashes the sources: other flags name another build, which does not exist."""
    monkeypatch.setenv("COUNCIL_FAST_NATIVE", "0")
    monkeypatch.setattr(extension, "_cpu_flags", lambda: "a CPU no build was made for")
    monkeypatch.setattr(extension.torch, "__version__", "0.0.0-never-built")
    assert extension.cached_build("cpu") is None


def test_a_left_over_build_lock_is_named_not_waited_on_for_ever(monkeypatch, tmp_path, capsys):
    """A killed build leaves torch's lock file behind, and torch would wait on it for ever."""
    import os
    import threading
    import time

    import pytest

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    extension.wait_for_build_lock("some_build")  # no lock: returns at once
    lock = tmp_path / "some_build" / "lock"
    lock.write_text("")
    threading.Timer(0.3, lock.unlink).start()  # a build that finishes
    extension.wait_for_build_lock("some_build", poll_s=0.05)
    assert f"waiting for {lock}" in capsys.readouterr().err
    lock.write_text("")
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.raises(extension.BackendUnavailable, match=r"60 minutes old: a build of some_build was "
                                                          r"interrupted; delete that file"):
        extension.wait_for_build_lock("some_build")


def test_commands_let_cudnn_pick_the_fastest_algorithms(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("COUNCIL_FAST_CUDNN_BENCHMARK", "0")
    assert main(["info"]) == 0
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.delenv("COUNCIL_FAST_CUDNN_BENCHMARK")
    assert main(["info"]) == 0
    assert torch.backends.cudnn.benchmark is True
