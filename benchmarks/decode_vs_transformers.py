"""Batch-1 decode speed of our engine (fusion and quantization off, KV cache on, fp32; `--fusion` turns fusion
on) against transformers eager fp32.

Both run the same SmolLM2-135M-Instruct GGUF weights in one process, alternating, so machine drift hits both.
TTFT = time of a 1-token generation; decode tokens/s = (new_tokens - 1) / (t(new_tokens) - t(1)).

    python benchmarks/decode_vs_transformers.py --prompt-len 512 --new-tokens 128 --runs 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from infer_recipes import LLM, SamplingParams
from infer_recipes.loading.source import SMOLLM2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fusion", action="store_true", help="measure our fused path instead of the textbook one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = SMOLLM2.path()
    ours = LLM("smollm2-135m-instruct", device="cpu", dtype="float32", fusion=args.fusion, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM2.filename,
                                              dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. " * 200
    prompt = ours.tokenizer.encode(text)[: args.prompt_len]

    def run_ours(n: int) -> float:
        t = time.perf_counter()
        out = ours.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        assert len(out.token_ids) == n
        return time.perf_counter() - t

    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def run_hf(n: int) -> float:
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - t

    results = {"ours": [], "transformers": []}
    run_ours(4), run_hf(4)  # warm-up
    for _ in range(args.runs):
        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            ttft, total = fn(1), fn(args.new_tokens)
            results[name].append((ttft, (args.new_tokens - 1) / (total - ttft)))
    print(f"SmolLM2-135M-Instruct fp32, batch 1, prompt {len(prompt)}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.runs}")
    print("| engine | TTFT s | decode tok/s |\n| --- | --- | --- |")
    med = {}
    for name, rows in results.items():
        med[name] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
        print(f"| {name} | {med[name][0]:.3f} | {med[name][1]:.1f} |")
    print(f"decode speed ratio ours/transformers: {med['ours'][1] / med['transformers'][1]:.2f}x; "
          f"TTFT ratio: {med['ours'][0] / med['transformers'][0]:.2f}x")


if __name__ == "__main__":
    main()
