"""Peak memory per benchmark cell, measured in a child process that holds one engine and nothing else.

The timing runs keep several engines in one process (so drift hits them alike), where the resident set is theirs
together and never goes down; memory is therefore measured apart: one child per engine loads it and runs each
cell once, smallest first (a CPU KV pool keeps the pages it has touched, so a smaller cell after a larger one
would inherit its pages), sampling the resident set (CPU) or reading the allocator's peak (CUDA / NPU) per cell.

    python -m infer_recipes.bench.memory < job.json
    # job: {"engine", "cells", "prompts", "max_batch", "max_len", "threads"}
"""
from __future__ import annotations

import json
import subprocess
import sys

from ..errors import InferRecipesError


def child_peaks(spec, cells: list[tuple[int, int, int]], prompts: dict[int, list[list[int]]], max_batch: int,
                max_len: int) -> dict[tuple[int, int, int], int | None]:
    """Runs the child for one engine spec; -> {(batch, input_len, output_len): peak bytes or None (n/a)}."""
    import torch

    job = {"engine": spec.to_json(), "cells": [list(c) for c in cells],
           "prompts": {str(k): v for k, v in prompts.items()}, "max_batch": max_batch, "max_len": max_len,
           "threads": torch.get_num_threads()}
    proc = subprocess.run([sys.executable, "-m", "infer_recipes.bench.memory"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InferRecipesError(f"memory measurement of {spec.label} failed in its child process: {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(c): peak for *c, peak in result["peaks"]}


def main() -> int:
    import torch

    from ..device import PeakMemory
    from .engines import EngineSpec, Unsupported, build

    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    engine = build(EngineSpec.from_json(job["engine"]), job["max_batch"], job["max_len"])
    peaks = []
    for batch, input_len, output_len in sorted(job["cells"], key=lambda c: (c[0] * (c[1] + c[2]), c)):
        prompts = job["prompts"][str(input_len)][:batch]
        try:
            with PeakMemory(engine.device, interval=0.005) as peak:
                engine.run(prompts, output_len)
            peaks.append([batch, input_len, output_len, peak.peak])
        except Unsupported:
            peaks.append([batch, input_len, output_len, None])
    print(json.dumps({"peaks": peaks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
