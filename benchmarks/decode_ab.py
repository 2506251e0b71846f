"""Two ways of running one loaded model's decode, side by side in one process, rounds alternating, so the machine's
drift stays out of the ratio. Decode tokens/s over all sequences (the time of a one-token request subtracted: the
prompts' blocks are cached after the first round, so that is the prefill), the ratio of each round's pair and
their median (the figure to quote: the machine's drift moves both of a pair alike), and how many greedy outputs
agree.

    python benchmarks/decode_ab.py layer --model smollm2-135m-instruct --quantization int4 --dtype bfloat16 --batch 1
    git worktree add /tmp/old HEAD~1
    python benchmarks/decode_ab.py build /tmp/old --batch 8 --input-len 512 --output-len 64 --rounds 4

`layer`: each layer of a decode step in one call into our kernels (`decode_layer`) against the same kernels called
part by part from the Python modules. Same kernels in the same order, so the same tokens; the difference is the ~10
module calls and dispatches per layer and step.

`build`: this checkout's kernels against another checkout's build (OLD, e.g. a `git worktree` of the commit before
a kernel change), both extensions loaded in this process and `kernels.native()` switched between them. Both read
the same packed weights, so only the kernels differ; the signatures the engine calls must be the same in both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def native_of(tree: str):
    """The extension built from checkout `tree`'s sources (each build is cached under its own key)."""
    sys.path.insert(0, tree)
    try:
        for name in [m for m in sys.modules if m.split(".")[0] == "infer_recipes"]:
            del sys.modules[name]
        from infer_recipes import kernels

        return kernels.native()
    finally:
        sys.path.remove(tree)
        for name in [m for m in sys.modules if m.split(".")[0] == "infer_recipes"]:
            del sys.modules[name]


def layer_arms(llm) -> dict:
    """{name: switch} for one call per layer against part by part."""
    from infer_recipes.models.llama import LlamaDecoderLayer

    layers = [m for m in llm.model.modules() if isinstance(m, LlamaDecoderLayer)]
    steps = [layer.native_step for layer in layers]
    if not all(steps):
        raise SystemExit("this configuration's layers do not run in one call (not every part on our kernels)")

    def switch(whole: bool):
        def apply():
            for layer, step in zip(layers, steps):
                layer.native_step = step if whole else None
        return apply

    return {"one call per layer": switch(True), "part by part": switch(False)}


def build_arms(old) -> dict:
    """{name: switch} for this checkout's kernels against `old` (an extension module)."""
    from infer_recipes import kernels

    new = kernels.native()
    if old is None or new is None:
        raise SystemExit(f"a build does not run here: {kernels.reason()}")
    if old.__name__ == new.__name__:
        raise SystemExit("both checkouts have the same kernel sources")

    def switch(module):
        def apply():
            kernels.native = lambda: module  # every caller asks kernels.native() per call
        return apply

    return {"new": switch(new), "old": switch(old)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = p.add_subparsers(dest="mode", required=True)
    modes.add_parser("layer", help="one call per layer against part by part")
    build = modes.add_parser("build", help="this checkout's kernels against another checkout's")
    build.add_argument("old", help="a checkout whose kernels to compare against (its infer_recipes/ is imported)")
    for sub in modes.choices.values():
        sub.add_argument("--model", default="smollm2-135m-instruct")
        sub.add_argument("--quantization", default="int4")
        sub.add_argument("--dtype", default="bfloat16")
        sub.add_argument("--kv-cache-dtype", default="auto")
        sub.add_argument("--batch", type=int, default=1)
        sub.add_argument("--input-len", type=int, default=512)
        sub.add_argument("--output-len", type=int, default=128)
        sub.add_argument("--rounds", type=int, default=6)
        sub.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    old = native_of(str(Path(args.old).resolve())) if args.mode == "build" else None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, whatever is installed
    import torch

    from infer_recipes import LLM
    from infer_recipes.config import SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              progress=False, max_batch_size=max(16, args.batch))
    arms = layer_arms(llm) if args.mode == "layer" else build_arms(old)
    prompts = [list(range(1000 + 7 * b, 1000 + 7 * b + args.input_len)) for b in range(args.batch)]
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def rate(apply) -> tuple[float, list[list[int]]]:
        apply()
        start = time.perf_counter()
        llm.generate(prompts, one)
        middle = time.perf_counter()
        outs = llm.generate(prompts, full)
        end = time.perf_counter()
        return args.batch * (args.output_len - 1) / ((end - middle) - (middle - start)), [o.token_ids for o in outs]

    for apply in arms.values():
        rate(apply)  # warm-up
    names = list(arms)
    rates, tokens = {name: [] for name in names}, {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            value, tokens[name] = rate(arms[name])
            rates[name].append(value)
    a, b = names
    same = sum(x == y for x, y in zip(tokens[a], tokens[b]))
    print(f"{args.model} {args.quantization} {args.dtype} (KV {args.kv_cache_dtype}), batch {args.batch}, "
          f"{args.input_len} + {args.output_len}, {args.threads} threads")
    ratios = [x / y for x, y in zip(rates[a], rates[b])]
    print(f"decode tok/s: {a} {statistics.median(rates[a]):.1f}, {b} {statistics.median(rates[b]):.1f} (medians of "
          f"{args.rounds}); {a} / {b} per round {', '.join(f'{r:.2f}x' for r in ratios)}, median "
          f"{statistics.median(ratios):.2f}x; greedy outputs identical {same}/{args.batch}")


if __name__ == "__main__":
    main()
