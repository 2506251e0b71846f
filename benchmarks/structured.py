"""What structured output costs per token: time per output token (TPOT, per request: (end - first token) / (tokens -
1)) of JSON-schema-constrained requests against unconstrained ones, at batch 1 and batch 8, the two kinds
alternating run by run in one process. The unconstrained requests generate as many tokens as the constrained ones
did (ignore_eos), so both decode the same lengths.

    python benchmarks/structured.py --model smollm2-135m-instruct --runs 3
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from infer_recipes import LLM, Constraint, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population", "landmarks"],
          "properties": {"city": {"type": "string", "maxLength": 32},
                         "country": {"type": "object", "additionalProperties": False, "required": ["name", "code"],
                                     "properties": {"name": {"type": "string", "maxLength": 32},
                                                    "code": {"type": "string", "pattern": "^[A-Z]{2}$"}}},
                         "population": {"type": "integer", "minimum": 0},
                         "landmarks": {"type": "array", "maxItems": 3,
                                       "items": {"type": "string", "maxLength": 32}}}}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Hanoi"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, quantization=args.quantization, progress=False)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Give facts about {c} as JSON."}])
               for c in CITIES]
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0, constraint=constraint))  # compile, warm
    print(f"{args.model} ({args.quantization or 'float32'}), {args.threads} threads, greedy, {args.runs} runs, "
          "median TPOT per request")
    print("| batch | unconstrained TPOT ms | constrained TPOT ms | constrained / unconstrained | tokens per request |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in (1, 8):
        tpot = {"free": [], "json": []}
        lengths = []
        for _ in range(args.runs):
            for start in range(0, len(prompts), batch):
                group = prompts[start:start + batch]
                constrained = llm.generate(group, SamplingParams(max_tokens=400, temperature=0.0,
                                                                 constraint=constraint))
                lengths += [len(o.token_ids) for o in constrained]
                free = llm.generate(group, [SamplingParams(max_tokens=len(o.token_ids), temperature=0.0,
                                                           ignore_eos=True) for o in constrained])
                tpot["json"] += [o.metrics["tpot_s"] for o in constrained if "tpot_s" in o.metrics]
                tpot["free"] += [o.metrics["tpot_s"] for o in free if "tpot_s" in o.metrics]
        free, con = (statistics.median(tpot[k]) * 1000 for k in ("free", "json"))
        print(f"| {batch} | {free:.2f} | {con:.2f} | {con / free:.3f} | {statistics.mean(lengths):.0f} |")


if __name__ == "__main__":
    main()
