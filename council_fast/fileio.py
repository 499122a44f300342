"""Atomic writes: a crash mid-write never leaves a half-written file under the final name.

Every file is first written beside its final name under a temporary name of our own,
``.<name>.<pid>-<random>.cftmp[<ext>]``, then renamed over the final name. Such a name is
recognisable, so the temporary files a killed process leaves behind are removed on the next start
(:func:`clean_stale_temp_files`). Final files get the mode the umask gives a new file (0666 & ~umask),
not mkstemp's 0600. A full disk while writing is a :class:`DiskFullError` naming the file and the
space needed; the file under the final name, if any, is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

import torch

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_torch_save", "atomic_files", "AtomicFiles",
           "DiskFullError", "clean_stale_temp_files", "report_stale_temp_files", "is_regular_file",
           "file_kind", "TEMP_MARK"]

TEMP_MARK = ".cftmp"
# .<final name>.<pid>-<random>.cftmp[.<ext>]  (mkstemp's random part: letters, digits, underscore)
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+\.cftmp(\.[A-Za-z0-9]+)?$")
# A temporary file older than this is stale whatever its process id says (no save takes a day).
STALE_AFTER_S = 24 * 3600.0
_umask_lock = threading.Lock()


class DiskFullError(OSError):
    """The filesystem ran out of space (or quota) while a file was written; the message names the file."""


# --------------------------------------------------------------------------- modes and kinds

def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~_umask()


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file (symlinks followed), else what it is ('FIFO', 'socket', 'folder', ...)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (or a symlink to one); False for FIFOs, devices, sockets, folders, nothing."""
    try:
        return file_kind(path) is None
    except OSError:
        return False


# --------------------------------------------------------------------------- temporary files

def _new_temp(path: str, suffix: str = "") -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}-", suffix=f"{TEMP_MARK}{suffix}",
                               dir=directory)
    try:
        os.fchmod(fd, new_file_mode())
    finally:
        os.close(fd)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(path: str, name: str) -> bool:
    m = _TEMP_NAME.match(name)
    if m is None:
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return False
    return age > STALE_AFTER_S or not _pid_alive(int(m.group(1)))


def clean_stale_temp_files(folder: str | os.PathLike, recursive: bool = False) -> list[tuple[str, int]]:
    """Remove the temporary files of our own naming that a killed process left in ``folder``.

    A file counts as stale when the process named in it is gone (or it is over a day old); files of
    running processes and every other file are left alone. Returns (path, size in bytes) per file removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _, names in walk:
        for name in sorted(names):
            path = os.path.join(root, name)
            if _is_stale(path, name):
                with contextlib.suppress(OSError):
                    size = os.path.getsize(path)
                    os.unlink(path)
                    removed.append((path, size))
    return removed


def report_stale_temp_files(folder: str | os.PathLike, recursive: bool = False, file=None) -> int:
    """:func:`clean_stale_temp_files`, saying on stderr what was removed; returns the number of files."""
    removed = clean_stale_temp_files(folder, recursive)
    if removed:
        total = sum(size for _, size in removed)
        shown = ", ".join(os.path.basename(p) for p, _ in removed[:5]) + (" ..." if len(removed) > 5 else "")
        print(f"council-fast: removed {len(removed)} temporary file(s) ({_size(total)}) left in {os.fspath(folder)} "
              f"by an interrupted run: {shown}", file=file or sys.stderr)
    return len(removed)


# --------------------------------------------------------------------------- writing

def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(path: str, needed: int | None, e: OSError) -> DiskFullError:
    free = _free_bytes(path)
    need = f"about {_size(needed)} needed" if needed else "space needed unknown"
    have = f", {_size(free)} free" if free is not None else ""
    return DiskFullError(e.errno, f"{path}: the disk is full ({e.strerror or e}): {need}{have} on that "
                                  f"filesystem; the previous file, if any, is kept")


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class _FdWriter(io.RawIOBase):
    """A raw writer over a file descriptor through ``os.write`` (so an ENOSPC surfaces as OSError)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return os.write(self.fd, b)


@contextlib.contextmanager
def _open_temp(tmp: str) -> Iterator[io.BufferedWriter]:
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    raw = _FdWriter(fd)
    try:
        with io.BufferedWriter(raw, buffer_size=1 << 20) as f:
            yield f
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        _fsync_path(directory)


def _tensor_bytes(obj) -> int:
    """Bytes of tensor data in a nested structure (what a torch.save of it mostly needs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class AtomicFiles:
    """Files written under temporary names and renamed into place together, in the order written.

    Use through :func:`atomic_files`: nothing appears under a final name until every file of the group
    is written, and a failure removes the group's temporary files.
    """

    def __init__(self):
        self._pending: list[tuple[str, str]] = []

    def _add(self, path: str | os.PathLike, write: Callable, needed: int | None, suffix: str = "") -> None:
        path = os.fspath(path)
        tmp = _new_temp(path, suffix)
        self._pending.append((tmp, path))
        try:
            write(tmp)
            _crash_point("write")
        except OSError as e:
            if _is_disk_full(e):
                raise _disk_full(path, needed, e) from None
            raise

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        def write(tmp):
            with _open_temp(tmp) as f:
                f.write(data)
        self._add(path, write, len(data))

    def torch_save(self, obj, path: str | os.PathLike, save: Callable | None = None) -> None:
        def write(tmp):
            if save is not None:  # a writer that takes a path
                save(obj, tmp)
                _fsync_path(tmp)
                return
            with _open_temp(tmp) as f:
                torch.save(obj, f)
        self._add(path, write, _tensor_bytes(obj) + (1 << 16))

    def path(self, path: str | os.PathLike, suffix: str = "") -> str:
        """A temporary path for a writer that writes by name; renamed over ``path`` at commit."""
        path = os.fspath(path)
        tmp = _new_temp(path, suffix)
        self._pending.append((tmp, path))
        return tmp

    def commit(self) -> None:
        for tmp, path in self._pending:
            _crash_point("rename")
            os.replace(tmp, path)
        for directory in sorted({os.path.dirname(os.path.abspath(p)) for _, p in self._pending}):
            _fsync_dir(directory)
        self._pending = []

    def abort(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._pending = []


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """A group of atomic writes that become visible together (see :class:`AtomicFiles`)."""
    group = AtomicFiles()
    try:
        yield group
        group.commit()
    except BaseException:
        group.abort()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it.
    """
    with atomic_files() as group:
        tmp = group.path(path, suffix)
        try:
            yield tmp
        except OSError as e:
            if _is_disk_full(e):
                raise _disk_full(os.fspath(path), None, e) from None
            raise
        _fsync_path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_files() as group:
        group.write_bytes(path, data)


def atomic_torch_save(obj, path: str | os.PathLike, save: Callable | None = None) -> None:
    with atomic_files() as group:
        group.torch_save(obj, path, save)


# --------------------------------------------------------------------------- crash tests

_crash_counts: dict[str, int] = {}


def _crash_point(event: str) -> None:
    """Tests only: COUNCIL_FAST_CRASH_AT=<event>:<n> kills this process (SIGKILL) at the n-th ``event``."""
    spec = os.environ.get("COUNCIL_FAST_CRASH_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != event:
        return
    _crash_counts[event] = _crash_counts.get(event, 0) + 1
    if _crash_counts[event] == int(count or 1):
        os.kill(os.getpid(), 9)
