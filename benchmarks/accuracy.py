"""The README's Accuracy table: SQuAD 2.0 EM/F1 (with questions/s) and WikiText-2 perplexity per precision scheme
of SmolLM2-135M-Instruct, each scheme loaded once, all in one process, one after the other.

    python benchmarks/accuracy.py --squad ../shared/data/squad/dev-v2.0.part-a.json --limit 500 \
        --wiki ../shared/data/wikitext2/wiki.valid.tokens --ppl-tokens 32768 --out results/accuracy
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from infer_recipes import LLM
from infer_recipes.eval.perplexity import perplexity
from infer_recipes.eval.qa import answer_questions, load_qa, report, write_outputs

SCHEMES = {"fp32": dict(), "bf16": dict(dtype="bfloat16"), "int8": dict(quantization="int8"),
           "w8a8": dict(quantization="w8a8"), "int4": dict(quantization="int4")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--squad", required=True)
    ap.add_argument("--wiki", required=True)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--out", default=None, help="per scheme: the eval squad outputs and metrics")
    args = ap.parse_args()
    torch.set_num_threads(2)
    examples = load_qa(args.squad, args.limit)
    rows = []
    print("| scheme | EM | F1 | HasAns EM | NoAns EM | EM vs fp32 | questions/s | perplexity | ppl vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for name in args.schemes:
        llm = LLM("smollm2-135m-instruct", device="cpu", max_batch_size=args.batch_size, progress=False,
                  **SCHEMES[name])
        results, seconds = answer_questions(llm, examples, "en", args.shots, args.batch_size, 32, progress=False)
        qa = report("squad", examples, results, seconds, scheme=name, data=args.squad, shots=args.shots,
                    batch_size=args.batch_size)
        ppl = perplexity(llm, args.wiki, args.ppl_tokens, progress=False)
        if args.out:
            write_outputs(Path(args.out) / name, "squad", examples, results, {**qa, "perplexity": ppl}, args.squad)
        rows.append((name, qa, ppl))
        m, base = qa["metrics"], rows[0]
        print(f"| {name} | {m['exact']:.1f} | {m['f1']:.1f} | {m['HasAns_exact']:.1f} | {m['NoAns_exact']:.1f} | "
              f"{m['exact'] - base[1]['metrics']['exact']:+.1f} | {qa['questions_per_s']:.2f} | "
              f"{ppl['perplexity']:.3f} | {100 * (ppl['perplexity'] / base[2]['perplexity'] - 1):+.2f} % |",
              flush=True)
        del llm
    print(json.dumps([{"scheme": n, "squad": q["metrics"], "questions_per_s": q["questions_per_s"],
                       "perplexity": p["perplexity"], "ppl_tokens": p["tokens"]} for n, q, p in rows]))


if __name__ == "__main__":
    main()
