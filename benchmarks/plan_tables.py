"""The planner's tables in the README: Llama-2-7B, Llama-2-70B and Llama-3.2-3B on 1, 2 and 8 devices of 32 GB
(V100-class: 900 GB/s memory, 150 GB/s links) and 80 GB (H100-class: 2000 GB/s, 300 GB/s links), bf16 weights and
KV cache, 4096-token sequences; decode estimated at batch 1 and batch 32.

    python benchmarks/plan_tables.py
"""
from __future__ import annotations

from infer_recipes.models.registry import PRESETS
from infer_recipes.plan import Hardware, assumptions, plan

DEVICES = {32: (900.0, 150.0), 80: (2000.0, 300.0)}


def main() -> None:
    print("| model | devices | layout | weights GB / device | max batch @4096 | batch 1: ms / token | "
          "batch 32: tokens/s | batch 32: comm ms |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in ("llama-2-7b", "llama-2-70b", "llama-3.2-3b"):
        for memory, (bandwidth, link) in DEVICES.items():
            for n in (1, 2, 8):
                hw = Hardware(n, memory, bandwidth, link)
                one = plan(PRESETS[model], hw, batch=1, context=4096)
                many = plan(PRESETS[model], hw, batch=32, context=4096)
                for a, b in zip(one, many):
                    if n > 1 and a.tp * a.pp == 1:
                        continue  # the single-device row is the n = 1 line
                    if not a.fits:
                        print(f"| {model} | {n} x {memory} GB | {a.name} | {a.weight_gb:.1f} | does not fit: "
                              f"{a.why} | | | |")
                        continue
                    capped = "" if b.max_batch >= 32 else f" (batch {b.max_batch})"
                    print(f"| {model} | {n} x {memory} GB | {a.name} | {a.weight_gb:.1f} | {a.max_batch} | "
                          f"{a.latency_ms:.2f} | {b.tokens_per_s:.0f}{capped} | {b.comm_ms:.2f} |")
    print()
    for memory, (bandwidth, link) in DEVICES.items():
        print(f"{memory} GB devices: " + "; ".join(assumptions(Hardware(8, memory, bandwidth, link), "bfloat16",
                                                                 "bfloat16", 32, 4096)))


if __name__ == "__main__":
    main()
