"""torch.compile on vs off for the same engine settings (SmolLM2-135M-Instruct, fused, fp32 unless --quantization),
alternating in one process: TTFT and batch-1/batch-8 decode tokens/s, plus the compile time and graph count.

    python benchmarks/compile_gain.py --prompt-len 512 --new-tokens 64 --runs 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from targets import prompt_ids  # noqa: E402

from infer_recipes import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quantization", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engines = {name: LLM("smollm2-135m-instruct", device="cpu", compile=c, quantization=args.quantization,
                         progress=False) for name, c in (("eager", False), ("compiled", True))}
    c = engines["compiled"]
    print(f"compiled {c.compiles} graphs in {c.compile_seconds:.1f} s")
    prompt = prompt_ids(args.prompt_len)
    params = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    results = {(n, b): [] for n in engines for b in args.batch_sizes}
    before = c.compiles
    for _ in range(args.runs):
        for b in args.batch_sizes:
            for name, llm in engines.items():
                t = time.perf_counter(); llm.generate([prompt] * b, params(1)); ttft = time.perf_counter() - t
                t = time.perf_counter(); llm.generate([prompt] * b, params(args.new_tokens)); total = time.perf_counter() - t
                results[name, b].append((ttft, b * (args.new_tokens - 1) / (total - ttft)))
    print("| engine | batch | TTFT s | decode tok/s |\n| --- | --- | --- | --- |")
    for b in args.batch_sizes:
        for name in engines:
            rows = results[name, b]
            print(f"| {name} | {b} | {statistics.median(r[0] for r in rows):.3f} | "
                  f"{statistics.median(r[1] for r in rows):.1f} |")
    print(f"recompiles during the runs: {c.compiles - before} (graphs after warm-up: {c.compiles})")


if __name__ == "__main__":
    main()
