"""`torchrun -m council_fast convert`: inputs sharded over 2 gloo processes on the CPU, each converted once,
one report, the same files as one process."""
from __future__ import annotations

import os
import subprocess
import sys

from _serving import make_checkpoint, photo


def convert_cmd(ckpt, src, out, *launcher):
    return [*launcher, "-m", "council_fast", "convert", "--config", "tiny", "--checkpoint", ckpt, "--input", str(src),
            "--output", str(out), "--seed", "3", "--styles", "2", "--backend", "reference", "--device", "cpu",
            "--workers", "1", "--quiet"]


def test_two_ranks_convert_every_input_once_with_one_report(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        photo(i).save(src / f"p{i}.png")
    photo(9).save(src / "sub" / "p0.png")  # same stem in a sub-folder: its own output name
    (src / "broken.png").write_bytes(b"not an image")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    one = subprocess.run(convert_cmd(ckpt, src, tmp_path / "one", sys.executable), capture_output=True, text=True,
                         env=env, timeout=600)
    two = subprocess.run(convert_cmd(ckpt, src, tmp_path / "two", sys.executable, "-m", "torch.distributed.run",
                                     "--standalone", "--nproc_per_node", "2"),
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-3000:]  # one broken input: status 1
    reports = [line for line in two.stdout.splitlines() if line.startswith("converted ")]
    assert len(reports) == 1, two.stdout
    assert reports[0].startswith("converted 5 of 6 inputs; 1 failed: ") and "broken.png" in reports[0]
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "two")
                   for d, _, fs in os.walk(tmp_path / "two") for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), tmp_path / "one")
                           for d, _, fs in os.walk(tmp_path / "one") for f in fs)
    assert len(files) == 5 * 3 * 2  # 5 good inputs x 3 members x 2 styles
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
