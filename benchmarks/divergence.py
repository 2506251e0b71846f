"""Where a speculative greedy answer leaves the plain greedy answer, and by how much the model's two best logits
differed there (its full-sequence logits at that position). On a quantized model the gap is within bfloat16's
resolution: a step of 1 row and one of several round differently.

    python benchmarks/divergence.py --speculative-model qwen2.5-coder-0.5b-instruct
"""
from __future__ import annotations

import argparse

import torch
from speculative import workloads

from infer_recipes import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--speculative-model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = dict(quantization=args.quantization, progress=False, max_model_len=4096)
    alone = LLM(args.model, **opts)
    spec = LLM(args.model, speculative_model=args.speculative_model, **opts)
    loads = workloads(alone.tokenizer, args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    print("| kind | request | first different token | top-2 logit gap there (plain answer's prefix) |")
    print("| --- | ---: | ---: | ---: |")
    for kind in ("chat", "code"):
        for i, prompt in enumerate(loads[kind]):
            a = alone.generate(prompt, params)[0].token_ids
            b = spec.generate(prompt, params)[0].token_ids
            if a == b:
                print(f"| {kind} | {i} | same | - |")
                continue
            j = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
            top = alone.logits(prompt + a[:j])[-1].topk(2).values
            print(f"| {kind} | {i} | {j} | {float(top[0] - top[1]):.3f} |")


if __name__ == "__main__":
    main()
