"""Compile the Triton kernels for a GPU, without one.

``python -m council_fast.ops.triton_check --arch 80 90`` runs the fused generators on CPU tensors with
every Triton launch recorded instead of run, then compiles each distinct launch (kernel, argument
types, constexprs, warps) for each architecture with Triton's own compiler and ptxas, as the first
launch on that GPU would. It prints the shared memory, registers and spills of every compiled
kernel and exits non-zero on a compile error or a kernel whose shared memory exceeds the GPU's limit.
The Triton interpreter, which runs these kernels in the tests, accepts programs that a GPU compile
rejects (tl.dot on tiles under 16, shared memory over the limit), hence this check.

Not modelled: the integer specialisations a real launch adds (arguments equal to 1, divisibility
by 16) change the generated code a little, not whether it compiles.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

# Shared memory a block may use (opt-in maximum), per architecture.
SHARED_LIMIT = {"80": 163 * 1024, "86": 99 * 1024, "89": 99 * 1024, "90": 227 * 1024}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@dataclass
class Launch:
    kernel: object  # triton.runtime.jit.JITFunction
    signature: dict
    constexprs: dict
    options: dict
    count: int = 1

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        return (id(self.kernel), tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if v is not None)
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        return f"{self.name}[{consts}; {'/'.join(dtypes)}; warps={self.options.get('num_warps', 4)}]"


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported Triton argument {type(value).__name__}")


def describe_launch(kernel, args, kwargs) -> Launch:
    """The compile-relevant facts of ``kernel[grid](*args, **kwargs)``."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values.get(param.name, param.default if param.has_default else None)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    return Launch(kernel, signature, constexprs, options)


@dataclass
class Recorder:
    """Records Triton launches instead of running them (no GPU needed): ``with Recorder() as r: ...``."""
    launches: dict = field(default_factory=dict)

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._real_run = JITFunction.run
        recorder = self

        def record(kernel, *args, grid, warmup=False, **kwargs):
            launch = describe_launch(kernel, args, kwargs)
            seen = recorder.launches.setdefault(launch.key(), launch)
            if seen is not launch:
                seen.count += 1

        JITFunction.run = record
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._real_run
        return False


def _route_triton_to_cpu():
    """Lets the triton back-end be chosen for CPU tensors (its kernels are only recorded)."""
    from . import _backend

    real = _backend._why_unavailable

    def why_unavailable(name, device):
        return None if name == "triton" else real(name, device)

    _backend._why_unavailable = why_unavailable
    return lambda: setattr(_backend, "_why_unavailable", real)


def _random_like(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def record_engine_launches(size: int = 256, batch: int = 1, train_size: int = 128, train_batch: int = 3,
                           council: int = 4, config: str = "selfie2anime") -> dict:
    """The launches of conversion (FastGenerator, ``size``) and of a training step's generator passes
    (the stacked council, ``train_size``), forward and backward, fp32 and bf16."""
    from ..batched import StackedAdaINGen
    from ..config import packaged_config
    from ..fast_generator import FastGenerator
    from ..reference.networks import AdaINGen

    params = packaged_config(config)["gen"]
    restore = _route_triton_to_cpu()
    torch.manual_seed(0)
    try:
        with Recorder() as recorder:
            ref = AdaINGen(3, params)
            _random_like(ref)
            for dtype in (torch.float32, torch.bfloat16):
                fast = FastGenerator.from_reference(ref, backend="triton").to(dtype)
                x = torch.rand(batch, 3, size, size, dtype=dtype, requires_grad=True)
                z = torch.randn(batch, params["style_dim"], 1, 1, dtype=dtype)
                fast.translate(x, z).float().sum().backward()
            stacked = StackedAdaINGen(3, params, council, kernel_backend="triton")
            _random_like(stacked)
            for autocast in (False, True):
                x = torch.rand(train_batch, 3, train_size, train_size, requires_grad=True)
                z = torch.randn(train_batch, params["style_dim"], 1, 1)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = stacked.translate(x, z)
                out.float().sum().backward()
    finally:
        restore()
    return recorder.launches


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes, folder: str) -> dict:
    """Registers, stack frame (where spills go), shared and local bytes of a compiled kernel (cuobjdump,
    shipped with Triton)."""
    path = os.path.join(folder, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.search(rf"\b{key}:(\d+)", out)
        if found:
            usage[key] = int(found.group(1))
    return usage


@dataclass
class Compiled:
    launch: Launch
    arch: str
    seconds: float
    shared: int = 0
    usage: dict = field(default_factory=dict)
    error: str | None = None


def compile_launch(launch: Launch, arch: str, folder: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.time()
    try:
        source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", int(arch), 32), options=dict(launch.options))
    except Exception as e:  # noqa: BLE001 - every compiler failure is reported the same way
        return Compiled(launch, arch, time.time() - start, error=f"{type(e).__name__}: {str(e)[-1500:]}")
    usage = resource_usage(kernel.asm["cubin"], folder) if "cubin" in kernel.asm else {}
    return Compiled(launch, arch, time.time() - start, shared=int(kernel.metadata.shared), usage=usage)


def check(launches: dict, archs: list[str], out=sys.stdout) -> int:
    """Compiles every launch for every arch; returns the number of failures."""
    import tempfile

    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        for arch in archs:
            limit = SHARED_LIMIT.get(arch, 48 * 1024)
            for launch in launches.values():
                result = compile_launch(launch, arch, folder)
                if result.error:
                    failures += 1
                    print(f"sm_{arch} FAIL {launch.describe()}\n  {result.error}", file=out, flush=True)
                    continue
                too_big = result.shared > limit
                failures += too_big
                u = result.usage
                print(f"sm_{arch} {'FAIL' if too_big else 'ok  '} {launch.describe()}: shared {result.shared} B"
                      f"{f' > {limit}' if too_big else ''}, {u.get('REG', '?')} registers, "
                      f"{u.get('STACK', '?')} B stack (spills), {result.seconds:.1f} s, launched {launch.count}x",
                      file=out, flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="SM architectures (default: 80 90)")
    parser.add_argument("--size", type=int, default=256, help="conversion image size (default 256)")
    parser.add_argument("--train-size", type=int, default=128, help="training image size (default 128)")
    parser.add_argument("--config", default="selfie2anime", help="packaged config whose generator is used")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this check compiles the kernels for a GPU", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"triton cannot be imported: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default before 3.10 (the GPU machine's 3.6)
    start = time.time()
    launches = record_engine_launches(size=args.size, train_size=args.train_size, config=args.config)
    print(f"recorded {sum(x.count for x in launches.values())} launches of {len(launches)} distinct kernel "
          f"configurations in {time.time() - start:.0f} s (triton {triton.__version__})", flush=True)
    failures = check(launches, args.arch)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {len(launches) * len(args.arch)} "
          f"compiles, {time.time() - start:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
