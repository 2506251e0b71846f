"""`infer-recipes tune`: the fastest configuration of a model, on this host, that stays within an accuracy budget.

1. The reference is float32 with the default switches: its perplexity on the held-in text (the first `tokens`
   tokens of `data`) and its greedy choice at every scored position.
2. Every candidate that applies here (`candidates`: a 16-bit dtype the hardware computes, each weight scheme with
   our kernels where they run, int4 with the lm_head left in float, the GGUF file's own blocks, calibrated
   checkpoints when a calibration text is given) is loaded and scored on the same tokens: perplexity change
   against float32 and top-1 agreement (int4-w8a8 by the worse of its two forms: a text is scored as a prefill,
   which runs w8a8, while decoding runs int4). Each one within the budget is tried again with the int8 KV cache.
3. A candidate within the budget is timed against the float32 engine, the two alternating run by run in one window
   (A B A B), so the drift of a shared machine hits both: decode and prefill tokens/s at the batch asked for, and
   each one's ratio to float32: the median over run pairs. Candidates over the budget are not timed.
4. The highest ratio for the objective wins, or the most accurate of those the runs cannot tell from it (float32
   itself when nothing else qualifies).
5. With a check text, the chosen row is scored again on it against float32 (the first `tokens` tokens of that
   text); over the budget there, it is set aside and the choice made again, until one holds (float32 always does):
   a calibrated checkpoint can fit the held-in text's kind of text and not another's.
`recipe_text` writes the chosen recipe with the whole table as comments.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ..bench.engines import EngineSpec, Timing, build
from ..bench.latency import WARMUP_TOKENS, Cell, summarize
from ..bench.prompts import PromptSet
from ..errors import InferRecipesError
from .perplexity import fitted, read_text, scored, token_ids

OBJECTIVES = {"decode": "decode_tokens_per_s", "prefill": "prefill_tokens_per_s"}
SCHEMES = ("int8", "w8a8", "int4", "int4-w8a8")
CALIBRATED = ("w8a8", "int4")
CALIBRATION_SAMPLES = 16  # windows of 512 tokens: half of `quantize`'s default, to keep `tune` in minutes
TIE = 0.05  # speed ratios this close to the best count as equal: 3 runs of each on a shared 2-core machine
# spread by about that much (SmolLM2: int8 x5.00 and x5.90 of float32 with and without the int8 KV cache at 256 tokens)


@dataclass(frozen=True)
class Candidate:
    label: str
    model: str  # the model spec, or the directory of a calibrated checkpoint (which runs in its own scheme)
    options: dict = field(default_factory=dict)  # LLM keyword arguments beyond the defaults


@dataclass
class Settings:
    budget_pct: float
    data: str
    tokens: int = 4096
    window: int = 1024
    stride: int = 512
    batch: int = 1
    input_len: int = 256
    output_len: int = 64
    runs: int = 3
    warmup: int = 1
    objective: str = "decode"
    device: str = "auto"
    check_data: str | None = None  # a second text the chosen row must also stay within the budget on

    def check(self) -> None:
        if not (self.budget_pct >= 0 and math.isfinite(self.budget_pct)):
            raise InferRecipesError(f"--accuracy-budget is a perplexity increase in percent, 0 or more; got "
                                    f"{self.budget_pct}")
        if self.window < 2:
            raise InferRecipesError(f"--window must be at least 2 tokens, got {self.window}")
        self.stride = max(1, min(self.stride, self.window // 2))
        for name in ("tokens", "batch", "input_len", "runs"):
            if getattr(self, name) < 1:
                raise InferRecipesError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.output_len < 2:
            raise InferRecipesError(f"--output-len must be at least 2 (decode speed needs a second token), got "
                                    f"{self.output_len}")
        if self.objective not in OBJECTIVES:
            raise InferRecipesError(f"--objective: choose {' or '.join(OBJECTIVES)}, not {self.objective!r}")
        read_text(self.data)
        if self.check_data is not None:
            read_text(self.check_data)
            if os.path.realpath(self.check_data) == os.path.realpath(self.data):
                raise InferRecipesError("--check-data and --data are the same file: check on a second text, or the "
                                        "check repeats the held-in score")


def candidates(model: str, source_kind: str, half_dtypes: tuple[str, ...],
               calibrated: dict[str, str]) -> list[Candidate]:
    """What `tune` tries besides float32: 16-bit activations where the hardware has them, every weight scheme,
    the GGUF file's own blocks, and the calibrated checkpoints made for this run ({scheme: directory})."""
    out = [Candidate(d, model, {"dtype": d}) for d in half_dtypes]
    out += [Candidate(s, model, {"quantization": s}) for s in SCHEMES]
    # a tied lm_head is the embedding table: rounded to 4 bits it can cost more than every decoder layer together
    out.append(Candidate("int4, float lm_head", model, {"quantization": "int4", "quantization_skip": ["lm_head"]}))
    if source_kind == "gguf":
        out.append(Candidate("gguf", model, {"quantization": "gguf"}))
    out += [Candidate(f"{s} calibrated" + (" (GPTQ)" if s == "int4" else ""), path) for s, path in calibrated.items()]
    return out


def with_int8_kv(c: Candidate) -> Candidate:
    return Candidate(f"{c.label} + int8 KV", c.model, {**c.options, "kv_cache_dtype": "int8"})


@torch.inference_mode()
def score(llm, ids: list[int], window: int, stride: int, progress: bool, desc: str) -> tuple[float, torch.Tensor]:
    """Perplexity over `ids` and the greedy choice at every scored position."""
    window, stride = fitted(llm, window, stride)
    nll, count, picks = 0.0, 0, []
    for preds, targets in scored(llm, ids, window, stride, progress, desc):
        nll += F.cross_entropy(preds.float(), targets, reduction="sum").item()
        count += len(targets)
        picks.append(preds.argmax(-1))
    return math.exp(nll / count), torch.cat(picks)


def race(reference, engine, prompts: list[list[int]], cell: Cell, runs: int, warmup: int,
         step=lambda: None) -> tuple[dict, dict]:
    """The reference and `engine` alternating over the same prompts: a warm-up each, then `runs` timed runs each
    in turn; `step` is called after each pair. Returns each one's summary (latency.summarize)."""
    for _ in range(warmup):
        for e in (reference, engine):
            e.run(prompts, min(cell.output_len, WARMUP_TOKENS))
        step()
    timings: tuple[list[Timing], list[Timing]] = ([], [])
    for _ in range(runs):
        for e, times in zip((reference, engine), timings):
            times.append(e.run(prompts, cell.output_len))
        step()
    return tuple(summarize(cell, t, [None] * len(t)) for t in timings)


def paired_ratios(reference: dict, candidate: dict, objective: str) -> list[float]:
    """Run i of the candidate against run i of float32, timed just before it: the speed ratio of each pair."""
    def seconds(run: dict) -> float:
        return run["e2e_s"] - run["ttft_s"] if objective == "decode" else run["ttft_s"]
    return [seconds(r) / seconds(c) for r, c in zip(reference["runs"], candidate["runs"])]


def _timed_within(rows: list[dict], budget_pct: float, key: str) -> list[dict]:
    fits = [r for r in rows if r.get(key) is not None and r["perplexity_change_pct"] <= budget_pct
            and r.get("check_perplexity_change_pct", 0.0) <= budget_pct]
    if not fits:
        raise InferRecipesError("no configuration was timed within the budget, not even float32")
    return fits


def fastest(rows: list[dict], budget_pct: float, objective: str) -> dict:
    """The timed row within the budget with the highest speed ratio to float32."""
    key = f"{objective}_vs_float32"
    return max(_timed_within(rows, budget_pct, key), key=lambda r: r[key])


def choose(rows: list[dict], budget_pct: float, objective: str) -> dict:
    """The timed row within the budget with the highest speed ratio to float32 (the float32 row's is 1). Rows
    the timing cannot tell from it are as fast: those within TIE of its ratio, and those whose best run pair beat
    its worst. The most accurate of them wins: no accuracy is spent on a gain the runs do not show."""
    key = f"{objective}_vs_float32"
    fits = _timed_within(rows, budget_pct, key)
    best = max(fits, key=lambda r: r[key])
    floor = min(best.get(f"{key}_runs") or [best[key]])
    tied = [r for r in fits if r[key] >= best[key] * (1 - TIE) or max(r.get(f"{key}_runs") or [r[key]]) >= floor]
    return min(tied, key=lambda r: r["perplexity_change_pct"])


def checked_choice(rows: list[dict], budget_pct: float, objective: str, check) -> dict:
    """choose(), each choice scored by `check(row)` on the check text (it sets the row's
    check_perplexity_change_pct); one over the budget there drops out of the choice (_timed_within), which is
    made again. Ends: each round either holds or removes a row, and float32 holds (its change is 0)."""
    while True:
        row = choose(rows, budget_pct, objective)
        if "check_perplexity_change_pct" not in row:
            check(row)
        if row["check_perplexity_change_pct"] <= budget_pct:
            return row


def _check_forms(row: dict) -> list[Candidate]:
    """What a row is checked as: itself, and for int4-w8a8 its int4 decode form too (the worse counts)."""
    own = Candidate(row["config"], row["model"], row["options"])
    if row["options"].get("quantization") != "int4-w8a8":
        return [own]
    return [own, Candidate(f"{row['config']} (int4 form)", row["model"], {**row["options"], "quantization": "int4"})]


def _scorable(ids: list[int], path: str, what: str) -> list[int]:
    """The tokens a text is scored on, refused when there is nothing to predict (a perplexity needs 2)."""
    if len(ids) < 2:
        raise InferRecipesError(f"{path} has fewer than 2 tokens: give a longer {what} text")
    return ids


def _prompts(text: str, data: str, tokenizer, length: int, count: int) -> list[list[int]]:
    """`count` prompts of `length` tokens cut from the held-in text (its paragraphs, or its lines)."""
    parts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(parts) < count:
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    return PromptSet("file", data, tuple(parts)).prompts(tokenizer, length, count)


def tune(model: str, settings: Settings, calibrate: str | None = None, calibrated_dir: str | None = None,
         progress: bool = True, log=print) -> dict:
    """Measures every candidate and returns {"rows": [...], "chosen": row, ...}; `log` receives one line per
    candidate as it is measured."""
    from ..device import half_dtypes, release_memory, resolve_device
    from ..loading import resolve_model_source

    settings.check()
    source = resolve_model_source(model)
    device = resolve_device(settings.device)
    start = time.perf_counter()
    calibrated = {}
    if calibrate:
        from ..checkpoint import made_from, quantize_checkpoint

        read_text(calibrate)
        if os.path.realpath(calibrate) == os.path.realpath(settings.data):
            raise InferRecipesError("--calibrate and --data are the same file: calibrate on other text, or the "
                                    "calibrated rows would be scored on what they were fitted to")
        if settings.check_data and os.path.realpath(calibrate) == os.path.realpath(settings.check_data):
            raise InferRecipesError("--calibrate and --check-data are the same file: check on a text the calibration "
                                    "did not see")
        for scheme in CALIBRATED:
            out = os.path.join(calibrated_dir or ".", f"{source.name}-{scheme}-calibrated")
            gptq = scheme == "int4"  # int4 is rounded by GPTQ after its scaling
            if made_from(out, model, scheme, calibrate, CALIBRATION_SAMPLES, use_gptq=gptq):
                log(f"{scheme} calibrated on {calibrate}: reusing {out}")
            else:
                log(f"calibrating {scheme} on {calibrate} -> {out}")
                quantize_checkpoint(model, scheme, calibrate, out, CALIBRATION_SAMPLES, progress=progress,
                                    use_gptq=gptq)
            calibrated[scheme] = os.path.abspath(out)
    max_len = max(settings.window + 1, settings.input_len + settings.output_len)  # a scored window needs room
    cell = Cell(settings.batch, settings.input_len, settings.output_len)

    def load(c: Candidate):
        options = {"device": settings.device, **c.options}
        return build(EngineSpec(c.label, "ours", c.model, options), settings.batch, max_len, progress=False)

    reference = load(Candidate("float32", model, {"dtype": "float32"}))
    tokenizer = reference.tokenizer
    text = read_text(settings.data)
    ids = _scorable(tokenizer.encode(text)[:settings.tokens], settings.data, "held-in")
    check_ids = _scorable(token_ids(reference.llm, settings.check_data, settings.tokens), settings.check_data,
                          "check") if settings.check_data else []  # refused now, not after every candidate ran
    prompts = _prompts(text, settings.data, tokenizer, settings.input_len, settings.batch)
    ref_ppl, ref_picks = score(reference.llm, ids, settings.window, settings.stride, progress, "float32")
    rows = [{"config": "float32", "model": model, "options": {"dtype": "float32"}, "perplexity": ref_ppl,
             "perplexity_change_pct": 0.0, "top1_agreement": 1.0}]
    pending = candidates(model, source.kind, half_dtypes(device), calibrated)

    def measure(c: Candidate, row: dict, engine) -> None:
        """Scores a loaded candidate into `row` and, within the budget, times it against float32 (and queues its
        int8 KV twin)."""
        ppl, picks = score(engine.llm, ids, settings.window, settings.stride, progress, c.label)
        row.update(perplexity=ppl, perplexity_change_pct=100 * (ppl / ref_ppl - 1),
                   top1_agreement=(picks == ref_picks).float().mean().item(),
                   weight_bytes_per_decode_step=engine.weight_bytes_read(settings.batch))
        _decode_form(row, rows)
        if row["perplexity_change_pct"] > settings.budget_pct:
            return
        if "kv_cache_dtype" not in c.options:
            pending.insert(0, with_int8_kv(c))
        with tqdm(total=settings.warmup + settings.runs, desc=f"timing {c.label} against float32", unit="pair",
                  disable=not progress, file=sys.stderr) as bar:
            ref_speed, speed = race(reference, engine, prompts, cell, settings.runs, settings.warmup, bar.update)
        for name, k in OBJECTIVES.items():
            row[k] = speed[k]
            row[f"{name}_vs_float32_runs"] = paired_ratios(ref_speed, speed, name)
            row[f"{name}_vs_float32"] = statistics.median(row[f"{name}_vs_float32_runs"])
        rows[0].setdefault("timings", []).append({k: ref_speed[k] for k in OBJECTIVES.values()})

    while pending:
        c = pending.pop(0)
        row = {"config": c.label, "model": c.model, "options": c.options}
        rows.append(row)
        try:
            engine = load(c)
        except InferRecipesError as e:
            row["skipped"] = str(e)
            log(f"{c.label}: not here ({e})")
            continue
        try:
            measure(c, row, engine)
        except Exception as e:  # one candidate failing while scored or timed costs its row, not the whole run
            for key in [k for k in row if k not in ("config", "model", "options")]:
                del row[key]
            row["skipped"] = f"failed while measured: {type(e).__name__}: {e}"
        log(_line(row, settings.budget_pct))
        del engine
        release_memory()
    ref = rows[0]
    ref["weight_bytes_per_decode_step"] = reference.weight_bytes_read(settings.batch)
    for name, k in OBJECTIVES.items():  # float32's own speed: the median over every window it ran in
        ref[k] = statistics.median(t[k] for t in ref.get("timings", [])) if ref.get("timings") else None
        ref[f"{name}_vs_float32"] = 1.0
    if settings.check_data:
        check_ref = {}

        def check(row: dict) -> None:
            """Scores `row` (every form of it; the worse counts) and, the first time, float32 on the check text."""
            if not check_ref:
                check_ref["ppl"], check_ref["picks"] = score(reference.llm, check_ids, settings.window,
                                                             settings.stride, progress, "float32 on the check text")
                rows[0].update(check_perplexity=check_ref["ppl"], check_perplexity_change_pct=0.0,
                               check_top1_agreement=1.0)
            if row is rows[0]:
                return
            scores = []  # (perplexity, top-1 agreement) of each form
            for form in _check_forms(row):
                engine = load(form)
                ppl, picks = score(engine.llm, check_ids, settings.window, settings.stride, progress,
                                   f"{form.label} on the check text")
                scores.append((ppl, (picks == check_ref["picks"]).float().mean().item()))
                del engine
                release_memory()
            ppl, agreement = max(scores)  # the worse form
            row.update(check_perplexity=ppl, check_perplexity_change_pct=100 * (ppl / check_ref["ppl"] - 1),
                       check_top1_agreement=agreement)
            holds = row["check_perplexity_change_pct"] <= settings.budget_pct
            log(f"{row['config']} on {settings.check_data}: perplexity {ppl:.3f} "
                f"({row['check_perplexity_change_pct']:+.2f} % against float32's {check_ref['ppl']:.3f}): "
                + ("holds" if holds else f"over the {settings.budget_pct:g} % budget, choosing again"))

        chosen = checked_choice(rows, settings.budget_pct, settings.objective, check)
    else:
        chosen = choose(rows, settings.budget_pct, settings.objective)
    return {"model": model, "source": source.name, "device": device.type, "budget_pct": settings.budget_pct,
            "objective": settings.objective, "data": settings.data, "tokens": len(ids), "batch": settings.batch,
            "input_len": settings.input_len, "output_len": settings.output_len, "runs": settings.runs,
            "calibrate": calibrate, "check_data": settings.check_data, "check_tokens": len(check_ids),
            "rows": rows, "chosen": chosen["config"],
            "fastest": fastest(rows, settings.budget_pct, settings.objective)["config"],
            "seconds": time.perf_counter() - start}


def _decode_form(row: dict, rows: list[dict]) -> None:
    """int4-w8a8 scores a text with its w8a8 form (every window is a prefill) but decodes with int4: its accuracy
    is the worse of the two, so the int4 row of the same options stands for it when that one is worse."""
    if row["options"].get("quantization") != "int4-w8a8":
        return
    twin = next((r for r in rows if "perplexity" in r and r["model"] == row["model"]
                 and r["options"] == {**row["options"], "quantization": "int4"}), None)
    if twin is not None and twin["perplexity_change_pct"] > row["perplexity_change_pct"]:
        row.update({k: twin[k] for k in ("perplexity", "perplexity_change_pct", "top1_agreement")},
                   scored_as=twin["config"])


def _line(row: dict, budget: float) -> str:
    if "skipped" in row:
        return f"{row['config']}: not here ({row['skipped']})"
    speed = (f", decode x{row['decode_vs_float32']:.2f}, prefill x{row['prefill_vs_float32']:.2f} of float32"
             if row.get("decode_vs_float32") is not None else f", over the {budget:g} % budget: not timed")
    return (f"{row['config']}: perplexity {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f} %), top-1 "
            f"agreement {row['top1_agreement']:.3f}{speed}")


def table(result: dict) -> list[str]:
    """The markdown table of every row, the chosen one marked; with a check text, a column of the rows scored on it."""
    checked = bool(result.get("check_data"))
    extra = " check change |" if checked else ""
    lines = ["| config | perplexity | change |" + extra + " top-1 agreement | decode tok/s | x float32 | "
             "prefill tok/s | x float32 | weight MB / step |",
             "| --- | ---: | ---: |" + " ---: |" * checked + " ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['config']} | not here: {r['skipped'][:80]} | |" + " |" * checked + " | | | | | |")
            continue

        def num(k: str, fmt: str) -> str:
            return format(r[k], fmt) if r.get(k) is not None else "not timed"
        mark = " (chosen)" if r["config"] == result["chosen"] else ""
        mark += f" [scored as {r['scored_as']}]" if r.get("scored_as") else ""
        check = ""
        if checked:
            change = r.get("check_perplexity_change_pct")
            check = " |" if change is None else \
                f" {change:+.2f} %{' (over)' if change > result['budget_pct'] else ''} |"
        lines.append(f"| {r['config']}{mark} | {r['perplexity']:.3f} | {r['perplexity_change_pct']:+.2f} % |{check} "
                     f"{r['top1_agreement']:.3f} | {num('decode_tokens_per_s', '.1f')} | "
                     f"{num('decode_vs_float32', '.2f')} | {num('prefill_tokens_per_s', '.1f')} | "
                     f"{num('prefill_vs_float32', '.2f')} | {r['weight_bytes_per_decode_step'] / 1e6:.1f} |")
    return lines


def why(result: dict) -> str:
    """One line on why the chosen row won: it was the fastest, or the most accurate of those tied with it."""
    within = f"within +{result['budget_pct']:g} % perplexity"
    if result.get("check_data"):
        within += " on both texts"
    if result["chosen"] == result.get("fastest", result["chosen"]):
        line = f"chosen: {result['chosen']} (the fastest {result['objective']} {within})"
    else:
        line = (f"chosen: {result['chosen']} (the most accurate of the configurations {within} whose "
                f"{result['objective']} speed the timed runs cannot tell from the fastest, {result['fastest']})")
    over = [r for r in result["rows"] if r.get("check_perplexity_change_pct", 0.0) > result["budget_pct"]]
    if over:
        line += (f"; over the budget on {os.path.basename(result['check_data'])}, so set aside: "
                 + ", ".join(f"{r['config']} ({r['check_perplexity_change_pct']:+.2f} %)" for r in over))
    return line


def recipe_text(result: dict, name: str) -> str:
    """The chosen configuration as a recipe (checked by parsing it back), the table as comments above it."""
    from ..recipe import parse_recipe

    row = next(r for r in result["rows"] if r["config"] == result["chosen"])
    options = dict(row["options"])
    optimization = {k: options.pop(k) for k in ("quantization", "quantization_skip", "kv_cache_dtype")
                    if k in options}
    doc = {"name": name,
           "description": f"Chosen by `infer-recipes tune` ({result['objective']} speed at batch {result['batch']}, "
                          f"{result['input_len']}-token prompts, within +{result['budget_pct']:g} % perplexity of "
                          f"float32 on {result['tokens']} tokens of {os.path.basename(result['data'])}"
                          + (f" and {result['check_tokens']} of {os.path.basename(result['check_data'])}"
                             if result.get("check_data") else "") + "): "
                          f"{row['config']}.",
           "model": {"name": row["model"], "dtype": options.pop("dtype", "float32"), "device": result["device"]}}
    if row["model"] == result["model"]:  # a calibrated checkpoint runs in its own scheme: nothing to state
        optimization.setdefault("quantization", "none")
    if optimization:
        doc["optimization"] = optimization
    doc["scheduler"] = {"max_batch_size": max(result["batch"], 8)}
    header = [f"# infer-recipes tune --model {result['model']} --accuracy-budget {result['budget_pct']:g} "
              f"--data {result['data']} --batch {result['batch']}"
              + (f" --check-data {result['check_data']}" if result.get("check_data") else ""),
              f"# every configuration tried on this host ({result['seconds']:.0f} s); decode and prefill timed "
              f"against float32, alternating, {result['runs']} runs each:", "#"]
    text = "\n".join(header + [f"# {line}" for line in table(result)]) + "\n" + \
        yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
    parse_recipe(text, f"the tuned recipe {name}")
    return text
