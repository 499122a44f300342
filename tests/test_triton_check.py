"""`python -m council_fast.devtools.triton_check`: the Triton kernels compiled for a GPU, without one.

The test session runs Triton under its interpreter (TRITON_INTERPRET=1), where kernels cannot be
compiled for a GPU, so each check runs in a fresh process without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))  # this tree's
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=HERE,
                          timeout=timeout)


def test_engine_kernels_compile_for_sm90():
    """Every launch of the tiny config's conversion and training passes compiles for an H100."""
    result = _run(["-m", "council_fast.devtools.triton_check", "--arch", "90", "--config", "tiny", "--size", "24",
                   "--train-size", "16"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90")]
    kernels = {line.split()[2].split("[")[0] for line in lines}
    assert {"_fwd_small_kernel", "_bwd_small_kernel", "_forward_kernel", "_backward_kernel"} <= kernels, lines
    assert all(" ok " in line for line in lines)


def test_a_kernel_over_the_shared_memory_limit_fails_the_check():
    script = textwrap.dedent("""
        import sys, torch
        from council_fast.devtools.triton_check import check, describe_launch
        from _triton_big_tiles import tile_dot_kernel
        t = torch.zeros(128, 128)
        launch = describe_launch(tile_dot_kernel, (t, t, t), {"BLOCK": 128, "num_warps": 4})
        assert launch.signature == {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"}
        assert launch.divisible == (0, 1, 2)  # 128x128 fp32 buffers: 16-byte aligned
        assert launch.constexprs == {"BLOCK": 128} and launch.options == {"num_warps": 4}
        for bad_args, bad_kwargs, error in (((t, t), {"BLOCK": 128}, TypeError),  # as a real launch would
                                            ((t, t, t), {"BLOCK": 128, "BLOKC": 1}, KeyError)):
            try:
                describe_launch(tile_dot_kernel, bad_args, bad_kwargs)
                sys.exit(3)
            except error:
                pass
        sys.exit(check({launch.key(): launch}, ["86", "90"]))
    """)
    result = _run(["-c", script], timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sm_86 FAIL tile_dot_kernel[BLOCK=128; *fp32; warps=4]: shared 131072 B > 101376" in result.stdout
    assert "sm_90 ok   tile_dot_kernel" in result.stdout
