"""What a step costs by the rows it computes: decoding sequences at position 512 with 1-4 tokens each (a decode,
or a decode verifying 1-3 guesses), median of 5 steps. Says how many guesses a step can verify before it costs
more than they yield (`speculative_max_rows`).

    python benchmarks/step_rows.py --model qwen2.5-coder-1.5b-instruct --quantization gguf
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from infer_recipes import LLM
from infer_recipes.runner import StepSeq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, quantization=args.quantization, progress=False, max_model_len=2048)
    runner = llm.runner
    tables = [list(range(40 * i, 40 * i + 40)) for i in range(4)]  # 40 blocks of 16 each: 640 positions
    for table in tables:  # a 512-token context per sequence
        runner.run("execute", [StepSeq(list(range(100, 612)), 0, table, True)])
    print(f"{args.model} ({args.quantization}), {args.threads} threads, context 512, median of {args.runs} steps")
    print("| sequences | tokens each | rows | step ms | vs 1 row |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    one = None
    for batch in (1, 2, 4):
        for tokens in (1, 2, 3, 4):
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                runner.run("execute", [StepSeq(list(range(7, 7 + tokens)), 512, tables[i], True, tokens - 1)
                                       for i in range(batch)])
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1000
            one = one or ms
            print(f"| {batch} | {tokens} | {batch * tokens} | {ms:.1f} | {ms / one:.2f}x |")


if __name__ == "__main__":
    main()
