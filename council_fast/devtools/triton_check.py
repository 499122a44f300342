"""Compile the Triton kernels for a GPU, without one.

``python -m council_fast.devtools.triton_check --arch 80 90`` runs the fused generators on CPU tensors
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

from ..ops import decoder_tail
from .compile_check import parse_ptxas_report

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
    from ..ops import registry

    real = registry.why_unavailable

    def why_unavailable(name, device, op=None):
        return None if name == "triton" else real(name, device, op)

    registry.why_unavailable = why_unavailable
    return lambda: setattr(registry, "why_unavailable", real)


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


def _ptxas(target: str) -> str:
    """The ptxas this Triton compiles with for ``target`` (Triton 3.9 uses a newer one for its PTX)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(int(re.sub(r"\D", "", target))).path
    except (ImportError, AttributeError, TypeError):
        return _tool("ptxas")


def spill_stores(ptx: str, folder: str) -> int | None:
    """Bytes of spill stores, from ``ptxas -v`` on the kernel's PTX (as Triton runs ptxas: for the PTX's own
    target, FMA fusion on); None where ptxas says nothing."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    path = os.path.join(folder, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    cmd = [_ptxas(target.group(1) if target else "sm_90a"), "-v", "-lineinfo", f"--gpu-name={target.group(1) if target else 'sm_90a'}", path,
           "-o", os.path.join(folder, "ptxas.cubin")]
    report = subprocess.run(cmd, capture_output=True, text=True)
    kernels = parse_ptxas_report(report.stdout + report.stderr)
    return sum(k.spill_stores for k in kernels) if kernels else None


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
    if "ptx" in kernel.asm:
        usage["SPILL"] = spill_stores(kernel.asm["ptx"], folder)
    return Compiled(launch, arch, time.time() - start, shared=int(kernel.metadata.shared), usage=usage)


def check(launches: dict, archs: list[str], out=sys.stdout, max_spill: int | None = None) -> int:
    """Compiles every launch for every arch; returns the number of failures: compile errors, shared memory
    over the GPU's limit and, with ``max_spill``, kernels with more bytes of spill stores than that. Names
    every kernel that spills at the end."""
    import tempfile

    failures = 0
    spilling = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in archs:
            for launch in launches.values():
                result = compile_launch(launch, arch, folder)
                failures += _report(result, SHARED_LIMIT[arch], max_spill, out)
                if result.usage.get("SPILL"):
                    spilling.append(f"sm_{arch} {launch.describe()}: {result.usage['SPILL']} B spill stores, "
                                    f"{result.usage.get('STACK', '?')} B stack, {result.usage.get('REG', '?')} "
                                    "registers")
    import triton
    print(f"kernels that spill (triton {triton.__version__}): {len(spilling)}"
          + "".join(f"\n  SPILLS {line}" for line in spilling), file=out, flush=True)
    return failures


def _report(result: Compiled, limit: int, max_spill: int | None, out) -> int:
    """Prints one compile's line; returns 1 when it counts as a failure."""
    launch, arch = result.launch, result.arch
    if result.error:
        print(f"sm_{arch} FAIL {launch.describe()}\n  {result.error}", file=out, flush=True)
        return 1
    u = result.usage
    too_big = result.shared > limit
    spills = max_spill is not None and (u.get("SPILL") or 0) > max_spill
    floor = _shared_floor(launch)
    floor_wrong = floor is not None and floor > result.shared  # the op would refuse a kernel that fits
    print(f"sm_{arch} {'FAIL' if too_big or spills or floor_wrong else 'ok  '} {launch.describe()}: shared "
          f"{result.shared} B{f' > {limit}' if too_big else ''}"
          f"{f' < the floor the op assumes, {floor} B' if floor_wrong else ''}, {u.get('REG', '?')} registers, "
          f"{u.get('STACK', '?')} B stack, {u.get('SPILL', '?')} B spill stores"
          f"{f' > {max_spill}' if spills else ''}, {result.seconds:.1f} s, launched {launch.count}x",
          file=out, flush=True)
    return int(too_big or spills or floor_wrong)


def _shared_floor(launch: Launch) -> int | None:
    """The shared memory the decoder-tail backward assumes at least (it refuses, before compiling, a launch
    whose floor is over the GPU's limit): checked against each compile of that kernel."""
    if launch.kernel is not getattr(decoder_tail, "_backward_kernel", None):
        return None
    dtype = {v: k for k, v in _DTYPES.items()}[launch.signature["h_ptr"].lstrip("*")]
    return decoder_tail.backward_shared_floor(launch.constexprs["BLOCK_D"], dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], choices=sorted(SHARED_LIMIT, key=int),
                        metavar="ARCH", help=f"SM architectures, of {', '.join(sorted(SHARED_LIMIT, key=int))} "
                                             "(default: 80 90)")
    parser.add_argument("--size", type=int, default=256, help="conversion image size (default 256)")
    parser.add_argument("--train-size", type=int, default=128, help="training image size (default 128)")
    parser.add_argument("--config", default="selfie2anime", help="packaged config whose generator is used")
    parser.add_argument("--max-spill-bytes", type=int, default=None, metavar="N",
                        help="count a kernel with more than N bytes of spill stores (ptxas -v) as a failure "
                             "(CI: 1024; every spilling kernel is listed either way)")
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
    failures = check(launches, args.arch, max_spill=args.max_spill_bytes)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {len(launches) * len(args.arch)} "
          f"compiles, {time.time() - start:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
