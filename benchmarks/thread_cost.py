"""Why the server runs all torch work on one device thread: the same ops timed on the main thread (the first to
run parallel torch code) and then on a second thread, in one process, median of --runs.

    python benchmarks/thread_cost.py --runs 5

The shapes are SmolLM2-135M's at batch 16: a 16x576 @ 576x1536 linear and the decode attention's block gather
(16 rows x 19 blocks of 3 heads x 16 tokens x 64).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def time_ops(results: dict, key: str, reps: int) -> None:
    x, w = torch.randn(16, 576), torch.randn(1536, 576)
    pool, blocks = torch.randn(16 * 19, 3 * 16 * 64), torch.randint(0, 16 * 19, (16 * 19,))
    for _ in range(50):
        torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    results.setdefault((key, "linear"), []).append((time.perf_counter() - start) / reps * 1e6)
    start = time.perf_counter()
    for _ in range(reps):
        pool.index_select(0, blocks)
    results.setdefault((key, "index_select"), []).append((time.perf_counter() - start) / reps * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results: dict = {}
    for _ in range(args.runs):  # alternating, so drift hits both
        time_ops(results, "main thread", args.reps)
        t = threading.Thread(target=time_ops, args=(results, "second thread", args.reps))
        t.start()
        t.join()
    print("| op | main thread us | second thread us | ratio |\n| --- | ---: | ---: | ---: |")
    for op in ("linear", "index_select"):
        a = statistics.median(results[("main thread", op)])
        b = statistics.median(results[("second thread", op)])
        print(f"| {op} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
