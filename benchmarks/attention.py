"""Paged decode attention: our kernel (`kernels: native`) against the torch path it replaces (`_blockwise_decode`,
the fused engine's decode attention without the extension), side by side in one process, calls alternating.

    python benchmarks/attention.py --threads 2

Each call runs cold: a read of `--stream-mb` (300 MB) comes before it, so the keys and values come from memory as
in a decode step, not from the caches. It must be several times the last-level cache: the same pool read again
after a 70 MB stream (the earlier default, which the README's earlier tables used) is partly still in
this EPYC's 32 MB L3, which keeps lines read more than once against a single scan: 282-303 us a call there against
358-381 us for the layers of a real batch-16 step read in turn or after 300 MB. Shapes: SmolLM2-135M (9 query /
3 K/V heads of 64), Qwen2.5-Coder-0.5B (14 / 2 of 64) and 1.5B (12 / 2 of 128), in float32 and bfloat16 pools of
16-token blocks in random order, at batch 1 and 8. The last column is the rate the kernel reads keys and values.

    python benchmarks/attention.py --isas avx512-vnni avx512-bf16 --dtypes bfloat16 --batches 1 16

compares two of the kernels' instruction sets instead (`use_isa` switched before each call), the second against
the first: on a CPU with AVX512-BF16, a bfloat16 pool's dot products in bfloat16 against widening it to float32.

    python benchmarks/attention.py --pool int8 --dtypes bfloat16 --batches 1 16 --lens 512

reads an int8 pool (`kv_cache_dtype: int8`: a float32 scale per token and head beside the rows) instead of one in
the query's dtype; the rate then counts the scales' bytes too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from infer_recipes import kernels
from infer_recipes.layers.attention import _blockwise_decode, quantize_kv

SHAPES = {"smollm2": (9, 3, 64), "qwen0.5b": (14, 2, 64), "qwen1.5b": (12, 2, 128)}  # H, H_kv, D
BLOCK = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--stream-mb", type=int, default=300, help="MB read before each call, to evict the caches")
    p.add_argument("--isas", nargs=2, metavar=("A", "B"), help="two instruction sets of ours instead of torch and ours")
    p.add_argument("--pool", choices=["auto", "int8"], default="auto",
                   help="the pool's dtype: the query's (auto) or int8 with its scales")
    args = p.parse_args()
    if not kernels.available():
        raise SystemExit(f"the native kernels do not run here: {kernels.reason()}")
    ext = kernels.native()
    missing = [name for name in args.isas or [] if name not in ext.isas()]
    if missing:
        raise SystemExit(f"--isas: {', '.join(missing)} does not run here; this CPU runs {', '.join(ext.isas())}")
    names = args.isas or ["torch", "native"]
    torch.set_num_threads(args.threads)
    stream = torch.randn(args.stream_mb << 18)  # float32: 4 bytes each
    print(f"torch {torch.__version__}, {args.threads} threads, kernels {kernels.isa()}, median of {args.runs} "
          f"alternating calls, each after a {args.stream_mb} MB stream\n")
    print(f"| model | dtype | batch | keys | {names[0]} us | {names[1]} us | speedup | {names[1]} GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (H, Hkv, D) in SHAPES.items():
        for dtype in (getattr(torch, d) for d in args.dtypes):
            for B in args.batches:
                for L in args.lens:
                    nb = -(-L // BLOCK)
                    if args.pool == "int8":
                        (k, ks), (v, vs) = (quantize_kv(torch.randn(nb * B, Hkv, BLOCK, D)) for _ in range(2))
                    else:
                        k, v = (torch.randn(nb * B, Hkv, BLOCK, D).to(dtype) for _ in range(2))
                        ks = vs = None
                    blocks = torch.randperm(nb * B)
                    lens = torch.full((B,), L)
                    mask = (torch.arange(nb * BLOCK)[None] < lens[:, None]).view(B, 1, 1, -1)
                    q = torch.randn(B, H, D).to(dtype)
                    out = torch.empty_like(q)
                    calls = {"torch": lambda: _blockwise_decode(q, k, v, blocks, mask, D ** -0.5, ks, vs),
                             "native": lambda: ext.decode_attention(q, k, v, blocks, lens, D ** -0.5, out, ks, vs)}
                    if args.isas:  # the same call, the instruction set switched before it
                        calls = dict.fromkeys(args.isas, calls["native"])
                    times = {n: [] for n in calls}
                    for _ in range(args.runs):
                        for n, f in calls.items():
                            if args.isas:
                                ext.use_isa(n)
                            stream.sum()
                            start = time.perf_counter()
                            f()
                            times[n].append(time.perf_counter() - start)
                    t, nt = (statistics.median(times[n]) for n in names)
                    row_bytes = k.element_size() * D + (4 if ks is not None else 0)
                    gbs = 2 * row_bytes * B * L * Hkv / nt / 1e9
                    kind = ("int8 pool, " if ks is not None else "") + str(dtype)[6:]
                    print(f"| {name} | {kind} | {B} | {L} | {t * 1e6:.0f} | {nt * 1e6:.0f} | {t / nt:.2f}x "
                          f"| {gbs:.1f} |", flush=True)


    ext.use_isa(ext.isas()[0])


if __name__ == "__main__":
    main()
