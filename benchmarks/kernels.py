"""Our native quantized-linear kernels against torch's, per weight shape and row count, side by side in one
process: the median time of each (alternating calls), the ratio, and the bytes of weight each reads per second.

    python benchmarks/kernels.py --rows 1 4 8 16 --threads 2

The shapes are the linears of SmolLM2-135M and Qwen2.5-Coder-1.5B (fused qkv and gate-up, o, down, lm_head).
Weights are random: the kernels' speed does not depend on the values. Repeated calls find small weights in the
caches, so the rows of small shapes are faster than a decode step that streams the whole model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from infer_recipes import kernels
from infer_recipes.quantization.int4 import Int4Linear
from infer_recipes.quantization.int8 import Int8Linear
from infer_recipes.quantization.w8a8 import W8A8Linear

SHAPES = {  # name: (out_features, in_features)
    "smollm2 qkv": (960, 576), "smollm2 gate_up": (3072, 576), "smollm2 down": (576, 1536),
    "qwen1.5b qkv": (2048, 1536), "qwen1.5b o": (1536, 1536), "qwen1.5b gate_up": (17920, 1536),
    "qwen1.5b down": (1536, 8960), "qwen1.5b lm_head": (151936, 1536),
}


def timed(fns, runs: int) -> list[float]:
    """Median seconds per call of each function, calls alternating so drift hits all alike."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(kernels.reason())
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, median of {args.runs} alternating calls\n")
    print("| weight | shape | rows | int4 torch us | int4 native us | int4 speedup | int8 torch us | "
          "int8 native us | int8 speedup | w8a8 us | native int4 GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        t4, n4 = Int4Linear.from_float(w, None, 32, native=False), Int4Linear.from_float(w, None, 32, native=True)
        t8, n8 = Int8Linear(w, native=False), Int8Linear(w, native=True)
        w8 = W8A8Linear(w)
        del w
        for m in args.rows:
            x = torch.randn(m, k)
            a, b, c, d, e = timed([lambda: t4._matmul(x), lambda: n4._matmul(x), lambda: t8._matmul(x),
                                   lambda: n8._matmul(x), lambda: w8._matmul(x)], args.runs)
            print(f"| {name} | {n}x{k} | {m} | {a * 1e6:.0f} | {b * 1e6:.0f} | {a / b:.2f}x | {c * 1e6:.0f} | "
                  f"{d * 1e6:.0f} | {c / d:.2f}x | {e * 1e6:.0f} | {n4.weight_bytes() / b / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
