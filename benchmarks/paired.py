"""Is an EM difference between two `eval squad --out` runs more than chance? Paired by question: how many only
one run gets right, and the exact two-sided McNemar (sign) test on those discordant questions.

    python benchmarks/paired.py runs/fp32 runs/int8 [runs/w8a8 ...] [--split]

`--split` adds a row per run for the answerable questions and one for the unanswerable ones (SQuAD 2.0: no gold
answer), so a shift in how often a run abstains shows apart from how well it answers.
"""
import json
import math
import sys
from pathlib import Path


def load(d: str) -> dict[str, dict]:
    return {x["id"]: x for x in map(json.loads, (Path(d) / "answers.jsonl").read_text().splitlines())}


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a vs b discordant pairs under p = 1/2."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def row(name: str, base: dict, run: dict, ids: list[str]) -> str:
    only_base = sum(1 for i in ids if base[i]["exact"] and not run[i]["exact"])
    only_run = sum(1 for i in ids if run[i]["exact"] and not base[i]["exact"])
    differ = sum(1 for i in ids if base[i]["prediction"] != run[i]["prediction"])
    diff = 100 * (only_run - only_base) / max(len(ids), 1)
    return (f"| {name} | {diff:+.1f} | {only_base} | {only_run} | {differ} / {len(ids)} | "
            f"{sign_test(only_base, only_run):.3f} |")


args = [a for a in sys.argv[1:] if a != "--split"]
split = "--split" in sys.argv[1:]
base_dir, *others = args
base = load(base_dir)
print("| run | EM diff (points) | only base right | only run right | answers differ | sign-test p |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for d in others:
    run = load(d)
    ids = sorted(set(base) & set(run))
    print(row(Path(d).name, base, run, ids))
    if split:
        answerable = [i for i in ids if base[i]["gold"]]
        print(row(f"{Path(d).name}, answerable", base, run, answerable))
        print(row(f"{Path(d).name}, unanswerable", base, run, sorted(set(ids) - set(answerable))))
