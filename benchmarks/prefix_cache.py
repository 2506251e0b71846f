"""Prefix caching on SQuAD QA requests (the `eval squad` prompt: instruction + 3 demonstrations + context +
question): time to first token one request at a time, and questions/s at batch 16, with and without the cache,
both engines in one process, alternating. Every measurement takes questions neither engine has seen (the file's
next ones, in order: consecutive questions often share a paragraph, as real QA traffic does), after one warm-up
question that caches the instruction and demonstrations.

    python benchmarks/prefix_cache.py --data ../shared/data/squad/dev-v2.0.part-a.json --questions 40 --runs 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from infer_recipes import LLM, SamplingParams
from infer_recipes.eval.qa import answer_questions, build_prompt, load_qa


def ttfts(llm: LLM, prompts: list[list[int]]) -> list[float]:
    """Each prompt alone (batch 1), one token: its time to first token."""
    out = []
    for p in prompts:
        start = time.perf_counter()
        llm.generate(p, SamplingParams(max_tokens=1, temperature=0.0))
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    examples = load_qa(args.data, 1 + 2 * args.runs * args.questions)
    engines = {"cached": LLM(args.model, progress=False, prefix_caching=True),
               "uncached": LLM(args.model, progress=False, prefix_caching=False)}
    prompts = [build_prompt(engines["cached"].tokenizer, ex, "en", 3) for ex in examples]
    ttfts(engines["cached"], prompts[:1])  # warm: the instruction and demonstrations are cached from here on
    medians = {name: [] for name in engines}
    rates = {name: [] for name in engines}
    q = args.questions
    for r in range(args.runs):
        first = 1 + 2 * r * q
        for name, llm in engines.items():
            medians[name].append(statistics.median(ttfts(llm, prompts[first:first + q])))
        for name, llm in engines.items():
            _, seconds = answer_questions(llm, examples[first + q:first + 2 * q], "en", 3, 16, 32, progress=False)
            rates[name].append(q / seconds)
    stats = engines["cached"].engine.stats()
    print(f"{args.questions} SQuAD questions, 3 shots, prompts of {statistics.median(map(len, prompts)):.0f} tokens "
          f"(median), {args.runs} alternating runs, {args.threads} threads")
    print("| engine | TTFT median s (batch 1) | questions/s (batch 16) |")
    print("| --- | ---: | ---: |")
    for name in engines:
        print(f"| {name} | {statistics.median(medians[name]):.3f} | {statistics.median(rates[name]):.2f} |")
    ratio = statistics.median(medians["uncached"]) / statistics.median(medians["cached"])
    speed = statistics.median(rates["cached"]) / statistics.median(rates["uncached"])
    print(f"TTFT {ratio:.2f}x faster with the cache; questions/s {speed:.2f}x; hit rate "
          f"{stats['prefix_cache_hits'] / stats['prefix_cache_queries']:.1%} of prompt tokens")


if __name__ == "__main__":
    main()
