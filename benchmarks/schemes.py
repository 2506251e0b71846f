"""One row per precision scheme on one model: perplexity, agreement with fp32 all-off, weight bytes, and batch-1
decode speed, all in one process.

    python benchmarks/schemes.py --data ../shared/data/wikitext2/wiki.valid.tokens --ppl-tokens 8192
    python benchmarks/schemes.py --model qwen2.5-coder-1.5b-instruct --data ../shared/data/wikitext2/wiki.valid.tokens \
        --ppl-tokens 4096 --agree-tokens 512 --schemes fp32 gguf int8 "int4 g32" bf16
"""
from __future__ import annotations

import argparse
import time

import torch

from infer_recipes import LLM, SamplingParams
from infer_recipes.eval.perplexity import agreement, perplexity

SCHEMES = [("fp32", dict()), ("bf16", dict(dtype="bfloat16")), ("int8", dict(quantization="int8")),
           ("int8-minmax", dict(quantization="int8-minmax")), ("w8a8", dict(quantization="w8a8")),
           ("int4 g32", dict(quantization="int4")), ("int4-w8a8", dict(quantization="int4-w8a8")),
           ("gguf", dict(quantization="gguf"))]


def decode_tps(llm: LLM, prompt: list[int], new: int) -> float:
    p = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    llm.generate(prompt, p(2))
    t1 = time.perf_counter(); llm.generate(prompt, p(1)); t1 = time.perf_counter() - t1
    tn = time.perf_counter(); llm.generate(prompt, p(new)); tn = time.perf_counter() - tn
    return (new - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--agree-tokens", type=int, default=1024)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--schemes", nargs="+", default=[name for name, _ in SCHEMES], help="rows (the first is the base)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ref = LLM(args.model, device="cpu", kv_cache=False, fusion=False, progress=False)
    prompt = ref.tokenizer.encode("The history of the city begins in antiquity. " * 60)[:512]
    print("| scheme | perplexity | vs fp32 | top-1 agreement | mean KL | weight MB | decode tok/s (b=1, 512+128) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for name, kw in ((n, kw) for n, kw in SCHEMES if n in args.schemes):
        llm = LLM(args.model, device="cpu", progress=False, **kw)
        ppl = perplexity(llm, args.data, args.ppl_tokens, progress=False)["perplexity"]
        base = base or ppl
        agr = agreement(llm, ref, args.data, args.agree_tokens, progress=False)
        tps = decode_tps(llm, prompt, 128)
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % | {agr['top1_agreement']:.3f} | "
              f"{agr['mean_kl']:.4f} | {llm.weight_bytes() / 1e6:.0f} | {tps:.1f} |", flush=True)
        del llm


if __name__ == "__main__":
    main()
