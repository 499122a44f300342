"""Compile every CUDA kernel source for the given architectures, without a GPU.

``python -m council_fast.devtools.compile_check --arch 80 90`` runs nvcc on each csrc/*_cuda.cu with
torch's include paths and ABI flags, exactly as the JIT build would, and exits non-zero on the
first error. CI uses it to keep the CUDA kernels compiling on machines that cannot run them. It
also prints what ptxas reports per architecture (registers, stack frames) and names every kernel
that spills or keeps a stack frame of 1 KB or more.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ..ops._backend import csrc_dir


def cuda_include_dir() -> str:
    """The CUDA headers: CUDA_HOME / CUDA_PATH, else /usr/local/cuda, else beside the real nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/")))]
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    raise FileNotFoundError("CUDA headers not found: set CUDA_HOME")


def write_cpu_torch_shims(folder: str) -> str:
    """CPU builds of torch ship the CUDA headers but not the one CMake generates for CUDA builds;
    a one-line stand-in lets those headers compile (the check never links against CUDA torch)."""
    path = os.path.join(folder, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return folder


def nvcc_command(source: str, archs: list[str], output: str, extra_includes: tuple[str, ...] = ()) -> list[str]:
    import torch
    from torch.utils import cpp_extension
    import sysconfig
    includes = (cpp_extension.include_paths() + [cuda_include_dir(), sysconfig.get_paths()["include"]]
                + list(extra_includes))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    from ..ops._backend import CUDA_FLAGS
    # torch's own nvcc flags (it defines __CUDA_NO_HALF_OPERATORS__ and friends) plus ours, as the JIT build
    cmd = (["nvcc", *CUDA_FLAGS, "-c", source, "-o", output,
            "-DTORCH_EXTENSION_NAME=council_fast_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC"] + list(cpp_extension.COMMON_NVCC_FLAGS))
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for inc in includes:
        cmd += ["-I", inc]
    return cmd


@dataclass
class KernelResources:
    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0


def parse_ptxas_report(text: str) -> list[KernelResources]:
    """The per-kernel lines of ``ptxas -v`` (registers, stack frame, spills)."""
    kernels: list[KernelResources] = []
    current: KernelResources | None = None
    properties_of: str | None = None  # the function a "Function properties" block describes
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if entry:
            current = KernelResources(entry.group(1), entry.group(2))
            kernels.append(current)
            continue
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:
            properties_of = properties.group(1)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if frame and properties_of == current.name:  # not a device function's own block
            current.stack, current.spill_stores = int(frame.group(1)), int(frame.group(2))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
    return kernels


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def report_resources(kernels: list[KernelResources], stack_worth_naming: int = 1024) -> str:
    """One summary line per architecture, plus each kernel that spills or has a large stack frame."""
    lines = []
    for arch in sorted({k.arch for k in kernels}):
        mine = [k for k in kernels if k.arch == arch]
        lines.append(f"  {arch}: {len(mine)} kernels, at most {max(k.registers for k in mine)} registers, "
                     f"largest stack frame {max(k.stack for k in mine)} B, "
                     f"{sum(k.spill_stores > 0 for k in mine)} spilling")
        heavy = [k for k in mine if k.spill_stores > 0 or k.stack >= stack_worth_naming]
        for k, name in zip(heavy, _demangle([k.name for k in heavy])):
            short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", ""))
            lines.append(f"    {short}: {k.registers} registers, {k.stack} B stack, {k.spill_stores} B spilled")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="SM architectures (default: 80 90)")
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    sources = sorted(glob.glob(os.path.join(csrc_dir(), "*_cuda.cu")))
    if not sources:
        print(f"no CUDA sources in {csrc_dir()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        shims = write_cpu_torch_shims(os.path.join(tmp, "shims"))
        for source in sources:
            out = os.path.join(tmp, os.path.basename(source) + ".o")
            print(f"nvcc {os.path.basename(source)} for sm_{', sm_'.join(args.arch)}", flush=True)
            command = nvcc_command(source, args.arch, out, (shims,)) + ["-Xptxas", "-v"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout + result.stderr, file=sys.stderr)
                return 1
            kernels = parse_ptxas_report(result.stdout + result.stderr)
            if kernels:
                print(report_resources(kernels), flush=True)
    print(f"compiled {len(sources)} CUDA source(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
