"""The CUDA kernels of csrc/*_cuda.cu run on the CPU, for machines without a GPU (CI).

Each .cu file is rewritten in a few mechanical ways and compiled as C++ against
tests/cuda_emu/cuda_emu.h, which runs every CUDA thread as a fiber with real barriers and warp
shuffles (see that header for what is and is not modelled):

- ``kernel<<<grid, block, bytes, stream>>>(args)`` becomes ``cf_emu::launch(kernel, grid, block, bytes, stream)(args)``;
- ``extern __shared__ T name[];`` and ``__shared__ T name[...];`` become per-block emulator buffers;
- the CUDA headers go (the emulator header stands in), ``.is_cuda()`` checks accept CPU tensors,
  and ``TORCH_LIBRARY_IMPL(council_fast, CUDA, m)`` becomes ``(council_fast_cuda_emu, CPU, m)``:
  the CPU dispatch key of ``council_fast`` belongs to the real CPU kernels, so the emulated ones get
  a namespace of their own, with the same schemas (csrc/schemas.cpp compiled under that name).

``install(monkeypatch)`` then makes the ``cuda`` back-end of council_fast run those kernels on CPU
tensors: the same Python wrappers, registry ops, autograd and host code as on a GPU, other kernels.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re

import torch

from council_fast.ops import extension, registry

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")
NAMESPACE = "council_fast_cuda_emu"
CFLAGS = ["-O2", "-std=c++17", "-Wno-unknown-pragmas", "-Wno-unused-variable"]

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)\s*((?:\[[^\]]*\])*)\s*;")
_CUDA_INCLUDE = re.compile(r"^\s*#\s*include\s*<(?:c10/cuda/|cuda)[^>]*>\s*$", re.M)


def _without_comments(source: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: " " * len(m.group()), source, flags=re.S)


def _inside_a_function(code: str, position: int) -> bool:
    """Whether ``position`` lies in a function body: some open brace before it follows a ``)``
    (a function, a loop or a branch), not a namespace or type name."""
    opened = []
    for i, c in enumerate(code[:position]):
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            opened.pop()
    return any(code[:i].rstrip().endswith(")") for i in opened)


def rewrite(source: str) -> str:
    """The emulator's C++ version of one .cu file."""
    code = _without_comments(source)
    for m in re.finditer(r"__shared__", code):
        if not _inside_a_function(code, m.start()):
            line = source.count("\n", 0, m.start()) + 1
            raise RuntimeError(f"cuda emulator: __shared__ outside a function (line {line}) is not supported")
    out = _CUDA_INCLUDE.sub("", source)
    out = _LAUNCH.sub(lambda m: f"::cf_emu::launch({m.group(1)}, {m.group(2)})(", out)
    out = _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::cf_emu::dynamic_shared<{m.group(1)}>();", out)
    counter = iter(range(1 << 30))

    def static_shared(m):
        tag = f"cf_emu_tag_{m.group(2)}_{next(counter)}"
        return (f"static char {tag}; auto& {m.group(2)} = "
                f"::cf_emu::shared_var<{m.group(1)}{m.group(3)}>(&{tag});")

    out = _STATIC_SHARED.sub(static_shared, out)
    out = out.replace(".is_cuda()", ".is_cpu()")
    out = re.sub(r"TORCH_LIBRARY_IMPL\(\s*council_fast\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", out)
    for construct in ("<<<", "__shared__"):
        if construct in out:
            raise RuntimeError(f"cuda emulator: a {construct} the rewrite does not handle is left")
    return '#include "cuda_emu.h"\n' + out


def rewrite_schemas(source: str) -> str:
    """csrc/schemas.cpp defining the same schemas in the emulator's namespace."""
    out, count = re.subn(r"TORCH_LIBRARY\(\s*council_fast\s*,", f"TORCH_LIBRARY({NAMESPACE},", source)
    if count != 1:
        raise RuntimeError(f"cuda emulator: expected one TORCH_LIBRARY(council_fast, m) in schemas.cpp, found {count}")
    return out


def cuda_sources() -> list[str]:
    root = extension.csrc_dir()
    return sorted(glob.glob(os.path.join(root, "*_cuda.cu")))


_built: dict[str, str] = {}


def build(verbose: bool = False) -> str:
    """Rewrites and compiles the CUDA sources (cached by content, as the real extensions are); loads them."""
    from torch.utils import cpp_extension

    kernels = cuda_sources() + sorted(glob.glob(os.path.join(EMU_DIR, "*_cuda.cu")))  # + the self-test kernels
    sources = {os.path.basename(p): rewrite(open(p).read()) for p in kernels}
    sources["emu_ops.cpp"] = open(os.path.join(EMU_DIR, "emu_ops.cpp")).read()
    sources["schemas.cpp"] = rewrite_schemas(open(os.path.join(extension.csrc_dir(), "schemas.cpp")).read())
    headers = [os.path.join(EMU_DIR, "cuda_emu.h")] + sorted(glob.glob(os.path.join(extension.csrc_dir(), "*.h")))
    digest = hashlib.sha1(b"".join(open(path, "rb").read() for path in headers))
    for name in sorted(sources):
        digest.update(name.encode() + sources[name].encode())
    digest.update((torch.__version__ + " ".join(CFLAGS)).encode())
    name = f"council_fast_cuda_emu_{digest.hexdigest()[:12]}"
    if name in _built:
        return _built[name]
    folder = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "src")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for file_name, text in sorted(sources.items()):
        path = os.path.join(folder, file_name.replace(".cu", "_emu.cpp"))
        if not os.path.isfile(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        paths.append(path)
    extension.wait_for_build_lock(name)
    cpp_extension.load(name=name, sources=paths, extra_cflags=CFLAGS, extra_include_paths=[EMU_DIR, extension.csrc_dir()],
                       is_python_module=False, verbose=verbose)
    _built[name] = name
    return name


def launches() -> int:
    return int(torch.ops.cuda_emu.launches())


def install(monkeypatch) -> str:
    """Routes the ``cuda`` back-end to the emulated kernels for one test; returns the back-end name."""
    build()
    monkeypatch.setitem(extension.NAMESPACES, "cuda", NAMESPACE)
    monkeypatch.setitem(extension._ext_cache, "cuda", NAMESPACE)
    real = registry.why_unavailable

    def why_unavailable(name, device, op=None):
        if name == "cuda" and torch.device(device).type == "cpu":
            return None
        return real(name, device, op)

    monkeypatch.setattr(registry, "why_unavailable", why_unavailable)
    return "cuda"
