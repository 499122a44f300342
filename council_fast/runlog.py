"""Run logs: every scalar a training run records, as JSON lines in the run folder (always) and as
TensorBoard event files (when the optional ``tensorboard`` package is installed), plus the sample
sheets as images.

``RUN/log.jsonl`` holds one JSON object per line: ``{"step": n, "time": t, "scalars": {name: value}}``
or ``{"step": n, "time": t, "image": name, "path": path relative to RUN}``. A resumed run appends; a
reader keeps the last value written for a step. TensorBoard files go to ``RUN/tensorboard/``
(``tensorboard --logdir RUN``).

No host synchronisation per iteration: :meth:`RunLog.record` only keeps the iteration's values (device
tensors, as the trainer returns them); :meth:`RunLog.flush` turns everything pending into numbers with
one device-to-host copy per device, and the training loop calls it where its progress bar already reads
the losses (about once a second) and before it stops.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Mapping

import numpy as np
import torch
from PIL import Image

__all__ = ["RunLog", "LOG_NAME", "TENSORBOARD_DIR", "read_log", "tensorboard_available"]

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
MAX_PENDING = 10_000  # flush on its own past this many pending iterations (a sync then), bounding memory


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError(f"TensorBoard logging needs the optional extra: pip install 'council-fast[tensorboard]' "
                           f"({e})") from None
    return SummaryWriter(folder)


def _as_number(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _stack_by_device(values: Mapping) -> tuple[list, dict]:
    """One iteration's values: tensors stacked per device and dtype (one small copy per group, so later
    in-place updates of the trainer's buffers do not reach them; about two kernel launches per group),
    numbers as floats."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    numbers = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault((value.device, value.dtype), []).append((key, value.detach().reshape(())))
        else:
            numbers[key] = float(value)
    stacked = [([k for k, _ in items], torch.stack([t for _, t in items]).to(torch.float64))
               for items in groups.values()]
    return stacked, numbers


def _to_host(pending: list[tuple[int, list, dict]]) -> list[tuple[int, dict]]:
    """The pending values as floats: each device's tensors concatenated and copied in one transfer."""
    out = [(step, dict(numbers)) for step, _, numbers in pending]
    by_device: dict[torch.device, list[tuple[int, list[str], torch.Tensor]]] = {}
    for n, (_, stacked, _) in enumerate(pending):
        for keys, tensor in stacked:
            by_device.setdefault(tensor.device, []).append((n, keys, tensor))
    for items in by_device.values():
        flat = iter(torch.cat([t for _, _, t in items]).tolist())  # the one sync for this device
        for n, keys, _ in items:
            out[n][1].update(zip(keys, flat))
    return [(step, dict(sorted(values.items()))) for step, values in out]


class RunLog:
    """``tensorboard``: None = when installed; True = required (error naming the extra); False = off."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool | None = None):
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.path = os.path.join(self.run_dir, LOG_NAME)
        self._file = open(self.path, "a", encoding="utf-8")
        use_tb = tensorboard_available() if tensorboard is None else tensorboard
        self._tb = _summary_writer(os.path.join(self.run_dir, TENSORBOARD_DIR)) if use_tb else None
        self._pending: list[tuple[int, list, dict]] = []

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def record(self, step: int, values: Mapping) -> None:
        """Keep one iteration's values (tensors stay on their device) until the next flush."""
        self._pending.append((int(step), *_stack_by_device(values)))
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for step, values in _to_host(pending):
            self._write_scalars(step, values)
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def scalars(self, step: int, values: Mapping) -> None:
        """Write values now (after anything pending, so the file stays in step order)."""
        self.flush()
        self._write_scalars(int(step), {k: _as_number(v) for k, v in values.items()})
        self._file.flush()

    def _write_scalars(self, step: int, values: dict) -> None:
        if not values:
            return
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}  # JSON has no NaN
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), "scalars": clean}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def image(self, step: int, name: str, image) -> None:
        """An image: a file path (logged by path; TensorBoard gets its pixels) or an (H, W, 3) uint8 array."""
        self.flush()
        record = {"step": int(step), "time": round(time.time(), 3), "image": name}
        if isinstance(image, (str, os.PathLike)):
            record["path"] = os.path.relpath(os.fspath(image), self.run_dir)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.add_image(name, _pixels(image), int(step), dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _pixels(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images are (H, W, 3) uint8 arrays or file paths, got {arr.dtype} {arr.shape}")
    return arr


def read_log(path: str | os.PathLike) -> tuple[dict[str, tuple[list[int], list[float]]], list[dict]]:
    """(scalars: name -> (steps, values) in step order, the last value written for a step winning;
    image records). ``path`` is a run folder or its log.jsonl."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LOG_NAME)
    series: dict[str, dict[int, float]] = {}
    images = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a last line cut short by a crash: ignore it
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if "scalars" in record:
            for key, value in record["scalars"].items():
                series.setdefault(key, {})[int(record["step"])] = math.nan if value is None else float(value)
        elif "image" in record:
            images.append(record)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items()}, images
