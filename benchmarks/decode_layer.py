"""A decode step's layers in one call each (`decode_layer`, our kernels' fused layer) against the same kernels
called part by part from the Python modules, in one process on one loaded model, rounds alternating.

    python benchmarks/decode_layer.py --model smollm2-135m-instruct --quantization int4 --dtype bfloat16 --batch 1

Both ways run the same kernels in the same order, so the greedy tokens are the same (printed); the difference is
the ~10 Python module calls and dispatches per layer and step. Decode tokens/s over all sequences, the time of a
one-token request (the prompts' blocks cached after the first round) subtracted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from infer_recipes import LLM
from infer_recipes.config import SamplingParams
from infer_recipes.models.llama import LlamaDecoderLayer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantization", default="int4")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              progress=False, max_batch_size=max(16, args.batch))
    layers = [m for m in llm.model.modules() if isinstance(m, LlamaDecoderLayer)]
    steps = [layer.native_step for layer in layers]
    if not all(steps):
        raise SystemExit("this configuration's layers do not run in one call (not every part on our kernels)")
    prompts = [list(range(1000 + 7 * b, 1000 + 7 * b + args.input_len)) for b in range(args.batch)]
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def rate(whole: bool) -> tuple[float, list[list[int]]]:
        for layer, step in zip(layers, steps):
            layer.native_step = step if whole else None
        start = time.perf_counter()
        llm.generate(prompts, one)
        middle = time.perf_counter()
        outs = llm.generate(prompts, full)
        end = time.perf_counter()
        return args.batch * (args.output_len - 1) / ((end - middle) - (middle - start)), [o.token_ids for o in outs]

    rate(True), rate(False)  # warm-up
    rates, tokens = {True: [], False: []}, {}
    for r in range(args.rounds):
        for whole in ((True, False) if r % 2 == 0 else (False, True)):
            value, tokens[whole] = rate(whole)
            rates[whole].append(value)
    a, b = statistics.median(rates[True]), statistics.median(rates[False])
    same = sum(x == y for x, y in zip(tokens[True], tokens[False]))
    print(f"{args.model} {args.quantization} {args.dtype} (KV {args.kv_cache_dtype}), batch {args.batch}, "
          f"{args.input_len} + {args.output_len}, {args.threads} threads")
    print(f"decode tok/s: one call per layer {a:.1f}, part by part {b:.1f} (medians of {args.rounds}); ratio per "
          f"round {', '.join(f'{x / y:.2f}x' for x, y in zip(rates[True], rates[False]))}; greedy outputs identical "
          f"{same}/{args.batch}")


if __name__ == "__main__":
    main()
