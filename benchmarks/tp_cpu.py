"""Tensor parallel 2 against one device, side by side in one torchrun world (issue 7's CPU check).

    torchrun --nproc-per-node 2 benchmarks/tp_cpu.py [--model synthetic:llama-3.2-1b] [--batch 1 8] ...

Rank 0 holds both engines: TP=1 (rank 0 alone, every core of the machine while it runs) and TP=2 (rank 0 and rank
1, cores split between them, as torchrun's ranks share one machine); runs alternate TP=1, TP=2, ... per cell and the
medians and their ratio are printed. Rank 1 only follows rank 0's TP=2 steps. The planner's estimate for the same
layouts, calibrated with this machine's measured bandwidth, is printed beside them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from infer_recipes import LLM, SamplingParams, distributed
from infer_recipes.loading import resolve_model_source
from infer_recipes.loading.weights import read_config


def run(llm: LLM, batch: int, input_len: int, output_len: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    prompts = [[(17 * b + 31 * i) % 5000 + 100 for i in range(input_len)] for b in range(batch)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    ttft = max(o.metrics["ttft_s"] for o in outs)
    e2e = max(o.metrics["e2e_s"] for o in outs)
    return {"ttft": ttft, "tpot": (e2e - ttft) / (output_len - 1), "e2e": e2e}


def allreduce_us(hidden: int, dtype: torch.dtype) -> float:
    """Median microseconds of one all-reduce of a decode step's activation [1, 1, hidden] over the world."""
    import time

    import torch.distributed as dist

    x, times = torch.ones(1, 1, hidden, dtype=dtype), []
    for i in range(220):
        start = time.perf_counter()
        dist.all_reduce(x)
        if i >= 20:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:llama-3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    world = distributed.context("cpu")  # every rank, before the engines: the link's own cost first
    hidden = read_config(resolve_model_source(args.model)).hidden_size
    link_us = allreduce_us(hidden, getattr(torch, args.dtype))
    options = dict(device="cpu", dtype=args.dtype, max_model_len=args.input_len + args.output_len + 16,
                   max_batch_size=max(args.batch), progress=False)
    tp2 = LLM(args.model, tensor_parallel_size=2, **options)  # ranks other than 0 stay inside this call
    per_rank = torch.get_num_threads()
    tp1 = LLM(args.model, **options)
    print(f"{args.model} {args.dtype}, {cores} cores: TP=1 with {cores} threads, TP=2 with {per_rank} per rank "
          f"({world.world_size} ranks, gloo); one all-reduce of {hidden} {args.dtype} values: {link_us:.0f} us "
          f"(median of 200)", file=sys.stderr)
    print("| batch | in/out | TP=1 TTFT s | TP=2 TTFT s | TP=1 TPOT ms | TP=2 TPOT ms | TP=2 / TP=1 decode tok/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batch:
        for llm, threads in ((tp1, cores), (tp2, per_rank)):
            run(llm, batch, 16, 4, threads)  # warm-up
        results = {1: [], 2: []}
        for _ in range(args.runs):
            results[1].append(run(tp1, batch, args.input_len, args.output_len, cores))
            results[2].append(run(tp2, batch, args.input_len, args.output_len, per_rank))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("ttft", "tpot")} for k, v in results.items()}
        print(f"| {batch} | {args.input_len}/{args.output_len} | {med[1]['ttft']:.3f} | {med[2]['ttft']:.3f} | "
              f"{med[1]['tpot'] * 1e3:.1f} | {med[2]['tpot'] * 1e3:.1f} | {med[1]['tpot'] / med[2]['tpot']:.2f}x |")
        sys.stdout.flush()
    torch.set_num_threads(per_rank)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
