"""Two models served at once, and the cascade between them, on the same questions.

Both models live in one process in the serving issue's model pool (each its own engine, KV pool and queue, one
device thread stepping both). Phase 1 sends every question to each model alone, one model after the other;
phase 2 to both models at the same time; at most `batch_size` in flight per model. Phase 3 (policy "cascade")
sends every question to the first model and re-asks the second when the first's mean token log-probability is
below the threshold. Latency is per question as the caller sees it
(submitted -> answer; for the cascade both hops); memory is each model's weights plus the most KV blocks it held,
and the process's peak resident set (or accelerator memory) during each phase. Each phase starts with both
models' prefix caches empty, so no phase finds the prompts an earlier one computed.

The cascade's threshold trades accuracy for the large model's time, and a good one depends on the pair. Phase 1
holds the large model's answer to every question and phase 3 the small model's confidence in its own, so the
result also lists, for thresholds that escalate 0 %, 10 %, ... 100 % of these questions, what the cascade would
have scored (`thresholds`): the curve to choose a deployment's threshold from, without a run per threshold.
"""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from ..config import SamplingParams
from ..device import PeakMemory
from ..errors import ContextLengthError
from ..serving.pool import Entry, ModelPool, ModelSpec
from ..serving.routing import Cascade
from ..stats import summary
from .qa import QAExample, QAResult, build_prompt, extract_answer, score


@dataclass
class Run:
    """One row of the table: the questions some model (or the cascade) answered, and what it cost."""

    name: str
    results: list[QAResult] = field(default_factory=list)
    seconds: float = 0.0
    answered_by: dict[str, str] = field(default_factory=dict)  # cascade: question id -> model
    confidence: dict[str, float] = field(default_factory=dict)  # cascade: question id -> the small model's mean
    # token log-probability (-inf: no tokens)
    small_answers: dict[str, str] = field(default_factory=dict)  # cascade: question id -> the small model's own
    # answer, escalated or not
    parts: list["Run"] = field(default_factory=list)  # both models together: each model's own run
    weight_bytes: int | None = None  # the weights alone
    model_bytes: int | None = None  # weights + peak KV blocks in use (sampled as outputs arrive: timing decides it
    # to a block or two, as it decides which requests overlap)
    peak_bytes: int | None = None  # process (or accelerator) peak during the phase


class _KVPeak:
    """The most KV blocks a model held, sampled as its outputs arrive (the engine's public stats)."""

    def __init__(self, entry: Entry):
        self.engine = entry.llm.engine
        total = self.engine.stats()["kv_blocks_total"]
        self.block_bytes = entry.llm.kv_cache_bytes() // max(1, total)
        self.peak_blocks = 0

    def sample(self) -> None:
        stats = self.engine.stats()
        self.peak_blocks = max(self.peak_blocks, stats["kv_blocks_total"] - stats["kv_blocks_free"])

    @property
    def bytes(self) -> int:
        return self.peak_blocks * self.block_bytes


async def _answer_all(entry: Entry, examples: list[QAExample], prompts: list[list[int]], lang: str,
                      batch_size: int, max_tokens: int, bar: tqdm, kv: _KVPeak) -> Run:
    limit = asyncio.Semaphore(batch_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(ex: QAExample, ids: list[int]) -> QAResult:
        async with limit:
            start = time.perf_counter()
            try:
                async for out in entry.engine.generate(ids, params):
                    kv.sample()  # after every step that advanced the question: the KV blocks held then
            except ContextLengthError:
                return QAResult.too_long(ex.id, len(ids))
            finally:
                bar.update(1)
            return QAResult.answered(ex.id, out, lang, time.perf_counter() - start)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(ex, ids) for ex, ids in zip(examples, prompts)))
    return Run(entry.spec.name, list(results), time.perf_counter() - start)


async def _cascade(small: Entry, large: Entry, cascade: Cascade, examples: list[QAExample],
                   prompts: dict[str, list[list[int]]], lang: str, batch_size: int, max_tokens: int,
                   bar: tqdm) -> Run:
    limit = asyncio.Semaphore(batch_size)
    sure = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0)
    plain = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    run = Run(cascade.name)

    async def one(i: int, ex: QAExample) -> QAResult:
        async with limit:
            start = time.perf_counter()
            try:
                out, by = await small.engine.final(prompts[small.spec.name][i], sure), small.spec.name
                run.confidence[ex.id] = cascade.confidence(out.logprobs)
                run.small_answers[ex.id] = extract_answer(out.text, lang)
                if cascade.escalate(out.logprobs):
                    out, by = await large.engine.final(prompts[large.spec.name][i], plain), large.spec.name
            except ContextLengthError:
                return QAResult.too_long(ex.id, len(prompts[small.spec.name][i]))
            finally:
                bar.update(1)
            run.answered_by[ex.id] = by
            return QAResult.answered(ex.id, out, lang, time.perf_counter() - start)

    start = time.perf_counter()
    run.results = list(await asyncio.gather(*(one(i, ex) for i, ex in enumerate(examples))))
    run.seconds = time.perf_counter() - start
    return run


def compare(specs: list[ModelSpec], examples: list[QAExample], task: str, lang: str, shots: int = 0,
            batch_size: int = 16, max_tokens: int = 32, policy: str | None = None, threshold: float = -1.0,
            progress: bool = True, log=print) -> dict:
    """Runs the comparison; returns {"rows": [...], "models": {...}, ...} (see `table`)."""
    pool = ModelPool(specs, log=log)
    sweep = None
    try:
        pool.preload()
        entries = [pool.entries[s.name] for s in specs]
        device = entries[0].llm.device
        prompts = {e.spec.name: [build_prompt(e.llm.tokenizer, ex, lang, shots) for ex in examples] for e in entries}
        weights = {e.spec.name: e.llm.weight_bytes() for e in entries}

        def cold() -> None:
            for e in entries:
                e.engine.reset_prefix_cache()

        async def alone(entry: Entry) -> Run:
            cold()
            kv = _KVPeak(entry)
            bar = tqdm(total=len(examples), desc=f"{entry.spec.name} alone", unit="question", disable=not progress,
                       file=sys.stderr)
            with PeakMemory(device) as peak:
                run = await _answer_all(entry, examples, prompts[entry.spec.name], lang, batch_size, max_tokens,
                                        bar, kv)
            bar.close()
            run.weight_bytes, run.peak_bytes = weights[entry.spec.name], peak.peak
            run.model_bytes = run.weight_bytes + kv.bytes
            return run

        async def both() -> Run:
            cold()
            kvs = [_KVPeak(e) for e in entries]
            bar = tqdm(total=len(examples) * len(entries), desc="both models", unit="question",
                       disable=not progress, file=sys.stderr)
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                runs = await asyncio.gather(*(_answer_all(e, examples, prompts[e.spec.name], lang, batch_size,
                                                          max_tokens, bar, kv) for e, kv in zip(entries, kvs)))
                together = Run(" + ".join(e.spec.name for e in entries), [r for run in runs for r in run.results],
                               time.perf_counter() - start, parts=list(runs))
            bar.close()
            for run, entry, kv in zip(runs, entries, kvs):
                run.weight_bytes = weights[entry.spec.name]
                run.model_bytes = run.weight_bytes + kv.bytes
            together.weight_bytes = sum(run.weight_bytes for run in runs)
            together.model_bytes = sum(run.model_bytes for run in runs)
            together.peak_bytes = peak.peak
            return together

        rows = [asyncio.run(alone(e)) for e in entries]
        rows.append(asyncio.run(both()))
        cascade = None
        if policy == "cascade":
            cascade = Cascade("cascade", specs[0].name, specs[1].name, threshold)

            async def cascaded() -> Run:
                cold()
                bar = tqdm(total=len(examples), desc="cascade", unit="question", disable=not progress,
                           file=sys.stderr)
                with PeakMemory(device) as peak:
                    run = await _cascade(entries[0], entries[1], cascade, examples, prompts, lang, batch_size,
                                         max_tokens, bar)
                bar.close()
                run.peak_bytes = peak.peak
                return run

            rows.append(asyncio.run(cascaded()))
            sweep = thresholds(rows[-1], rows[1], task, examples)
    finally:
        pool.shutdown()
    return {"task": task, "questions": len(examples), "batch_size": batch_size, "shots": shots,
            "models": {s.name: {"model": s.model, "options": dict(s.options)} for s in specs},
            "cascade": None if cascade is None else {"small": cascade.small, "large": cascade.large,
                                                     "threshold": cascade.threshold},
            "device": str(device), "rows": [_row(run, task, examples) for run in rows], "thresholds": sweep}


SHARES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def thresholds(cascade: Run, large: Run, task: str, examples: list[QAExample]) -> list[dict]:
    """What the cascade would score at thresholds escalating each share of SHARES of the questions: the small
    model's answers (from the cascade run) where its confidence is at or above the threshold, the large model's
    (phase 1, answered alone with the same greedy settings) below it."""
    small = cascade.small_answers
    big = {r.id: r.prediction for r in large.results}
    ids = [ex.id for ex in examples if ex.id in small and ex.id in big]
    if not ids:  # no question both models answered (every prompt too long): no curve
        return []
    levels = sorted(cascade.confidence[i] for i in ids)
    out = []
    for share in SHARES:
        k = round(share * len(levels))  # escalate the k least confident
        threshold = math.inf if k == len(levels) else levels[k]
        chosen = {i: big[i] if cascade.confidence[i] < threshold else small[i] for i in ids}
        escalated = sum(cascade.confidence[i] < threshold for i in ids)
        metrics = score(task, [ex for ex in examples if ex.id in chosen], chosen)
        out.append({"threshold": None if threshold == math.inf else threshold,  # None: every question escalated
                    "escalated": escalated / max(1, len(ids)), "exact": metrics["exact"],
                    "f1": metrics["f1"]})
    return out


def _row(run: Run, task: str, examples: list[QAExample]) -> dict:
    if run.parts:  # both models together: every question once per model; the mean of the models' scores
        parts = [score(task, examples, {r.id: r.prediction for r in part.results}) for part in run.parts]
        metrics = {k: sum(p[k] for p in parts) / len(parts) for k in ("exact", "f1")}
    else:
        metrics = score(task, examples, {r.id: r.prediction for r in run.results})
    lat = summary([r.latency_s for r in run.results if r.latency_s is not None])
    row = {"name": run.name, "answers": len(run.results), "seconds": run.seconds,
           "questions_per_s": len(run.results) / run.seconds if run.seconds > 0 else None,
           "latency_mean_s": lat["mean"], "latency_p99_s": lat["p99"], "exact": metrics["exact"],
           "f1": metrics["f1"], "weight_bytes": run.weight_bytes, "model_bytes": run.model_bytes,
           "peak_bytes": run.peak_bytes,
           "generated_tokens": sum(r.generated_tokens for r in run.results)}
    if run.answered_by:
        counts: dict[str, int] = {}
        for by in run.answered_by.values():
            counts[by] = counts.get(by, 0) + 1
        row["answered_by"] = {k: v / len(run.answered_by) for k, v in counts.items()}
        for name in counts:
            mine = [ex for ex in examples if run.answered_by.get(ex.id) == name]
            part = score(task, mine, {r.id: r.prediction for r in run.results if run.answered_by.get(r.id) == name})
            row.setdefault("by_model", {})[name] = {"questions": len(mine), "exact": part["exact"],
                                                    "f1": part["f1"]}
    return row


def table(result: dict) -> str:
    """The comparison as a Markdown table."""
    lines = ["| run | answers | mean latency s | p99 latency s | questions/s | EM | F1 | model MB | peak MB | "
             "answered by |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in result["rows"]:
        def mb(v):
            return f"{v / 2**20:.0f}" if v else "-"

        by = ", ".join(f"{name} {share:.0%} (EM {row['by_model'][name]['exact']:.1f})"
                       for name, share in row.get("answered_by", {}).items())
        lines.append(f"| {row['name']} | {row['answers']} | {_f(row['latency_mean_s'], 2)} | "
                     f"{_f(row['latency_p99_s'], 2)} | {_f(row['questions_per_s'], 2)} | {row['exact']:.1f} | "
                     f"{row['f1']:.1f} | {mb(row['model_bytes'])} | {mb(row['peak_bytes'])} | {by or '-'} |")
    if result.get("thresholds"):
        small, large = result["cascade"]["small"], result["cascade"]["large"]
        lines += ["", f"The cascade at other thresholds ({small}'s answers kept at or above, {large}'s phase-1 "
                  f"answers below):", "", "| threshold | escalated | EM | F1 |", "| ---: | ---: | ---: | ---: |"]
        for t in result["thresholds"]:
            level = "any" if t["threshold"] is None else f"{t['threshold']:.3f}"
            lines.append(f"| {level} | {t['escalated']:.0%} | {t['exact']:.1f} | {t['f1']:.1f} |")
    return "\n".join(lines)


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
