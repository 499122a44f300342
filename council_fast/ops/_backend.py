"""Choosing and loading kernel implementations.

Back-ends: ``reference`` (plain PyTorch, any device), ``cpu`` (C++ extension, CPU tensors),
``triton`` (GPU; on the CPU only under TRITON_INTERPRET=1, which is how CI tests it) and ``cuda``
(C++/CUDA extension). Pick one by argument or COUNCIL_FAST_BACKEND; ``auto`` (the default) takes
the fastest available for the device and falls back with one warning, unless strict mode
(argument or COUNCIL_FAST_STRICT=1) asks for an error instead. An explicitly named back-end that
cannot run is always an error.

The C++ sources in csrc/ are JIT-built once per source hash and cached (torch's extension
tooling with ninja; TORCH_EXTENSIONS_DIR moves the cache). Every ``*_cpu.cpp`` goes into the CPU
extension and every ``*_cuda.cu`` / ``*_cuda.cpp`` into the CUDA one, each beside
``csrc/module.cpp``. Kernels register themselves with ``TORCH_LIBRARY_FRAGMENT(council_fast_cpu, m)``
or ``(council_fast_cuda, m)`` and are then called as ``torch.ops.council_fast_cpu.<name>``.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import os
import socket
import sys
import threading
import time
import warnings

import torch

__all__ = ["BACKENDS", "BackendUnavailable", "resolve_backend", "load_extension", "cached_build", "triton_available",
           "triton_interpreted", "strict_mode", "csrc_dir", "wait_for_build_lock", "build_lock"]

BACKENDS = ("reference", "cpu", "triton", "cuda")
# No --use_fast_math: it turns tanhf into tanh.approx.f32 (~5e-4 relative error), far outside the
# decoder tail's fp32 tolerance.
CUDA_FLAGS = ["-O3", "-std=c++17"]
_lock = threading.Lock()
_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """The requested kernel back-end cannot run here; the message says why."""


def strict_mode(strict: bool | None = None) -> bool:
    if strict is not None:
        return bool(strict)
    return os.environ.get("COUNCIL_FAST_STRICT", "0").lower() in ("1", "true", "yes")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"triton cannot be imported ({e})"
    return None


def triton_available(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on ``device``, else the reason they cannot."""
    err = _triton_import_error()
    if err:
        return err
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    return f"triton runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not on {device.type}"


def csrc_dir() -> str:
    """The kernel sources: the repository's csrc/ (editable install) or the copy inside the package."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isfile(os.path.join(candidate, "module.cpp")):
            return candidate
    raise BackendUnavailable("kernel sources not found (expected csrc/module.cpp beside the package)")


def _sources(kind: str) -> list[str]:
    root = csrc_dir()
    patterns = ["*_cpu.cpp"] if kind == "cpu" else ["*_cuda.cu", "*_cuda.cpp"]
    files = sorted(f for p in patterns for f in glob.glob(os.path.join(root, p)))
    if not files:
        raise BackendUnavailable(f"no {kind} kernel sources in {root}")
    return [os.path.join(root, "module.cpp")] + files


_ext_cache: dict[str, object] = {}
_ext_errors: dict[str, str] = {}


def load_extension(kind: str, verbose: bool = False):
    """Build (once, cached on disk by source hash) and import the ``cpu`` or ``cuda`` extension."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"extension kind must be 'cpu' or 'cuda', not {kind!r}")
    with _lock:
        if kind in _ext_cache:
            return _ext_cache[kind]
        if kind in _ext_errors:
            raise BackendUnavailable(_ext_errors[kind])
        try:
            module = _build(kind, verbose)
        except BackendUnavailable as e:
            _ext_errors[kind] = str(e)
            raise
        except Exception as e:  # noqa: BLE001 - compiler errors come in many types
            _ext_errors[kind] = f"building the {kind} extension failed: {str(e)[-2000:]}"
            raise BackendUnavailable(_ext_errors[kind]) from e
        _ext_cache[kind] = module
        return module


def _build(kind: str, verbose: bool):
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("the cuda back-end needs a CUDA device")
    try:
        import importlib
        prebuilt = importlib.import_module(f"council_fast._C_{kind}")  # built by setup.py, if it was
        return prebuilt
    except ImportError:
        pass
    from torch.utils import cpp_extension
    name, sources, cflags = _build_spec(kind)
    kwargs = dict(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=verbose)
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = CUDA_FLAGS
    with build_lock(name):
        return cpp_extension.load(**kwargs)


def installation_key() -> str:
    """What a build depends on beyond the sources: this torch installation (where it lives, its version,
    CUDA version) and the Python running it, so environments with the same torch version never share or
    rebuild each other's extension."""
    return "|".join((os.path.dirname(os.path.realpath(torch.__file__)), torch.__version__, str(torch.version.cuda),
                     sys.prefix, sys.version))


def _build_spec(kind: str) -> tuple[str, list[str], list[str]]:
    """(module name, sources, C++ flags): the name hashes everything the build depends on."""
    sources = _sources(kind)
    digest = hashlib.sha1()
    headers = sorted(glob.glob(os.path.join(csrc_dir(), "*.h")))
    for path in sources + headers:
        with open(path, "rb") as f:
            digest.update(f.read())
    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    if kind == "cpu" and os.environ.get("COUNCIL_FAST_NATIVE", "1") == "1":
        cflags.append("-march=native")  # the build is cached per machine: the name hashes the CPU flags
        digest.update(_cpu_flags().encode())
    digest.update(installation_key().encode())
    digest.update(" ".join(cflags + (CUDA_FLAGS if kind == "cuda" else [])).encode())
    return f"council_fast_{kind}_{digest.hexdigest()[:12]}", sources, cflags


def wait_for_build_lock(name: str, stale_after_s: float = 1800.0, poll_s: float = 1.0) -> None:
    """torch's extension tooling waits, without a word and without end, for the lock file of a build in
    progress; a killed build leaves that file behind. Wait here instead, saying so, and give up with an
    error naming the file once it is older than any real build (30 minutes)."""
    from torch.utils import cpp_extension

    lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    if os.path.exists(lock):
        print(f"council-fast: waiting for {lock}: another process is building {name}", file=sys.stderr, flush=True)
    while os.path.exists(lock):
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # removed between the two calls
            break
        if age > stale_after_s:
            raise BackendUnavailable(f"{lock} is {age / 60:.0f} minutes old: a build of {name} was interrupted; "
                                     "delete that file and try again")
        time.sleep(poll_s)


FAILED_MARKER = "council_fast.failed"  # in the build folder: the error of a failed build of these exact sources
FAILED_BUILD_RETRY_AFTER_S = 3600.0  # a recorded failure older than this is built again


@contextlib.contextmanager
def build_lock(name: str, timeout_s: float = 1800.0, poll_s: float = 1.0):
    """Runs the build of ``name`` holding an exclusive flock on its build folder.

    The kernel drops an flock when its holder dies, so a killed build never blocks the next one; holding
    it, torch's own ``lock`` file can only be a killed build's leftover, and is removed. A build that
    fails records its error in FAILED_MARKER (the folder is keyed by the hash of the sources, flags and
    torch version): every later process fails at once with that error instead of building again, until
    the file is deleted or is an hour old (a failure can be passing: a compiler killed for memory)."""
    from torch.utils import cpp_extension

    folder = cpp_extension._get_build_directory(name, verbose=False)
    failed = os.path.join(folder, FAILED_MARKER)
    with open(os.path.join(folder, "council_fast.lock"), "a+") as handle:
        _flock(handle, name, timeout_s, poll_s)
        if os.path.exists(failed) and time.time() - os.path.getmtime(failed) > FAILED_BUILD_RETRY_AFTER_S:
            os.remove(failed)  # an old failure (a compiler killed for memory, say) is tried again
        if os.path.exists(failed):
            with open(failed) as f:
                raise BackendUnavailable(f"an earlier build of {name} failed (recorded in {failed}; delete that "
                                         f"file to build again): {f.read()}")
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "lock"))  # torch's lock, left by a killed build
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        except Exception as e:
            _write_atomic(failed, f"{type(e).__name__}: {str(e)[-4000:]}")
            raise


def _flock(handle, name: str, timeout_s: float, poll_s: float) -> None:
    start = time.time()
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.time() - start > timeout_s:
            raise BackendUnavailable(f"waited {timeout_s / 60:.0f} minutes for the build of {name} by another "
                                     f"process ({handle.name}: {open(handle.name).read().strip()})")
        if time.time() - start < poll_s:
            print(f"council-fast: waiting for another process building {name} ({handle.name})", file=sys.stderr,
                  flush=True)
        time.sleep(poll_s)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cached_build(kind: str) -> str | None:
    """The path of the already built ``kind`` extension for the current sources, or None (nothing is built)."""
    from torch.utils import cpp_extension

    try:
        name = _build_spec(kind)[0]
    except BackendUnavailable:
        return None
    path = os.path.join(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
    return path if os.path.isfile(path) else None


def _cpu_flags() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton":
        return triton_available(device)
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu back-end runs on CPU tensors, not on {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda back-end runs on CUDA tensors, not on {device.type}"
    try:
        load_extension(backend)
    except BackendUnavailable as e:
        return str(e)
    return None


def resolve_backend(requested: str | None = None, device: torch.device | str = "cpu",
                    strict: bool | None = None) -> str:
    """The back-end to use on ``device``: explicit > COUNCIL_FAST_BACKEND > automatic choice."""
    device = torch.device(device)
    requested = (requested or os.environ.get("COUNCIL_FAST_BACKEND") or "auto").lower()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown back-end {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
        reason = _why_unavailable(requested, device)
        if reason:
            raise BackendUnavailable(f"back-end {requested!r} is unavailable: {reason}")
        return requested
    preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    reasons = []
    for candidate in preferred:
        reason = _why_unavailable(candidate, device)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    message = (f"council-fast: no fused back-end for {device.type} ({'; '.join(reasons)}); "
               "falling back to the reference back-end")
    if strict_mode(strict):
        raise BackendUnavailable(message)
    _warn_once(message)
    return "reference"


def triton_launch(fn):
    """Runs a Triton launcher with the CUDA device of its first tensor argument made current.

    Triton launches on the current device's current stream; for tensors on another GPU (cuda:1 while
    cuda:0 is current) that would be the wrong device.
    """
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return fn(first, *args, **kwargs)
    return wrapper
