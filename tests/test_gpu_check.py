"""`bash benchmarks/gpu_check.sh --dry-run`: the GPU check's stage logic, limits, signals and packing, without a GPU.

The device tool brings back at most 8 files (names of letters, digits and ._-), so the check must leave
summary.md and one archive, whatever happens: a stage stopped at its limit, or the whole script stopped by
the device timeout (TERM)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _env(out, **extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), GPU_CHECK_JOBS="2", **extra)
    return env


def _outputs(out):
    files = sorted(os.listdir(out))
    assert files == ["gpu_check_logs.tar.gz", "summary.md"], files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    return (out / "summary.md").read_text(), names


def _wait_for(path, text, process, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and text in path.read_text():
            return
        assert process.poll() is None, "gpu_check ended early"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_a_stage_at_its_limit_and_a_term_still_leave_the_summary_and_the_logs(tmp_path):
    """The build stage's stand-in outlives its 1 s limit (SIGINT, then recorded as a timeout); a TERM, as the
    device timeout sends, during the next stage stops it and the script, which still writes both files."""
    out = tmp_path / "out"
    process = subprocess.Popen(["bash", SCRIPT, "--dry-run"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env=_env(out, BUILD_TIMEOUT="1", GPU_CHECK_DRY_SLEEP="60"))
    try:
        _wait_for(out / "raw" / "stages.txt", "TIMEOUT  build_cuda_extension", process)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, stdout
    summary, names = _outputs(out)
    assert "TIMEOUT  build_cuda_extension" in summary and "STOPPED  by SIGTERM" in summary, summary
    assert "raw/build_cuda_extension.log" in names and "raw/environment.txt" in names
    assert "gpu_check: FAILED stages: build_cuda_extension stopped-by-SIGTERM" in stdout


@pytest.mark.skipif(subprocess.run(["bash", "-c", "command -v nvcc"], capture_output=True).returncode != 0,
                    reason="no nvcc on PATH: nothing to resolve")
def test_the_cuda_root_is_found_behind_an_nvcc_wrapper(tmp_path):
    """A wrapper script named nvcc (torch would take its folder's parent as CUDA_HOME) is followed to the root
    holding the real nvcc and lib64/libcudart.so."""
    real = subprocess.run(["bash", "-c", f"source <(sed -n '/^find_cuda_home()/,/^}}/p' {SCRIPT}); "
                                         "CUDA_HOME= find_cuda_home"], capture_output=True, text=True).stdout.strip()
    assert real and os.path.isfile(os.path.join(real, "lib64", "libcudart.so")), real
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    found = subprocess.run(["bash", "-c", f"source <(sed -n '/^find_cuda_home()/,/^}}/p' {SCRIPT}); "
                                          "CUDA_HOME= PATH=$1:$PATH find_cuda_home", "-", str(wrapper.parent)],
                           capture_output=True, text=True).stdout.strip()
    assert found == real
