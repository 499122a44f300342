"""Atomic writes: a crash mid-write never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

import torch

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_torch_save"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_torch_save(obj, path: str | os.PathLike, save: Callable | None = None) -> None:
    with atomic_path(path) as tmp:
        (save or torch.save)(obj, tmp)
