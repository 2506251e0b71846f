"""The speed and memory targets of the optimizations issue: our recipes against transformers eager fp32 on the
same SmolLM2-135M-Instruct GGUF weights, one process, alternating runs so drift hits every engine alike.

Per batch size (all prompts the same length, so nobody pads): TTFT = time of a 1-token generation for the whole
batch; decode tokens/s = batch * (new_tokens - 1) / (t(new_tokens) - t(1)). Peak resident memory is measured in a
fresh child process per engine (load + one batch-1 generation), since one process holding every model would
mix them up.

    python benchmarks/targets.py --recipes fastest int8 int4 --batch-sizes 1 8 --runs 3
    python benchmarks/targets.py --recipes fastest int4 --batch-sizes 1 --llama-cpp --no-memory
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MODEL = "smollm2-135m-instruct"
TEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway. ") * 60


def load_engine(name: str, threads: int = 2):
    """-> generate(prompt_ids, batch, n) -> seconds"""
    if name == "llama.cpp":  # the optional extra llama-cpp-python, on the very same GGUF file; batch 1 only
        from llama_cpp import Llama

        from infer_recipes.loading.source import SMOLLM2

        cpp = Llama(model_path=SMOLLM2.path(), n_ctx=2048, n_batch=512,
                    n_threads=threads, n_threads_batch=threads, verbose=False)

        def run(prompt: list[int], batch: int, n: int) -> float:
            if batch != 1:
                return float("nan")
            cpp.reset()  # no reuse of the previous run's prompt cache
            t, made = time.perf_counter(), 0
            for _ in cpp.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops at end-of-sequence itself
                made += 1
                if made == n:
                    break
            return time.perf_counter() - t
        return run

    if name == "transformers":
        from transformers import AutoModelForCausalLM

        from infer_recipes.loading.source import SMOLLM2

        path = SMOLLM2.path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM2.filename,
                                                  dtype=torch.float32).eval()

        @torch.inference_mode()
        def run(prompt: list[int], batch: int, n: int) -> float:
            ids = torch.tensor([prompt] * batch)
            t = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
            assert out.shape[1] == len(prompt) + n
            return time.perf_counter() - t
        return run

    from infer_recipes import LLM, SamplingParams, load_recipe

    if name.startswith("scheme:"):  # a bare quantization scheme with the default switches, e.g. scheme:gguf
        llm = LLM(MODEL, device="cpu", quantization=name.split(":", 1)[1], progress=False)
    else:
        recipe = load_recipe(f"{MODEL}/{name}")
        llm = LLM(recipe.model, progress=False, **{**recipe.llm_kwargs(), "device": "cpu", "max_batch_size": 16})

    def run(prompt: list[int], batch: int, n: int) -> float:
        t = time.perf_counter()
        outs = llm.generate([prompt] * batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        assert all(len(o.token_ids) == n for o in outs)
        return time.perf_counter() - t
    return run


def prompt_ids(length: int) -> list[int]:
    from infer_recipes.tokenizer import load_tokenizer
    from infer_recipes.loading import resolve_model_source

    return load_tokenizer(resolve_model_source(MODEL)).encode(TEXT)[:length]


def child_memory(name: str, prompt_file: str, new_tokens: int) -> None:
    """Load + one batch-1 generation; the prompt ids come from the parent, so this process builds no tokenizer
    beyond the engine's own."""
    from infer_recipes.device import peak_memory_bytes

    with open(prompt_file) as f:
        prompt = json.load(f)
    run = load_engine(name, torch.get_num_threads())
    run(prompt, 1, new_tokens)
    print(json.dumps({"engine": name, "peak_rss_bytes": peak_memory_bytes(torch.device("cpu"))}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["fastest", "int8", "int4"],
                    help="shipped smollm2-135m-instruct recipes, or scheme:NAME for a bare quantization scheme")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true",
                    help="add llama.cpp (pip install llama-cpp-python) at batch 1 on the same GGUF")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory children, no timing")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        return child_memory(args.child_memory, args.prompt_file, args.new_tokens)

    engines = ["transformers", *args.recipes]
    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            engines.append("llama.cpp")
        except ImportError:
            print("llama.cpp skipped: llama-cpp-python is not installed (an optional extra)", file=sys.stderr)
    memory = {}
    prompt = prompt_ids(args.prompt_len)
    if not args.no_memory:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompt, f)
        for name in engines:
            out = subprocess.run([sys.executable, __file__, "--child-memory", name, "--prompt-file", f.name,
                                  "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
            print(f"peak RSS {name}: {memory[name] / 1e6:.0f} MB", file=sys.stderr)
    if args.memory_only:
        print("| engine | peak RSS MB | vs transformers |\n| --- | --- | --- |")
        for name, peak in memory.items():
            print(f"| {name} | {peak / 1e6:.0f} | {peak / memory['transformers']:.2f}x |")
        return

    runners = {name: load_engine(name, args.threads) for name in engines}
    for run in runners.values():
        run(prompt, 1, 4)  # warm-up
    results = {(name, b): [] for name in engines for b in args.batch_sizes}
    for r in range(args.runs):
        for b in args.batch_sizes:
            for name, run in runners.items():
                if name == "llama.cpp" and b != 1:
                    continue
                ttft, total = run(prompt, b, 1), run(prompt, b, args.new_tokens)
                results[name, b].append((ttft, b * (args.new_tokens - 1) / (total - ttft)))
                print(f"run {r + 1}/{args.runs} batch {b} {name}: TTFT {ttft:.3f} s, decode "
                      f"{results[name, b][-1][1]:.1f} tok/s", file=sys.stderr)

    print(f"SmolLM2-135M-Instruct, CPU {args.threads} threads, prompt {len(prompt)}, {args.new_tokens} new tokens, "
          f"median of {args.runs} alternating runs; transformers = eager fp32 on the same GGUF weights")
    print("| engine | batch | TTFT s | TTFT vs transformers | decode tok/s | decode vs transformers | peak RSS MB "
          "| RSS vs transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in args.batch_sizes:
        base = results["transformers", b]
        base_ttft, base_tps = statistics.median(x[0] for x in base), statistics.median(x[1] for x in base)
        for name in engines:
            rows = results[name, b]
            if not rows:
                continue
            ttft, tps = statistics.median(x[0] for x in rows), statistics.median(x[1] for x in rows)
            mem = memory.get(name)
            mem_cols = (f"{mem / 1e6:.0f} | {mem / memory['transformers']:.2f}x" if mem and b == args.batch_sizes[0]
                        else " | ")
            print(f"| {name} | {b} | {ttft:.3f} | {ttft / base_ttft:.2f}x | {tps:.1f} | {tps / base_tps:.2f}x | "
                  f"{mem_cols} |")


if __name__ == "__main__":
    main()
