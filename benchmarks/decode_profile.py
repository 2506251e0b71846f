"""Where a continuous-batching decode step spends its time: torch.profiler over steady-state decode steps of
SmolLM2-135M-Instruct (16 sequences of 281 prompt tokens by default), top operators by self CPU time.

    python benchmarks/decode_profile.py --batch 16 --prompt-len 280 --steps 5
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from infer_recipes import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=280)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quantization", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    llm = LLM("smollm2-135m-instruct", device="cpu", progress=False, max_model_len=2048,
              quantization=args.quantization)
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request([1 + i] + [100] * args.prompt_len, params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()  # every prompt prefilled: what follows is decode only
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    with profile() as prof:
        for _ in range(args.steps):
            engine.step()
    elapsed = (time.perf_counter() - start) / args.steps
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"batch {args.batch}, ~{args.prompt_len} context: {elapsed * 1000:.1f} ms per step under the profiler")
    print("| op | self ms per step | share |\n| --- | ---: | ---: |")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1000 / args.steps:.1f} | {e.self_cpu_time_total / total:.0%} |")
    for i in list(engine.requests):
        engine.abort_request(i)


if __name__ == "__main__":
    main()
