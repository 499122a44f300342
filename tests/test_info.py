"""`council-fast info`: versions and, without building anything, which kernel back-ends can run."""
from __future__ import annotations

import pytest

from council_fast.cli import main
from council_fast.ops import _backend


def test_info_reports_the_cached_cpu_build(capsys):
    _backend.load_extension("cpu")  # built (or loaded from the cache) by now
    assert _backend.cached_build("cpu") is not None
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["torch"] and lines["cpu/reference"] == "available"
    assert lines["cpu/cpu"].startswith("built (") and _backend.cached_build("cpu") in lines["cpu/cpu"]
    assert lines["cpu/cuda"].startswith("unavailable: the cuda back-end runs on CUDA tensors")


def test_cached_build_is_none_for_changed_sources(monkeypatch):
    """The cache key hashes the sources: other flags name another build, which does not exist."""
    monkeypatch.setenv("COUNCIL_FAST_NATIVE", "0")
    monkeypatch.setattr(_backend, "_cpu_flags", lambda: "a CPU no build was made for")
    monkeypatch.setattr(_backend.torch, "__version__", "0.0.0-never-built")
    assert _backend.cached_build("cpu") is None


def test_a_left_over_build_lock_is_named_not_waited_on_for_ever(monkeypatch, tmp_path, capsys):
    """A killed build leaves torch's lock file behind, and torch would wait on it for ever."""
    import os
    import threading
    import time

    import pytest

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _backend.wait_for_build_lock("some_build")  # no lock: returns at once
    lock = tmp_path / "some_build" / "lock"
    lock.write_text("")
    threading.Timer(0.3, lock.unlink).start()  # a build that finishes
    _backend.wait_for_build_lock("some_build", poll_s=0.05)
    assert f"waiting for {lock}" in capsys.readouterr().err
    lock.write_text("")
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.raises(_backend.BackendUnavailable, match=r"60 minutes old: a build of some_build was "
                                                          r"interrupted; delete that file"):
        _backend.wait_for_build_lock("some_build")


def test_commands_let_cudnn_pick_the_fastest_algorithms(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("COUNCIL_FAST_CUDNN_BENCHMARK", "0")
    assert main(["info"]) == 0
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.delenv("COUNCIL_FAST_CUDNN_BENCHMARK")
    assert main(["info"]) == 0
    assert torch.backends.cudnn.benchmark is True


def test_a_failed_build_is_recorded_and_not_retried(monkeypatch, tmp_path):
    """The first process whose build fails records the error; later ones fail at once with it."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvcc exploded"):
        with _backend.build_lock("some_build"):
            raise RuntimeError("nvcc exploded")
    marker = tmp_path / "some_build" / _backend.FAILED_MARKER
    assert "nvcc exploded" in marker.read_text()
    with pytest.raises(_backend.BackendUnavailable, match=r"earlier build of some_build failed .*nvcc exploded"):
        with _backend.build_lock("some_build"):
            raise AssertionError("a recorded failure must not build again")
    hour_ago = time.time() - _backend.FAILED_BUILD_RETRY_AFTER_S - 1
    os.utime(marker, (hour_ago, hour_ago))
    with _backend.build_lock("some_build"):
        pass  # an hour later (or once the record is deleted) it builds again
    assert not marker.exists()


def test_a_killed_builder_does_not_block_the_next(monkeypatch, tmp_path):
    """A live builder is waited for; once it dies (killed mid-build), its leftover lock files are taken over."""
    import os
    import subprocess
    import sys
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from council_fast.ops import _backend\n"
        "with _backend.build_lock('some_build'):\n"
        "    open(os.path.join(sys.argv[1], 'some_build', 'lock'), 'w').close()  # as torch's build would\n"
        "    print('building', flush=True)\n"
        "    time.sleep(600)\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    try:
        assert holder.stdout.readline().strip() == "building"
        with pytest.raises(_backend.BackendUnavailable, match="waited 0 minutes for the build of some_build"):
            with _backend.build_lock("some_build", timeout_s=0.3, poll_s=0.05):
                pass
    finally:
        holder.kill()
        holder.wait()
    start = time.time()
    with _backend.build_lock("some_build"):
        assert not (tmp_path / "some_build" / "lock").exists()  # torch's lock of the killed build: removed
    assert time.time() - start < 5
