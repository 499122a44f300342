"""Issue 16: each defect a hostile user or an unlucky operator found, reproduced, then held.

Kills happen in subprocesses at chosen points (COUNCIL_FAST_CRASH_AT=<event>:<n> makes the process
SIGKILL itself at the n-th temp-file write or rename); a full disk is simulated by making ``os.write``
fail with ENOSPC for one file; damaged files are made by flipping a byte inside a zip entry.
"""
from __future__ import annotations

import copy
import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from council_fast import checkpoint as ckpt
from council_fast import fileio, images
from council_fast.cli import main
from council_fast.config import ConfigError, load_config
from council_fast.ops import extension
from council_fast.training import CouncilTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def council3(micro_config) -> dict:
    """The micro config with a council of 3 (a half council is then distinguishable from a whole one)."""
    c = copy.deepcopy(micro_config)
    c["council"]["council_size"] = 3
    return c


def _write_config(config, path, **overrides) -> str:
    config = copy.deepcopy(config)
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _train(*args) -> int:
    return main(["train", "--device", "cpu", *map(str, args)])


def _cli(*args, crash_at: str | None = None, timeout: float = 180, env: dict | None = None):
    """Run ``python -m council_fast ARGS`` from this checkout; returns the CompletedProcess."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("COUNCIL_FAST_CRASH_AT", None)
    if crash_at:
        environment["COUNCIL_FAST_CRASH_AT"] = crash_at
    environment.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "council_fast", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".cftmp" in p.name or p.name.endswith(".tmp"))


def _flip_byte(path: Path, entry_suffix: str) -> str:
    """Flip one byte in the middle of the stored data of the first zip entry ending in ``entry_suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(entry_suffix) and i.file_size > 8)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x5A]))
    return info.filename


# --------------------------------------------------------------------------- 1. half councils

def _gen_files(folder: Path, n: int) -> list[int]:
    return sorted(int(p.name.split("_")[2]) for p in folder.glob(f"b2a_gen_*_{n:08d}.pt"))


def test_1_a_kill_during_snapshot_saves_never_yields_a_half_council(council3, synthetic_data, tmp_path):
    """Killed while renaming the second snapshot into place: convert uses the newest complete council
    and says so; asking for the incomplete one by name is an error listing the missing members."""
    cfg = _write_config(council3, tmp_path / "c.yaml", snapshot_save_iter=1, image_save_iter=1000)
    out = tmp_path / "run"
    # Renames: config.yaml 1; snapshot 1: 3 optimizers + 9 networks + marker, state, latest.txt = 16;
    # snapshot 2: 3 optimizers, then generator 0 (rename 20) -- killed before generator 1 (rename 21).
    r = _cli("train", "--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 2, "--device", "cpu",
             crash_at="rename:21")
    assert r.returncode == -signal.SIGKILL, r.stderr
    checkpoints = out / "checkpoints"
    assert _gen_files(checkpoints, 2) == [0, 1, 2]
    assert 0 < len(_gen_files(checkpoints, 3)) < 3  # the precondition: a half council on disk

    with pytest.warns(UserWarning, match="00000003 is incomplete.*using 00000002"):
        states = ckpt.load_generator_states(checkpoints)
    assert states.members == [0, 1, 2] and states.source.endswith("00000002")

    converted = tmp_path / "converted"
    r = _cli("convert", "--checkpoint", checkpoints, "--config", cfg, "--member", "all", "--input",
             synthetic_data / "testB", "--output", converted, "--seed", "0", "--quiet", "--device", "cpu",
             "--backend", "reference")
    assert r.returncode == 0, r.stderr
    assert "00000003 is incomplete" in r.stderr and "using 00000002" in r.stderr
    assert {p.name.split("_m")[1][0] for p in converted.iterdir()} == {"0", "1", "2"}

    r = _cli("convert", "--checkpoint", checkpoints / "00000003", "--config", cfg, "--input", synthetic_data / "testB",
             "--output", tmp_path / "c2", "--quiet", "--device", "cpu", "--backend", "reference")
    assert r.returncode == 2
    assert "00000003 is incomplete" in r.stderr and "missing 1, 2" in r.stderr


def test_1_official_folders_without_markers_count_members_by_optimizer_files(tmp_path):
    """Folders of the official trainer carry no markers: the optimizer_<i>.pt files give the council size."""
    sd = {"w": torch.zeros(1)}
    for n, members in ((2, (0, 1, 2)), (3, (0, 1))):
        for i in members:
            torch.save({"b2a": sd}, tmp_path / f"b2a_gen_{i}_{n:08d}.pt")
    for i in range(3):
        torch.save({}, tmp_path / f"optimizer_{i}.pt")
    with pytest.warns(UserWarning, match="using 00000002"):
        assert ckpt.load_generator_states(tmp_path).members == [0, 1, 2]
    with pytest.raises(ckpt.CheckpointError, match="missing 2"):
        ckpt.load_generator_states(tmp_path / "00000003")


def test_1_snapshots_from_before_markers_stay_readable(tmp_path):
    """A run begun by an older council-fast (no markers) and continued by this one."""
    for i in range(2):
        torch.save({"b2a": {"w": torch.zeros(1)}}, tmp_path / f"b2a_gen_{i}_00000002.pt")
    ckpt.save_official(tmp_path, 4, {"b2a": {"gen": [{"w": torch.ones(1)}] * 2}})
    torch.save({"b2a": {"w": torch.zeros(1)}}, tmp_path / "b2a_gen_0_00000006.pt")  # a save killed later
    assert ckpt.load_generator_states(tmp_path / "00000002").members == [0, 1]
    with pytest.warns(UserWarning, match="using 00000004"):
        assert ckpt.load_generator_states(tmp_path).source.endswith("00000004")
    with pytest.raises(ckpt.CheckpointError, match="missing 1"):
        ckpt.load_generator_states(tmp_path / "00000006")


def test_1_snapshot_files_appear_only_when_all_are_written(tmp_path):
    """A failure while writing any file of a snapshot leaves none of it under a final name."""
    networks = {"b2a": {"gen": [{"w": torch.ones(2)}] * 3, "dis": [{"w": torch.ones(2)}] * 3}}
    real_save = torch.save
    calls = []

    def failing(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("writer failed")
        return real_save(obj, f, *a, **k)

    torch.save = failing
    try:
        with pytest.raises(RuntimeError, match="writer failed"):
            ckpt.save_official(tmp_path, 1, networks)
    finally:
        torch.save = real_save
    assert os.listdir(tmp_path) == []
    written = ckpt.save_official(tmp_path, 1, networks)
    assert len(written) == 6 and (tmp_path / "snapshot_00000001.json").is_file()


# --------------------------------------------------------------------------- 2. checksums

def test_2_a_flipped_byte_inside_a_generator_file_is_named(council3, synthetic_data, tmp_path):
    from council_fast.reference import AdaINGen
    gen = AdaINGen(3, council3["gen"])
    path = tmp_path / "b2a_gen_0_00000001.pt"
    torch.save({"b2a": gen.state_dict()}, path)
    entry = _flip_byte(path, "data/0")
    with pytest.raises(ckpt.CheckpointError, match="damaged") as e:
        ckpt.load_file(path)
    assert str(path) in str(e.value) and entry in str(e.value)
    r = _cli("convert", "--checkpoint", path, "--config", _write_config(council3, tmp_path / "c.yaml"), "--input",
             synthetic_data / "testB", "--output", tmp_path / "out", "--quiet", "--device", "cpu",
             "--backend", "reference")
    assert r.returncode == 2 and "damaged" in r.stderr and str(path) in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_2_a_damaged_adam_moment_in_a_full_state_is_named(micro_config, synthetic_data, tmp_path):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=100, image_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 1) == 0
    path = out / "checkpoints" / "state_00000001.pt"
    state = torch.load(path, weights_only=True)
    moments = state["optimizers"][0]["dis"]["state"]
    moment = max((m["exp_avg"] for m in moments.values()), key=lambda t: t.numel())
    # Find the storage entry that holds this Adam moment: the one whose bytes equal it.
    with zipfile.ZipFile(path) as zf:
        entry = next(i.filename for i in zf.infolist() if "/data/" in i.filename
                     and zf.read(i) == moment.numpy().tobytes())
    _flip_byte(path, entry)
    with pytest.raises(ckpt.CheckpointError, match="damaged") as e:
        ckpt.load_full_state(path)
    assert entry in str(e.value)
    assert _train("--resume", "--out", out, "--iters", 2) == 2


# --------------------------------------------------------------------------- 3. extension cache

def test_3_the_extension_cache_is_keyed_by_the_torch_installation(monkeypatch):
    base = extension._build_spec("cpu")[0]
    monkeypatch.setattr(torch, "__file__", "/other/env/site-packages/torch/__init__.py")
    assert extension._build_spec("cpu")[0] != base
    monkeypatch.undo()
    monkeypatch.setattr(sys, "prefix", "/other/venv")
    assert extension._build_spec("cpu")[0] != base


def test_3_two_builds_never_write_one_folder_at_once(monkeypatch, tmp_path, capsys):
    """Two processes' builds of one extension run one after the other (an OS lock per build folder)."""
    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    active, overlaps, lock = [0], [], threading.Lock()

    def fake_load(**kwargs):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return kwargs["name"]

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setitem(sys.modules, "council_fast._C_cpu", None)  # no prebuilt module
    threads = [threading.Thread(target=extension._build, args=("cpu", False)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1]


# --------------------------------------------------------------------------- 4. FIFOs

def _trained_run(config, data, tmp_path) -> tuple[Path, str]:
    cfg = _write_config(config, tmp_path / "c.yaml", snapshot_save_iter=100, image_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", data, "--out", out, "--iters", 1) == 0
    return out / "checkpoints", cfg


def test_4_convert_skips_a_fifo_named_like_an_image(micro_config, synthetic_data, tmp_path):
    checkpoints, cfg = _trained_run(micro_config, synthetic_data, tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "real.png").write_bytes((synthetic_data / "testB" / sorted(os.listdir(synthetic_data / "testB"))[0])
                                      .read_bytes())
    os.mkfifo(inputs / "pipe.png")
    os.mkfifo(tmp_path / "direct.jpg")
    r = _cli("convert", "--checkpoint", checkpoints, "--input", inputs, tmp_path / "direct.jpg", "--output",
             tmp_path / "out", "--member", "0", "--seed", "0", "--quiet", "--device", "cpu", "--backend", "reference",
             timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pipe.png: skipped: not a regular file (FIFO)" in r.stderr
    assert "direct.jpg: skipped: not a regular file (FIFO)" in r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["real_m0_s0.png"]


def test_4_reading_a_fifo_as_an_image_fails_at_once(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    result = []
    t = threading.Thread(target=lambda: result.append(_read_error(tmp_path / "x.png")), daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader so the test process can end
        with open(tmp_path / "x.png", "wb"):
            pass
        pytest.fail("open_rgb blocked on a FIFO")
    assert "not a regular file (FIFO)" in result[0]


def _read_error(path) -> str:
    try:
        images.open_rgb(path)
    except images.ImageReadError as e:
        return str(e)
    return "read"


# --------------------------------------------------------------------------- 5. huge images

def _huge_png(path: Path, width: int, height: int) -> None:
    """A valid single-colour PNG of width x height in 1-bit palette mode: a few hundred KB on disk, but
    decoded as RGB it is width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0))
                     + chunk(b"PLTE", bytes([30, 160, 90, 0, 0, 0])) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_5_an_image_of_too_many_pixels_is_refused_by_name_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _huge_png(path, 13000, 13000)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(images.ImageReadError, match="13000x13000 is 169 megapixels") as e:
        images.open_rgb(path)
    assert str(path) in str(e.value)


def test_5_a_large_jpeg_is_reduced_while_decoding(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (2400, 1600), (200, 40, 40)).save(path, quality=90)
    monkeypatch.setenv("COUNCIL_FAST_MAX_IMAGE_PIXELS", "1000000")
    im = images.open_rgb(path)
    assert im.size == (1200, 800) and im.getpixel((600, 400))[0] > 150


def test_5_concurrent_decodes_stay_within_the_pixel_budget(tmp_path, monkeypatch):
    for k in range(4):
        Image.new("RGB", (400, 300), (k, k, k)).save(tmp_path / f"{k}.png")
    budget = images.PixelBudget(2 * 400 * 300)
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    peak, real_load = [0], Image.Image.load

    def slow_load(self):
        peak[0] = max(peak[0], budget.in_use)
        time.sleep(0.05)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", slow_load)
    threads = [threading.Thread(target=images.open_rgb, args=(tmp_path / f"{k}.png",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 2 * 400 * 300


# --------------------------------------------------------------------------- 6. SIGTERM

def test_6_sigterm_finishes_the_iteration_saves_and_exits_143(micro_config, synthetic_data, tmp_path):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=1000, image_save_iter=2)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("COUNCIL_FAST_CRASH_AT", None)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "council_fast", "train", "--config", cfg, "--data",
                                 str(synthetic_data), "--out", str(out), "--iters", "1000", "--device", "cpu"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            deadline = time.time() + 300
            while not (out / "images" / "test_00000002.png").exists():  # two iterations are done
                assert proc.poll() is None, log.read_text()
                assert time.time() < deadline, "no second iteration within 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 143, err
    assert "SIGTERM" in err
    state = ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))
    # The signal may land before the second iteration starts: every finished iteration is saved, none lost.
    assert 1 <= state["iteration"] < 1000


# --------------------------------------------------------------------------- 7. leftovers of kill -9

def test_7_temp_files_of_a_killed_training_run_are_removed_on_resume(micro_config, synthetic_data, tmp_path):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=1, image_save_iter=1000)
    out = tmp_path / "run"
    # killed after writing (not renaming) the 4th temporary file: config.yaml, then 3 of snapshot 1
    r = _cli("train", "--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 2, "--device", "cpu",
             crash_at="write:4")
    assert r.returncode == -signal.SIGKILL
    left = _temp_files(out)
    assert left  # the precondition: kill -9 leaves temp files
    r = _cli("train", "--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"removed {len(left)} temporary file(s)" in r.stderr
    assert _temp_files(out) == []


def test_7_temp_files_of_a_killed_conversion_are_removed_on_the_next(micro_config, synthetic_data, tmp_path):
    checkpoints, _ = _trained_run(micro_config, synthetic_data, tmp_path)
    args = ("convert", "--checkpoint", checkpoints, "--input", synthetic_data / "testB", "--output",
            tmp_path / "out", "--seed", "0", "--quiet", "--device", "cpu", "--backend", "reference")
    r = _cli(*args, crash_at="write:1")
    assert r.returncode == -signal.SIGKILL
    left = _temp_files(tmp_path / "out")
    assert left  # the precondition (the writer threads may have had more than one file under way)
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"removed {len(left)} temporary file(s)" in r.stderr
    assert _temp_files(tmp_path / "out") == []


def test_7_files_of_live_processes_and_other_files_are_left_alone(tmp_path):
    live = tmp_path / f".a.pt.{os.getpid()}-abcd1234.cftmp"
    other = tmp_path / ".a.pt.123-abcd1234.tmp"
    for p in (live, other):
        p.write_bytes(b"x")
    assert fileio.clean_stale_temp_files(tmp_path) == []
    assert live.exists() and other.exists()


# --------------------------------------------------------------------------- 8. config ranges

BAD_VALUES = [
    ("beta1", 1.5, "beta1"), ("beta2", -0.1, "beta2"), ("lr", float("nan"), "lr"), ("lr", float("inf"), "lr"),
    ("display_size", -1, "display_size"), ("RandomGrayscale_P", 1.5, "RandomGrayscale_P"),
    ("step_size", 0, "step_size"), ("gan_w", float("inf"), "gan_w"), ("council_w", -1, "council_w"),
    ("gamma", -0.5, "gamma"), ("weight_decay", -1e-4, "weight_decay"), ("new_size", 1_000_000, "new_size"),
    ("gen", {"dim": 100_000}, "gen.dim"), ("council", {"council_size": 100_000}, "council.council_size"),
    ("council", {"flipOnOff": True, "flipOnOff_On_iteration": 0}, "council.flipOnOff_On_iteration"),
    ("inbalenceDataSets", {"ratio_A_1_to_2": 2}, "inbalenceDataSets.ratio_A_1_to_2"),
    ("random_seed", -1, "random_seed"),
]


@pytest.mark.parametrize("key,value,named", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_8_every_value_range_is_checked_up_front(tmp_path, key, value, named):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError, match=f"key '{named}'"):
        load_config(path)


def test_8_a_bad_value_is_exit_2_naming_the_key_before_anything_runs(synthetic_data, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("step_size: 0\n")
    assert _train("--config", path, "--data", synthetic_data, "--out", tmp_path / "run", "--iters", 2) == 2
    assert "key 'step_size' must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"# padding\n" * 200_000 + b"lr: 0.0001\n"],
                         ids=["binary", "2 MB"])
def test_8_binary_or_huge_files_are_not_configs(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_8_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
        micro_config, synthetic_data, tmp_path, monkeypatch, capsys):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=1, image_save_iter=1000)
    original = CouncilTrainer.step

    def step(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        if self.iteration == 3:
            losses = dict(losses, **{"b2a/adv/1": torch.tensor(float("nan"))})
        return losses

    monkeypatch.setattr(CouncilTrainer, "step", step)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 5) == 1
    err = capsys.readouterr().err
    assert "iteration 3: loss 'b2a/adv/1' is nan" in err
    assert ckpt.load_full_state(ckpt.latest_full_state_path(out / "checkpoints"))["iteration"] == 2
    assert not list((out / "checkpoints").glob("*_00000004.pt"))


# --------------------------------------------------------------------------- 9. resume fields

def _set(state, field, value):
    if value is KeyError:
        del state[field]
    else:
        state[field] = value


RESUME_CASES = [("rng", KeyError, "rng"), ("config", {}, "config"), ("iteration", "abc", "iteration"),
                ("optimizers", [], "optimizers"), ("iteration", -3, "iteration"), ("schedulers", None, "schedulers")]


@pytest.mark.parametrize("field,value,named", RESUME_CASES, ids=[f"{f}={v!r}" for f, v, _ in RESUME_CASES])
def test_9_damaged_full_state_fields_are_exit_2_naming_the_field(micro_config, synthetic_data, tmp_path, capsys,
                                                                 field, value, named):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=100, image_save_iter=100)
    out = tmp_path / "run"
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 1) == 0
    path = out / "checkpoints" / "state_00000001.pt"
    state = torch.load(path, weights_only=True)
    _set(state, field, value)
    torch.save(state, path)
    capsys.readouterr()
    assert _train("--resume", "--out", out, "--iters", 2) == 2
    err = capsys.readouterr().err
    assert str(path) in err and named in err


def test_9_a_rng_state_of_the_wrong_kind_is_named(micro_config, tmp_path):
    state = {"format": ckpt.FULL_STATE_FORMAT, "version": ckpt.FULL_STATE_VERSION, "config": copy.deepcopy(
        micro_config), "iteration": 1, "engine": "reference", "networks": {"b2a": {}},
             "optimizers": [{k: {"state": {}, "param_groups": [{}]} for k in ("gen", "dis")}] * 2,
             "schedulers": [{}, {}], "loss_history": {}, "rng": {"torch_cpu": "zzz"}}
    with pytest.raises(ckpt.CheckpointError, match=r"rng\['torch_cpu'\]"):
        ckpt.check_resumable(state, "s.pt")


# --------------------------------------------------------------------------- 10. full disk

def _enospc_for(monkeypatch, fragment: str) -> None:
    """os.write fails with ENOSPC for files whose path contains ``fragment`` (a full disk, simulated)."""
    real_write = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if fragment in target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("fragment", ["state_00000002.pt", "b2a_gen_1_00000003.pt"])
def test_10_a_full_disk_during_a_training_save_names_the_file_and_keeps_the_previous(
        micro_config, synthetic_data, tmp_path, monkeypatch, capsys, fragment):
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to aim the simulated full disk at one file")
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=1, image_save_iter=1000)
    out = tmp_path / "run"
    _enospc_for(monkeypatch, fragment)
    assert _train("--config", cfg, "--data", synthetic_data, "--out", out, "--iters", 3) == 1
    err = capsys.readouterr().err
    assert fragment in err and "disk is full" in err and "needed" in err and "Traceback" not in err
    checkpoints = out / "checkpoints"
    assert ckpt.load_full_state(ckpt.latest_full_state_path(checkpoints))["iteration"] == 1
    assert ckpt.load_generator_states(checkpoints).members == [0, 1]
    assert _temp_files(out) == []
    monkeypatch.undo()
    assert _train("--resume", "--out", out, "--iters", 3) == 0


# --------------------------------------------------------------------------- 11. file modes

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_11_final_files_get_the_mode_the_umask_says(tmp_path, umask):
    previous = os.umask(umask)
    try:
        fileio.atomic_write_bytes(tmp_path / "a.txt", b"x")
        fileio.atomic_torch_save({"x": torch.ones(1)}, tmp_path / "b.pt")
        images.save_image(torch.zeros(3, 4, 4), tmp_path / "c.png")
        ckpt.save_official(tmp_path, 1, {"b2a": {"gen": [{"w": torch.ones(1)}]}})
    finally:
        os.umask(previous)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def test_11_a_training_run_writes_files_with_the_umask_mode(micro_config, synthetic_data, tmp_path):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=100, image_save_iter=1)
    previous = os.umask(0o022)
    try:
        assert _train("--config", cfg, "--data", synthetic_data, "--out", tmp_path / "run", "--iters", 1) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


# --------------------------------------------------------------------------- 12. latest.txt

@pytest.mark.parametrize("pointer", ["../../other/checkpoints/state_00000001.pt", "{other}/state_00000001.pt",
                                     "../state_00000001.pt", "state_00000001.pt/../../../other/checkpoints/x"])
def test_12_latest_txt_resolves_only_inside_its_checkpoints_folder(micro_config, synthetic_data, tmp_path, capsys,
                                                                   pointer):
    cfg = _write_config(micro_config, tmp_path / "c.yaml", snapshot_save_iter=100, image_save_iter=100)
    for run in ("run", "other"):
        assert _train("--config", cfg, "--data", synthetic_data, "--out", tmp_path / run, "--iters", 1) == 0
    latest = tmp_path / "run" / "checkpoints" / "latest.txt"
    latest.write_text(pointer.format(other=tmp_path / "other" / "checkpoints") + "\n")
    with pytest.raises(ckpt.CheckpointError, match="only points inside its own folder"):
        ckpt.latest_full_state_path(tmp_path / "run" / "checkpoints")
    capsys.readouterr()
    assert _train("--resume", "--out", tmp_path / "run", "--iters", 2) == 2
    assert "latest.txt" in capsys.readouterr().err
