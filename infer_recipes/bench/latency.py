"""Latency and throughput per batch size and input length, for several engines measured side by side.

Every engine of a model is loaded into this one process; for each cell (batch size x input length) each engine
runs a warm-up, then the measured runs alternate between the engines (A B A B ...), so drift of a shared machine
hits all of them alike. A run submits `batch` different prompts of exactly `input_len` tokens and generates
exactly `output_len` tokens for each (end-of-sequence ignored, greedy).

Per run: TTFT (submission -> every sequence has its first token) and end-to-end latency. Reported per cell: the
medians, and from them TPOT = decode time / (output_len - 1), prefill tokens/s = batch x input_len / TTFT, decode
tokens/s = batch x (output_len - 1) / decode time, output tokens/s = batch x output_len / latency, total tokens/s
= batch x (input_len + output_len) / latency; the spread (max - min) / median of the latency; peak memory from a
child process per engine (see memory.py); the roofline fraction (decode tokens/s against the bandwidth bound);
joules and tokens per joule where the machine has energy counters.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from ..device import release_memory
from ..errors import InferRecipesError
from . import roofline
from .energy import EnergyMeter
from .engines import Engine, EngineSpec, Timing, Unsupported, build
from .memory import child_peaks
from .prompts import PromptSet

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class Cell:
    batch: int
    input_len: int
    output_len: int


@dataclass
class Group:
    """Engines of one model measured side by side, each over its cells."""

    model: str
    specs: list[EngineSpec]
    cells: dict[str, list[Cell]]  # label -> its cells
    together: bool = True  # all loaded at once and alternating; False: one engine at a time (memory)


@dataclass
class Measured:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    engines: list[dict] = field(default_factory=list)
    tokens_per_char: dict[str, float] = field(default_factory=dict)


def grid(batch_sizes: list[int], input_lens: list[int], output_len: int) -> list[Cell]:
    for name, values in (("--batch-sizes", batch_sizes), ("--input-lens", input_lens)):
        if not values or any(v < 1 for v in values):
            raise InferRecipesError(f"{name} must list positive integers, got {values}")
    if output_len < 2:
        raise InferRecipesError(f"--output-len must be at least 2 (decode speed needs a second token), "
                                f"got {output_len}")
    return [Cell(b, n, output_len) for n in sorted(set(input_lens)) for b in sorted(set(batch_sizes))]


def summarize(cell: Cell, timings: list[Timing], joules: list[float | None]) -> dict:
    """The reported figures of one engine in one cell; each rate is tokens / the reported seconds."""
    b, n, m = cell.batch, cell.input_len, cell.output_len
    ttft = statistics.median(t.ttft_s for t in timings)
    e2e = statistics.median(t.e2e_s for t in timings)
    decode = statistics.median(t.e2e_s - t.ttft_s for t in timings)
    row = {"batch": b, "input_len": n, "output_len": m,
           "runs": [{"ttft_s": t.ttft_s, "e2e_s": t.e2e_s, "joules": j, "preemptions": t.preemptions}
                    for t, j in zip(timings, joules)],
           "ttft_s": ttft, "e2e_s": e2e, "decode_s": decode, "tpot_s": decode / (m - 1),
           "prefill_tokens_per_s": b * n / ttft, "decode_tokens_per_s": b * (m - 1) / decode,
           "output_tokens_per_s": b * m / e2e, "total_tokens_per_s": b * (n + m) / e2e,
           "e2e_spread_pct": 100 * (max(t.e2e_s for t in timings) - min(t.e2e_s for t in timings)) / e2e,
           "preemptions": sum(t.preemptions for t in timings), "joules": None, "tokens_per_joule": None}
    if all(j is not None for j in joules) and joules:
        row["joules"] = statistics.median(joules)
        row["tokens_per_joule"] = b * m / row["joules"] if row["joules"] > 0 else None
    return row


class Bench:
    def __init__(self, prompts: PromptSet, runs: int = 3, warmup: int = 1, memory: bool = True,
                 machine: dict | None = None, progress: bool = True):
        if runs < 1 or warmup < 0:
            raise InferRecipesError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
        self.prompt_set, self.runs, self.warmup, self.memory = prompts, runs, warmup, memory
        self.machine, self.progress = machine, progress
        self.energy: EnergyMeter | None = None

    def measure(self, groups: list[Group]) -> Measured:
        out = Measured()
        total = sum((self.warmup + self.runs) * len(cells) for g in groups for cells in g.cells.values())
        with tqdm(total=total, desc="benchmark", unit="run", disable=not self.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for g in groups:
                self._group(g, out, bar)
        return out

    def _prompts(self, model: str, cells: list[Cell], out: Measured) -> dict[int, list[list[int]]]:
        from ..loading import resolve_model_source
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_source(model))
        out.tokens_per_char[model] = self.prompt_set.tokens_per_char(tokenizer)
        batch = max(c.batch for c in cells)
        return {n: self.prompt_set.prompts(tokenizer, n, batch) for n in sorted({c.input_len for c in cells})}

    def _group(self, g: Group, out: Measured, bar: tqdm) -> None:
        every = [c for cells in g.cells.values() for c in cells]
        prompts = self._prompts(g.model, every, out)
        max_batch, max_len = max(c.batch for c in every), max(c.input_len + c.output_len for c in every)
        batches = [g.specs] if g.together else [[s] for s in g.specs]
        for specs in batches:
            engines: list[Engine] = []
            for spec in specs:
                bar.set_description(f"loading {spec.label}")
                try:
                    engines.append(build(spec, max_batch, max_len, progress=False))
                except Unsupported as e:
                    out.skipped.append({"engine": spec.label, "model": g.model, "why": str(e)})
                    bar.update((self.warmup + self.runs) * len(g.cells[spec.label]))
                    print(f"skipped {spec.label}: {e}", file=sys.stderr)
            if self.energy is None and engines:
                self.energy = EnergyMeter(engines[0].device)
            out.engines += [e.describe() for e in engines]
            self._cells(engines, g, prompts, out, bar)
            del engines
            release_memory()
        if self.memory:
            self._memory(g, prompts, max_batch, max_len, out, bar)

    def _cells(self, engines: list[Engine], g: Group, prompts, out: Measured, bar: tqdm) -> None:
        cells = sorted({c for e in engines for c in g.cells[e.spec.label]}, key=lambda c: (c.input_len, c.batch))
        for cell in cells:
            here = [e for e in engines if cell in g.cells[e.spec.label]]
            batch_prompts = prompts[cell.input_len][:cell.batch]
            timings: dict[str, list] = {e.spec.label: [] for e in here}
            # warm-ups (short, untimed) then the measured runs, every engine in turn at each
            attempts = [("warm-up", min(cell.output_len, WARMUP_TOKENS), False)] * self.warmup + \
                [(f"run {r + 1}/{self.runs}", cell.output_len, True) for r in range(self.runs)]
            for i, (what, tokens, timed) in enumerate(attempts):
                for e in list(here):
                    bar.set_description(f"{e.spec.label} b{cell.batch} in{cell.input_len} {what}")
                    before = self.energy.read() if timed and self.energy else None
                    try:
                        t = e.run(batch_prompts, tokens)
                    except Unsupported as err:
                        out.skipped.append({"engine": e.spec.label, "model": g.model, "batch": cell.batch,
                                            "input_len": cell.input_len, "why": str(err)})
                        here.remove(e)
                        bar.update(len(attempts) - i)
                        continue
                    if timed:
                        after = self.energy.read() if self.energy else None
                        timings[e.spec.label].append((t, None if before is None else after - before))
                    bar.update(1)
            for e in here:
                runs = timings[e.spec.label]
                row = {"engine": e.spec.label, "kind": e.spec.kind, "model": g.model, "recipe": e.spec.recipe,
                       "dtype": e.dtype, "device": e.device.type,
                       **summarize(cell, [t for t, _ in runs], [j for _, j in runs]),
                       "weight_bytes_per_decode_step": e.weight_bytes_read(cell.batch),
                       "kv_bytes_per_token": e.kv_bytes_per_token(), "peak_memory_bytes": None}
                if self.machine:
                    bound = roofline.decode_bound_tps(self.machine, row["weight_bytes_per_decode_step"],
                                                      row["kv_bytes_per_token"], cell.batch, cell.input_len,
                                                      cell.output_len)
                    row["decode_bound_tokens_per_s"] = bound
                    row["roofline_fraction"] = row["decode_tokens_per_s"] / bound
                out.rows.append(row)

    def _memory(self, g: Group, prompts, max_batch: int, max_len: int, out: Measured, bar: tqdm) -> None:
        measured = {(r["engine"], r["batch"], r["input_len"], r["output_len"]): r for r in out.rows
                    if r["model"] == g.model}
        for spec in g.specs:
            cells = [c for c in g.cells[spec.label] if (spec.label, c.batch, c.input_len, c.output_len) in measured]
            if not cells:
                continue
            bar.set_description(f"{spec.label}: peak memory (child process)")
            peaks = child_peaks(spec, [(c.batch, c.input_len, c.output_len) for c in cells], prompts, max_batch,
                                max_len)
            for c in cells:
                measured[spec.label, c.batch, c.input_len, c.output_len]["peak_memory_bytes"] = \
                    peaks.get((c.batch, c.input_len, c.output_len))
