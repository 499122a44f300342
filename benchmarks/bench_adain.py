"""AdaIN speed: fused back-end vs the reference twin.

As a script: ``python benchmarks/bench_adain.py [--backend cpu] [--repeats 20]`` prints the median time of the
forward and of forward+backward at the decoder's plane sizes, and the reference/fused ratio.
Under pytest (``--benchmark-enable``) a small case runs through pytest-benchmark.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from council_fast.ops.adain import adain

SHAPES = [(1, 256, 64, 64), (1, 64, 256, 256)]


def _inputs(shape, device, dtype, requires_grad):
    b, c = shape[:2]
    tensors = [torch.randn(shape, device=device, dtype=dtype), torch.randn(b, c, device=device),
               torch.randn(b, c, device=device), torch.randn(shape, device=device, dtype=dtype)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _case(shape, backend, device, dtype, backward):
    x, w, b, r = _inputs(shape, device, dtype, backward)
    dy = torch.randn_like(x)

    def run():
        with torch.set_grad_enabled(backward):
            y = adain(x, w, b, r, relu=True, backend=backend)
            if backward:
                torch.autograd.grad(y, (x, w, b, r), dy)

    return run


def compare(shape, backend, device="cpu", dtype=torch.float32, repeats=20, backward=False):
    """Median seconds of (reference, fused); the two alternate so that both see the same machine load."""
    runs = [_case(shape, name, device, dtype, backward) for name in ("reference", backend)]
    for run in runs:
        run()  # warm-up (JIT builds, caches)
    times = [[], []]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            times[i].append(_timed(run, device))
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch threads: {torch.get_num_threads()}, dtype {args.dtype}, relu + residual, median of {args.repeats}")
    for shape in SHAPES:
        for backward in (False, True):
            ref, fused = compare(shape, args.backend, args.device, dtype, args.repeats, backward)
            print(f"{str(shape):>20} {'fwd+bwd' if backward else 'fwd':>8}: reference {ref * 1e3:8.2f} ms, "
                  f"{args.backend} {fused * 1e3:8.2f} ms, speed-up x{ref / fused:.2f}")
    return 0


def test_bench_adain_cpu(benchmark):
    x, w, b, r = _inputs((1, 64, 32, 32), "cpu", torch.float32, False)
    benchmark(lambda: adain(x, w, b, r, relu=True, backend="cpu"))


if __name__ == "__main__":
    raise SystemExit(main())
