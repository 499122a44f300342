"""Compile the Triton kernels for a GPU, without one.

``python -m council_fast.ops.triton_check --arch 80 90`` runs the fused generators on CPU tensors
(conversion in fp32, bf16 and fp16; training passes in fp32 and bf16 autocast) with every Triton
launch recorded instead of run, then compiles each distinct launch (kernel, argument types,
constexprs, warps) for each architecture with Triton's own compiler and ptxas, as the first launch
on that GPU would. It prints the shared memory, registers and stack (spills) of every compiled
kernel and exits non-zero on a compile error or a kernel whose shared memory exceeds the GPU's
limit. The Triton interpreter, which runs these kernels in the tests, accepts programs that a GPU
compile rejects (shared memory over the limit, for one), hence this check.

Each launch is specialised as Triton specialises a real one (integers equal to 1 become constants,
pointers and integers divisible by 16 are marked so), through Triton's own functions where this
version has them. Register, stack and shared-memory figures can still differ a little from the GPU
machine's Triton (3.6).
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

# Shared memory a block may use (opt-in maximum), per architecture (CUDA programming guide).
SHARED_LIMIT = {"70": 96 * 1024, "75": 64 * 1024, "80": 163 * 1024, "86": 99 * 1024, "87": 163 * 1024,
                "89": 99 * 1024, "90": 227 * 1024, "100": 227 * 1024, "120": 99 * 1024}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@dataclass
class Launch:
    kernel: object  # triton.runtime.jit.JITFunction
    signature: dict
    constexprs: dict
    options: dict
    divisible: tuple = ()  # parameter indices a real launch marks as divisible by 16
    count: int = 1

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        return (id(self.kernel), tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted(self.options.items())), self.divisible)

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items()
                           if v is not None and self.kernel.params[self.kernel.arg_names.index(k)].is_constexpr)
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        return f"{self.name}[{consts}; {'/'.join(dtypes)}; warps={self.options.get('num_warps', 4)}]"


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported Triton argument {type(value).__name__}")


def _specialise(value, specialise: bool) -> tuple[str, bool]:
    """(type, divisible by 16) as a real launch specialises an argument: Triton's own rules where this
    Triton exposes them (an int equal to 1 becomes a constexpr), else the plain type."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
        kind, spec = native_specialize_impl(BaseBackend, value, False, specialise, True)
        return kind, spec == "D"
    except (ImportError, TypeError, AttributeError):
        return _arg_type(value), False


def describe_launch(kernel, args, kwargs) -> Launch:
    """The compile-relevant facts of ``kernel[grid](*args, **kwargs)``; the same argument errors as a launch."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    names = [p.name for p in kernel.params]
    if len(args) > len(names):
        raise TypeError(f"{kernel.fn.__name__}: {len(args)} arguments for {len(names)} parameters")
    unknown = sorted(set(kwargs) - set(names[len(args):]))
    if unknown:
        raise KeyError(f"{kernel.fn.__name__}: unknown keyword arguments {unknown}")
    values = dict(zip(names, args), **kwargs)
    signature, constexprs, divisible = {}, {}, []
    for index, param in enumerate(kernel.params):
        if param.name not in values and not param.has_default:
            raise TypeError(f"{kernel.fn.__name__}: missing argument {param.name!r}")
        value = values.get(param.name, param.default if param.has_default else None)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        kind, aligned = _specialise(value, not getattr(param, "do_not_specialize", False))
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif aligned:
            divisible.append(index)
    return Launch(kernel, signature, constexprs, options, tuple(divisible))


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


def _shape_only_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d's output shape, dtype and autograd links at almost no cost: while launches are only
    recorded, no value matters, and a real fp16 convolution on a CPU takes minutes."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    kh, kw = weight.shape[2:]
    height = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    links = x.flatten()[:1].sum() * 0 + weight.flatten()[:1].sum() * 0
    if bias is not None:
        links = links + bias.flatten()[:1].sum() * 0
    dtype = x.dtype  # as autocast would run the real conv: in its dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    out = torch.rand(x.shape[0], weight.shape[0], height, width, dtype=dtype, device=x.device)
    return out + links.to(dtype)


def _random_like(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def record_engine_launches(size: int = 256, batch: int = 1, train_size: int = 128, train_batch: int = 3,
                           council: int = 4, config: str = "selfie2anime") -> dict:
    """The launches of conversion (FastGenerator, ``size``; fp32, bf16, fp16 weights and activations, as
    `convert` runs it) and of a training step's generator passes (the stacked council, ``train_size``;
    fp32 and bf16 autocast), forward and backward."""
    from ..config import packaged_config
    from ..lowering import FastGenerator, StackedAdaINGen
    from ..reference.networks import AdaINGen

    params = packaged_config(config)["gen"]
    restore = _route_triton_to_cpu()
    real_conv2d = torch.nn.functional.conv2d
    torch.nn.functional.conv2d = _shape_only_conv2d
    torch.manual_seed(0)
    try:
        with Recorder() as recorder:
            ref = AdaINGen(3, params)
            _random_like(ref)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):  # convert's precisions
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
        torch.nn.functional.conv2d = real_conv2d
        restore()
    return recorder.launches


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes, folder: str) -> dict:
    """Registers and stack frame (where spills go) of a compiled kernel (cuobjdump, shipped with Triton)."""
    path = os.path.join(folder, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK"):
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


def _divisibility_attrs(launch: Launch, target) -> dict | None:
    """The "divisible by 16" hints a real launch attaches (they change vectorisation, and so registers and
    shared memory), in this Triton's attribute format; None where it has no such format."""
    try:
        from triton.compiler.compiler import make_backend
        hint = make_backend(target).parse_attr("D")
    except (ImportError, AttributeError, TypeError):
        return None
    return {(index,): hint for index in launch.divisible}


def compile_launch(launch: Launch, arch: str, folder: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.time()
    try:
        target = GPUTarget("cuda", int(arch), 32)
        source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs,
                           attrs=_divisibility_attrs(launch, target))
        kernel = triton.compile(source, target=target, options=dict(launch.options))
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
            limit = SHARED_LIMIT[arch]
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
    parser.add_argument("--arch", nargs="+", default=["80", "90"], choices=sorted(SHARED_LIMIT, key=int),
                        metavar="ARCH", help=f"SM architectures, of {', '.join(sorted(SHARED_LIMIT, key=int))} "
                                             "(default: 80 90)")
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
