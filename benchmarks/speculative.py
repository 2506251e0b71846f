"""Speculative decoding, side by side in one process: the model alone, with prompt lookup, with a draft model, and
llama.cpp on the same GGUF (batch 1), greedy, on three kinds of request:

- qa:   SQuAD questions with the `eval squad` prompt (3 shots): short answers copied from the context;
- code: "add a docstring to this function" over functions of this repository: the answer copies the code;
- chat: open questions whose answers copy nothing (where guessing cannot pay).

Every request runs on every engine in turn (the order rotates), so all engines see the same machine noise.
Decode tok/s of a request = (tokens - 1) / (end - first token); the table gives medians over requests, the
acceptance (kept / proposed guesses) and the guesses kept per step that verified any. Batches (--batch 2,8): the
requests that many at a time, generated tokens / wall time.

    python benchmarks/speculative.py --model qwen2.5-coder-1.5b-instruct --quantization gguf \\
        --draft qwen2.5-coder-0.5b-instruct --requests 6 --max-tokens 128
"""
from __future__ import annotations

import argparse
import ast
import statistics
import time
from pathlib import Path

import torch

from infer_recipes import LLM, SamplingParams
from infer_recipes.bench.prompts import SHARED_DATA
from infer_recipes.eval.qa import build_prompt, load_qa
from infer_recipes.loading import resolve_model_source

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA / "squad" / "dev-v2.0.part-a.json"
CHAT = ["Explain in a few paragraphs why the sky is blue.", "Write a short story about a lighthouse keeper.",
        "What are the pros and cons of remote work? Answer in detail.", "Describe how a bicycle gear system works.",
        "Give me ideas for a birthday party for a ten-year-old.", "Why do cats purr? Explain what is known.",
        "Compare Python and Rust for writing a web server.", "Describe the water cycle to a child."]


def functions(count: int) -> list[str]:
    """Source of `count` functions of 8-30 lines from this repository, in a fixed order."""
    out = []
    for path in sorted((REPO / "infer_recipes").rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and 8 <= node.end_lineno - node.lineno <= 30:
                source = ast.get_source_segment(text, node)
                if source and '"""' not in source:  # functions without a docstring: the task adds one
                    out.append(source)
    step = max(1, len(out) // count)
    return out[::step][:count]


def workloads(tokenizer, count: int) -> dict[str, list[list[int]]]:
    qa = [build_prompt(tokenizer, ex, "en", 3) for ex in load_qa(DATA, 200) if ex.answers][:count]
    code = [tokenizer.encode_chat([{"role": "user", "content": "Add a docstring to this Python function. Reply "
                                    f"with the whole function and nothing else.\n\n```python\n{f}\n```"}])
            for f in functions(count)]
    chat = [tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHAT[:count]]
    return {"qa": qa, "code": code, "chat": chat}


class Ours:
    def __init__(self, label: str, llm: LLM):
        self.label, self.llm = label, llm

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], float, float]]:
        """(tokens, first token s, end s) per request."""
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [(o.token_ids, o.metrics["ttft_s"], o.metrics["e2e_s"]) for o in outs]

    def counters(self) -> tuple[int, int, int]:
        stats = self.llm.engine.stats()
        return stats["spec_draft_tokens"], stats["spec_accepted_tokens"], stats["spec_steps"]


class LlamaCpp:
    label = "llama.cpp"

    def __init__(self, path: str, threads: int, eos: frozenset[int]):
        from llama_cpp import Llama

        self.llama = Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                           verbose=False)
        self.eos = eos  # ours: the same stopping point

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], float, float]]:
        assert len(prompts) == 1
        self.llama.reset()
        start, first, made = time.perf_counter(), None, []
        for token in self.llama.generate(prompts[0], top_k=1, temp=0.0, reset=True):
            made.append(token)
            first = first or time.perf_counter()
            if len(made) == max_tokens or token in self.eos:
                break
        end = time.perf_counter()
        return [(made, first - start, end - start)]

    def counters(self) -> tuple[int, int, int]:
        return 0, 0, 0


def decode_rate(tokens: int, first: float, end: float) -> float | None:
    return (tokens - 1) / (end - first) if tokens > 1 and end > first else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--draft-quantization", default=None)
    ap.add_argument("--k", type=int, default=None, help="guesses per step (default: the engine's)")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="2,8", help="also run this many at once, comma-separated ('': skip)")
    ap.add_argument("--kinds", default="qa,code,chat")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = dict(quantization=args.quantization, progress=False, max_model_len=4096)
    k = {} if args.k is None else {"num_speculative_tokens": args.k}
    engines = [Ours("alone", LLM(args.model, **opts)),
               Ours("prompt lookup", LLM(args.model, speculative_model="ngram", **k, **opts))]
    if args.draft:
        engines.append(Ours(f"draft {args.draft}", LLM(args.model, speculative_model=args.draft,
                                                       speculative_quantization=args.draft_quantization,
                                                       **k, **opts)))
    if not args.no_llama_cpp:
        engines.append(LlamaCpp(resolve_model_source(args.model).location, args.threads,
                                engines[0].llm.eos_token_ids))
    loads = workloads(engines[0].llm.tokenizer, args.requests)
    for e in engines:  # warm-up
        e.run([loads["chat"][0]], 8)
    print(f"{args.model} ({args.quantization}), greedy, up to {args.max_tokens} new tokens, {args.threads} threads, "
          f"{args.requests} requests per kind, batch 1 (engines take turns per request)")
    print("| kind | engine | decode tok/s (median) | vs alone | tokens/request | same tokens as alone | acceptance | "
          "kept per guessing step |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in args.kinds.split(","):
        rates = {e.label: [] for e in engines}
        made = {e.label: [] for e in engines}  # token ids per request
        before = {e.label: e.counters() for e in engines}
        for i, prompt in enumerate(loads[kind]):
            for e in engines[i % len(engines):] + engines[:i % len(engines)]:
                (tokens, first, end), = e.run([prompt], args.max_tokens)
                made[e.label].append(tokens)
                rate = decode_rate(len(tokens), first, end)
                if rate is not None:
                    rates[e.label].append(rate)
        base = statistics.median(rates["alone"])
        for e in engines:
            drafted, kept, steps = (a - b for a, b in zip(e.counters(), before[e.label]))
            med = statistics.median(rates[e.label]) if rates[e.label] else float("nan")
            accept = f"{kept / drafted:.0%}" if drafted else "-"
            per_step = f"{kept / steps:.2f}" if steps else "-"
            same = sum(a == b for a, b in zip(made[e.label], made["alone"]))
            print(f"| {kind} | {e.label} | {med:.2f} | {med / base:.2f}x | "
                  f"{statistics.mean(map(len, made[e.label])):.0f} | {same}/{len(made['alone'])} | {accept} | "
                  f"{per_step} |")
    for batch in [int(b) for b in args.batch.split(",") if b]:
        print(f"\nbatch {batch}: {batch} requests of each kind at once, generated tokens / wall time "
              "(prefill included)")
        print("| kind | engine | aggregate tok/s | vs alone | acceptance |")
        print("| --- | --- | ---: | ---: | ---: |")
        for kind in args.kinds.split(","):
            prompts = (loads[kind] * batch)[:batch]
            results = {}
            for e in [e for e in engines if isinstance(e, Ours)]:
                before = e.counters()
                start = time.perf_counter()
                outs = e.run(prompts, args.max_tokens)
                total = time.perf_counter() - start
                drafted, kept, _ = (a - b for a, b in zip(e.counters(), before))
                results[e.label] = (sum(len(t) for t, _, _ in outs) / total, drafted, kept)
            for label, (rate, drafted, kept) in results.items():
                accept = f"{kept / drafted:.0%}" if drafted else "-"
                print(f"| {kind} | {label} | {rate:.2f} | {rate / results['alone'][0]:.2f}x | {accept} |")


if __name__ == "__main__":
    main()
