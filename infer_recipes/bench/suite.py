"""The three benchmark commands: `latency` (recipes over a grid), `sweep` (a recipe against a baseline: the table of
the CANN write-up) and `ablation` (each switch alone and cumulatively). Each returns the result object that
report.py prints and writes."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InferRecipesError
from . import roofline
from .engines import EngineSpec
from .latency import Bench, Cell, Group
from .prompts import PromptSet

SCHEMA = "infer-recipes.bench/1"
BASELINES = ("transformers", "off", "llama.cpp")
# every switch off: no KV cache (recompute the prefix each step), textbook modules, eager, float32, no quantization
OFF = {"kv_cache": False, "fusion": False, "compile": False, "quantization": None, "dtype": "float32",
       "kernels": "torch"}
QUANT_STEPS = ("int8", "w8a8", "int4")
STEPS = ("kv_cache", "fusion", "compile", "bf16", "int8", "w8a8", "int4", "kernels", "batching")
SYNTHETIC_NOTE = ("synthetic models have random weights in the published shapes: their figures are for speed only "
                  "(speed does not depend on weight values; their outputs are meaningless)")


@dataclass(frozen=True)
class Target:
    """Ours on one model: a label, the model, the LLM options (recipe + overrides), the recipe's name."""

    label: str
    model: str
    options: dict
    recipe: str | None = None

    def spec(self) -> EngineSpec:
        return EngineSpec(self.label, "ours", self.model, self.options, self.recipe)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def metadata(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..device import device_name

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "infer_recipes": ver("infer-recipes"),
            "transformers": ver("transformers"), "llama_cpp_python": ver("llama-cpp-python"),
            "git_commit": _git_commit(), "platform": platform.platform(), "device": device.type,
            "device_name": device_name(device), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "argv": sys.argv[1:],
            "seeds": {"sampling": "greedy (no randomness)", "synthetic_weights": 0,
                      "prompts": "prompt i of a batch starts at text i of the prompt source (deterministic)"}}


def _machine(device: torch.device, enabled: bool, progress: bool) -> dict | None:
    if not enabled:
        return None
    if progress:
        print("measuring memory bandwidth and matmul FLOP/s for the roofline...", file=sys.stderr)
    return roofline.measure_machine(device)


def _result(kind: str, bench: Bench, measured, device: torch.device, prompt_set: PromptSet, models: list[str],
            extra: dict) -> dict:
    energy = bench.energy
    return {"schema": SCHEMA, "command": kind, "meta": metadata(device), "machine": bench.machine,
            "energy": {"available": bool(energy and energy.available), "source": energy.source if energy else "",
                       "why": energy.why if energy else "no engine ran"},
            "prompts": {"kind": prompt_set.kind, "source": prompt_set.source,
                        "tokens_per_char": measured.tokens_per_char},
            "settings": {"runs": bench.runs, "warmup": bench.warmup, "memory": bench.memory},
            "notes": [SYNTHETIC_NOTE] if any(m.startswith("synthetic:") for m in models) else [],
            "engines": measured.engines, "skipped": measured.skipped, "rows": measured.rows, **extra}


def _device_of(targets: list[Target]) -> torch.device:
    from ..device import resolve_device

    return resolve_device(targets[0].options.get("device") or "auto")


def latency(targets: list[Target], cells: list[Cell], prompt_set: PromptSet, runs: int, warmup: int, memory: bool,
            roofline_on: bool, progress: bool) -> dict:
    device = _device_of(targets)
    bench = Bench(prompt_set, runs, warmup, memory, _machine(device, roofline_on, progress), progress)
    models = list(dict.fromkeys(t.model for t in targets))
    groups = [Group(m, [t.spec() for t in targets if t.model == m],
                    {t.label: cells for t in targets if t.model == m}) for m in models]
    measured = bench.measure(groups)
    return _result("latency", bench, measured, device, prompt_set, models, {})


def baseline_spec(baseline: str, target: Target, dtype: str) -> EngineSpec:
    device = target.options.get("device") or "auto"
    if baseline == "transformers":
        return EngineSpec("transformers", "transformers", target.model, {"device": device, "dtype": dtype})
    if baseline == "off":
        return EngineSpec("off", "ours", target.model, {**OFF, "device": device, "dtype": dtype})
    if baseline == "llama.cpp":
        return EngineSpec("llama.cpp", "llama.cpp", target.model, {})
    raise InferRecipesError(f"unknown baseline {baseline!r}: choose one of {', '.join(BASELINES)}")


def sweep(targets: list[Target], baseline: str, baseline_dtype: str, cells: list[Cell], prompt_set: PromptSet,
          runs: int, warmup: int, memory: bool, roofline_on: bool, progress: bool) -> dict:
    """One target per model; the baseline and ours alternate run by run."""
    device = _device_of(targets)
    bench = Bench(prompt_set, runs, warmup, memory, _machine(device, roofline_on, progress), progress)
    groups = []
    for t in targets:
        base = baseline_spec(baseline, t, baseline_dtype)
        if base.label == t.label:
            raise InferRecipesError(f"the recipe label {t.label!r} clashes with the baseline's name")
        groups.append(Group(t.model, [base, t.spec()], {base.label: cells, t.label: cells}))
    measured = bench.measure(groups)
    comparison = compare_rows(measured.rows, [(g.specs[0].label, g.specs[1].label, g.model) for g in groups])
    return _result("sweep", bench, measured, device, prompt_set, [t.model for t in targets],
                   {"baseline": baseline, "comparison": comparison})


def _change(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else 100 * (new - old) / old


def compare_rows(rows: list[dict], pairs: list[tuple[str, str, str]]) -> list[dict]:
    """The CANN table: per model and cell, the baseline's and ours' latency, throughput and memory."""
    index = {(r["engine"], r["model"], r["batch"], r["input_len"]): r for r in rows}
    out = []
    for base_label, ours_label, model in pairs:
        cells = sorted({(r["batch"], r["input_len"]) for r in rows if r["model"] == model})
        for b, n in cells:
            base, ours = index.get((base_label, model, b, n)), index.get((ours_label, model, b, n))
            if ours is None:
                continue
            row = {"model": model, "batch": b, "input_len": n, "output_len": ours["output_len"],
                   "baseline": base_label, "engine": ours_label,
                   "baseline_latency_s": base and base["e2e_s"], "latency_s": ours["e2e_s"],
                   "baseline_tokens_per_s": base and base["output_tokens_per_s"],
                   "tokens_per_s": ours["output_tokens_per_s"],
                   "baseline_memory_bytes": base and base["peak_memory_bytes"],
                   "memory_bytes": ours["peak_memory_bytes"]}
            row["latency_change_pct"] = _change(row["latency_s"], row["baseline_latency_s"])
            row["throughput_change_pct"] = _change(row["tokens_per_s"], row["baseline_tokens_per_s"])
            row["memory_change_pct"] = _change(row["memory_bytes"], row["baseline_memory_bytes"])
            row["speedup"] = row["baseline_latency_s"] / row["latency_s"] if base else None
            out.append(row)
    return out


# ---- ablation -----------------------------------------------------------------------------------------------------
def _with(options: dict, step: str) -> dict:
    o = dict(options)
    if step in ("kv_cache", "fusion", "compile"):
        o[step] = True
    elif step == "bf16":
        o["dtype"] = "bfloat16"
    elif step in ("int8", "w8a8", "int4", "int4-w8a8"):
        o["quantization"] = step
    elif step == "kernels":
        o["kernels"] = "native"
    return o


def _label(options: dict, batch: int) -> str:
    parts = [k for k in ("kv_cache", "fusion", "compile") if options.get(k)]
    if options.get("dtype", "float32") != "float32":
        parts.append({"bfloat16": "bf16", "float16": "fp16"}[options["dtype"]])
    if options.get("quantization"):
        parts.append(options["quantization"])
    if options.get("kernels") == "native":
        parts.append("native")
    return ("+".join(parts) or "off") + (f" @b{batch}" if batch > 1 else "")


def ablation(model: str, device: str, steps: list[str], batch: int, input_len: int, output_len: int,
             prompt_set: PromptSet, runs: int, warmup: int, memory: bool, roofline_on: bool, progress: bool) -> dict:
    """Every configuration once: off; off plus each step alone; and the chain off, +step1, +step1+step2, ...
    A quantization step in the chain replaces the scheme before it (a model holds one), and `batching` runs
    the configuration before it with `batch` sequences instead of one. Configurations run one after another,
    each loaded alone (a dozen copies of a model would not fit in memory together)."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise InferRecipesError(f"unknown ablation step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    if "batching" in steps and batch < 2:
        raise InferRecipesError("the batching step needs --batch of at least 2")
    base = {**OFF, "device": device}
    configs: dict[str, tuple[dict, int]] = {}

    def add(options: dict, b: int) -> str:
        label = _label(options, b)
        configs.setdefault(label, (options, b))
        return label

    off = add(base, 1)
    alone = [{"step": s, "config": add(base, batch) if s == "batching" else add(_with(base, s), 1)} for s in steps]
    chain, current, b = [], base, 1
    for s in steps:
        if s == "batching":
            b = batch
        else:
            current = _with(current, s)
        chain.append({"step": s, "config": add(current, b)})
    dev = _device_of([Target("x", model, base)])
    bench = Bench(prompt_set, runs, warmup, memory, _machine(dev, roofline_on, progress), progress)
    specs = [EngineSpec(label, "ours", model, options) for label, (options, _) in configs.items()]
    cells = {label: [Cell(b, input_len, output_len)] for label, (_, b) in configs.items()}
    measured = bench.measure([Group(model, specs, cells, together=False)])
    by_label = {r["engine"]: r for r in measured.rows}

    def fill(entries: list[dict], chained: bool) -> list[dict]:
        ref = by_label.get(off)
        prev = before_quant = ref
        for e in entries:
            r = by_label.get(e["config"])
            e.update(latency_s=r and r["e2e_s"], tokens_per_s=r and r["output_tokens_per_s"],
                     memory_bytes=r and r["peak_memory_bytes"], batch=r and r["batch"])
            e["vs_off"] = (r["output_tokens_per_s"] / ref["output_tokens_per_s"]) if r and ref else None
            if chained:  # a quantization step is compared with the configuration before any scheme
                quant = e["step"] in QUANT_STEPS
                base = before_quant if quant else prev
                e["vs_previous"] = (r["output_tokens_per_s"] / base["output_tokens_per_s"]) if r and base else None
                if not quant:
                    before_quant = r or before_quant
                prev = r or prev
        return entries

    extra = {"ablation": {"off": off, "batch": batch, "input_len": input_len, "output_len": output_len,
                          "alone": fill(alone, False), "cumulative": fill(chain, True)}}
    return _result("ablation", bench, measured, dev, prompt_set, [model], extra)

