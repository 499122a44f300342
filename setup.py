"""Build script. Everything declarative lives in pyproject.toml.

Two jobs here:
* ship the kernel sources (top-level csrc/) inside the package, so an installed wheel can
  JIT-build them on first use;
* optionally build the C++/CUDA extension ahead of time. That needs torch at build time, so it
  runs only with ``COUNCIL_FAST_BUILD_EXT=1 pip install --no-build-isolation .``; any failure is
  reported and the install goes on as a pure-PyTorch package (the kernels then JIT-build or fall back).
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "council_fast", "csrc")
        os.makedirs(target, exist_ok=True)
        for src in glob.glob(os.path.join(CSRC, "*")):
            if os.path.isfile(src):
                shutil.copy2(src, target)


def optional_extensions():
    if os.environ.get("COUNCIL_FAST_BUILD_EXT") != "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("council-fast: torch is not importable at build time; skipping the ahead-of-time "
              "extension build (kernels will be JIT-built on first use)", file=sys.stderr)
        return [], {}
    module = [os.path.join("csrc", "module.cpp")]  # the pybind11 module; kernels register as torch ops
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*_cpu.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*_cuda.cu")) + glob.glob(os.path.join("csrc", "*_cuda.cpp")))
    exts = []
    if cpu_sources:
        exts.append(cpp_extension.CppExtension(
            "council_fast._C_cpu", module + [os.path.join("csrc", "schemas.cpp")] + cpu_sources,  # schemas: CPU only
            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))
    if cuda_sources and cpp_extension.CUDA_HOME:
        exts.append(cpp_extension.CUDAExtension(
            "council_fast._C_cuda", module + cuda_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))  # no fast-math: see ops/extension.py
    return exts, {"build_ext": _TolerantBuildExt.wrap(cpp_extension.BuildExtension)}


class _TolerantBuildExt:
    @staticmethod
    def wrap(base):
        class Tolerant(base):
            def run(self):
                try:
                    super().run()
                except Exception as e:  # noqa: BLE001 - the package works without the extension
                    print(f"council-fast: extension build failed ({e}); installing without it "
                          "(kernels will be JIT-built on first use or fall back)", file=sys.stderr)
        return Tolerant


ext_modules, extra_cmds = optional_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithKernelSources, **extra_cmds})
