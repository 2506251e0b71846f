"""Two builds of our CPU kernels in one process: the whole decode of one loaded model, with `kernels.native()`
switched between the build of another checkout (OLD, e.g. a `git worktree` of the commit before a kernel change)
and this one's, rounds alternating. Both builds read the same packed weights, so only the kernels differ; one
process and alternating rounds keep the machine's drift out of the ratio.

    git worktree add /tmp/old HEAD~1
    python benchmarks/kernels_ab.py /tmp/old --model smollm2-135m-instruct --quantization int4 --dtype bfloat16 \\
        --batch 8 --input-len 512 --output-len 64 --rounds 4

Prints both decode rates (tokens/s over all sequences, the time of a one-token request subtracted), their ratio
per round, and how many greedy outputs the two builds agree on. Only the kernels' signatures the engine calls
must be the same in both builds.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="a checkout whose kernels to compare against (its infer_recipes/ is imported)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantization", default="int4")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    old = native_of(str(Path(args.old).resolve()))
    here = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, here)
    import torch

    from infer_recipes import LLM, kernels
    from infer_recipes.config import SamplingParams

    new = kernels.native()
    if old is None or new is None:
        raise SystemExit(f"a build does not run here: {kernels.reason()}")
    if old.__name__ == new.__name__:
        raise SystemExit("both checkouts have the same kernel sources")
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, progress=False,
              max_batch_size=max(16, args.batch))
    prompts = [list(range(1000 + 7 * b, 1000 + 7 * b + args.input_len)) for b in range(args.batch)]
    full = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def rate(module) -> tuple[float, list[list[int]]]:
        kernels.native = lambda: module  # every caller asks kernels.native() per call
        start = time.perf_counter()
        llm.generate(prompts, one)  # the prompts' blocks are cached after the first round: this is the prefill
        middle = time.perf_counter()
        outs = llm.generate(prompts, full)
        end = time.perf_counter()
        return args.batch * (args.output_len - 1) / ((end - middle) - (middle - start)), [o.token_ids for o in outs]

    for module in (old, new):
        rate(module)  # warm-up
    rates, tokens = {"old": [], "new": []}, {}
    for r in range(args.rounds):
        order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
        for name, module in order:
            value, tokens[name] = rate(module)
            rates[name].append(value)
    o, n = statistics.median(rates["old"]), statistics.median(rates["new"])
    paired = [b / a for a, b in zip(rates["old"], rates["new"])]
    same = sum(a == b for a, b in zip(tokens["old"], tokens["new"]))
    print(f"{args.model} {args.quantization} {args.dtype}, batch {args.batch}, {args.input_len} + {args.output_len}, "
          f"{args.threads} threads")
    print(f"decode tok/s: old {o:.1f}, new {n:.1f} (medians of {args.rounds}); new/old per round "
          f"{', '.join(f'{x:.2f}x' for x in paired)}; greedy outputs identical {same}/{args.batch}")


if __name__ == "__main__":
    main()
