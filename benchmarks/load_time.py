"""Time to a ready model and peak memory, ours against llama.cpp on the same GGUF, side by side.

Each load runs in a fresh child process (imports done before the clock starts; peak RSS is the child's whole
life), engines alternating round by round; the median of the rounds is reported. The converted-weights cache
is measured both ways: cold (converted from the file, as a first load) and warm (memory-mapped, as every later
load and every reload after the model pool evicted the model). `gguf-torch cold` converts without our C++
extension (`kernels: torch`: numpy and torch compute the same weights, for torch's kernels). Peak RSS is in MiB
(the file's size too, to compare with it).

    python benchmarks/load_time.py --model qwen2.5-coder-1.5b-instruct --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
kind, model = sys.argv[1], sys.argv[2]
if kind == "llama.cpp":
    from llama_cpp import Llama
    from infer_recipes.loading.source import resolve_model_source
    path = resolve_model_source(model).location
    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=2048, n_threads=int(sys.argv[3]), verbose=False)
    llm.eval(llm.tokenize(b"Hello"))  # ready: one token through the model
else:
    from infer_recipes import LLM, SamplingParams
    start = time.perf_counter()
    opts = {"bf16": dict(dtype="bfloat16"), "fp32": dict(dtype="float32"),
            "gguf-torch": dict(dtype="bfloat16", quantization="gguf", kernels="torch")}.get(kind) or \
        dict(dtype="bfloat16", quantization=kind)
    llm = LLM(model, device="cpu", progress=False, max_model_len=2048, **opts)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1))  # ready: one token through the model
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, model: str, threads: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, model, str(threads)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+",
                    default=["llama.cpp", "gguf cold", "gguf cached", "gguf-torch cold", "bf16"])
    args = ap.parse_args()
    base = dict(os.environ)
    envs = {"gguf cold": {**base, "INFER_RECIPES_CONVERTED_CACHE": "0"},
            "gguf-torch cold": {**base, "INFER_RECIPES_CONVERTED_CACHE": "0"},
            "gguf cached": {**base, "INFER_RECIPES_CONVERTED_CACHE": "1"}}  # the user's cache directory
    if "gguf cached" in args.engines:
        run("gguf", args.model, args.threads, envs["gguf cached"])  # fills the cache
    results: dict[str, list[dict]] = {e: [] for e in args.engines}
    for r in range(args.rounds):
        for engine in args.engines:
            results[engine].append(run(engine.split()[0] if engine != "llama.cpp" else engine, args.model,
                                       args.threads, envs.get(engine, base)))
            print(f"round {r + 1} {engine}: {results[engine][-1]}", file=sys.stderr, flush=True)
    ref = statistics.median(x["seconds"] for x in results[args.engines[0]])
    from infer_recipes.loading.source import resolve_model_source

    size = os.path.getsize(resolve_model_source(args.model).location) / 2**20
    print(f"| engine | ready s (median of {args.rounds}) | vs {args.engines[0]} | peak RSS MiB "
          f"| x the file ({size:.0f} MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for engine, xs in results.items():
        s = statistics.median(x["seconds"] for x in xs)
        peak = statistics.median(x["peak_rss_mb"] for x in xs)
        print(f"| {engine} | {s:.2f} | {s / ref:.2f}x | {peak:.0f} | {peak / size:.2f}x |")


if __name__ == "__main__":
    main()
