"""`infer-recipes profile`: torch.profiler over a few prefill or decode steps of the engine, the top operators by
self time, a Chrome trace, and a verdict against the roofline (memory- or compute-bound, fraction of that roof)."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import kernels
from .bench import roofline
from .bench.engines import EngineSpec, OurEngine
from .bench.prompts import load_prompt_set
from .config import EngineConfig, SamplingParams
from .device import synchronize
from .errors import InferRecipesError


def _steps_until(engine, done) -> int:
    n = 0
    while not done():
        engine.step()
        n += 1
    return n


def _top_ops(prof, device: torch.device, top: int) -> tuple[list[dict], float, int]:
    """The `top` operators by self time, the total self time (ms) and the operator calls (nested ones included:
    aten::linear and the aten::addmm under it count two; the number a step pays dispatch for)."""
    accel = device.type in ("cuda", "npu")
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    attr = "self_device_time_total" if accel else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1e3,
             "share": getattr(e, attr) / total} for e in rows], total / 1e3, sum(e.count for e in events)


@torch.inference_mode()
def run(model: str, options: dict, phase: str, batch: int, input_len: int, steps: int, prompts_spec: str,
        top: int = 15, out_dir: str | None = None, roofline_on: bool = True, progress: bool = True) -> dict:
    if phase not in ("prefill", "decode"):
        raise InferRecipesError(f"--phase must be prefill or decode, got {phase!r}")
    if batch < 1 or input_len < 1 or steps < 1 or top < 1:
        raise InferRecipesError("--batch-size, --input-len, --steps and --top must be positive")
    prompt_set = load_prompt_set(prompts_spec)
    machine = roofline.measure_machine(_device(options), quick=True) if roofline_on else None
    # chunked prefill starts the sequences of a batch some steps apart: the first ones are that many tokens ahead, so
    # each gets room for that lead on top of the timed steps, and no sequence finishes while steps are timed
    budget = options.get("max_num_batched_tokens") or EngineConfig.max_num_batched_tokens
    lead = -(-batch * input_len // budget) + 1 if phase == "decode" else 0
    max_len = input_len + 2 * steps + lead + 2
    eng = OurEngine(EngineSpec("ours", "ours", model, options), batch, max_len, progress)
    llm, engine, device = eng.llm, eng.llm.engine, eng.device
    prompts = prompt_set.prompts(llm.tokenizer, input_len, batch)
    cfg = llm.model_config
    for p in prompts:  # warm-up: one short generation of the same shape
        engine.add_request(p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    _steps_until(engine, lambda: not engine.has_unfinished_requests())

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times, engine_steps = [], []

    def timed(work) -> float:
        synchronize(device)
        t = time.perf_counter()
        work()
        synchronize(device)
        return time.perf_counter() - t

    if phase == "prefill":
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

        def one_prefill() -> None:
            for p in prompts:
                engine.add_request(p, params)
            engine_steps.append(_steps_until(engine, lambda: not engine.has_unfinished_requests()))

        # timed without the profiler first (its hooks slow every op), then the same work profiled
        times = [timed(one_prefill) for _ in range(steps)]
        with profile(activities=activities, record_shapes=False) as prof:
            profiled = [timed(one_prefill) for _ in range(steps)]
        tokens = batch * input_len
        weights = eng.weight_bytes_read(batch * input_len)  # per engine step: prefill is chunked by the budget
        bytes_moved = statistics.median(engine_steps) * weights + tokens * eng.kv_bytes_per_token()
        flops = tokens * roofline.matmul_flops_per_token(cfg, input_len / 2)
        unit = f"prefill of {batch} x {input_len} tokens"
    else:
        params = SamplingParams(max_tokens=2 * steps + lead + 1, temperature=0.0, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        started: set[str] = set()
        finished = 0

        def prefilled() -> bool:
            for out in engine.step():
                if out.token_ids:
                    started.add(out.request_id)
            return len(started) == len(ids)

        def decode_step() -> None:
            nonlocal finished
            finished += sum(out.finished for out in engine.step())

        while not prefilled():
            pass
        times = [timed(decode_step) for _ in range(steps)]
        with profile(activities=activities, record_shapes=False) as prof:
            profiled = [timed(decode_step) for _ in range(steps)]
        if finished:
            raise InferRecipesError(f"{finished} of {batch} sequences finished while decode steps were timed (a "
                                    f"prefill budget below the one assumed): the steps would not be of batch {batch}")
        for request_id in ids:
            engine.abort_request(request_id)
        context = input_len + 1 + steps
        bytes_moved = roofline.decode_bytes(eng.weight_bytes_read(batch), eng.kv_bytes_per_token(), batch, context, 0)
        flops = batch * roofline.matmul_flops_per_token(cfg, context)
        unit = f"decode step of batch {batch} at context ~{context:.0f}"
    seconds = statistics.median(times)
    ops, total_ms, calls = _top_ops(prof, device, top)
    opts = llm.engine_config
    result = {"model": llm.source.name, "phase": phase, "batch": batch, "input_len": input_len, "steps": steps,
              "device": device.type, "dtype": eng.dtype, "quantization": opts.quantization, "fusion": opts.fusion,
              "compile": opts.compile, "kv_cache": opts.kv_cache,
              "kernels": "native" if kernels.wanted(opts.kernels, device) else "torch", "unit": unit,
              "seconds_per_unit": seconds,
              "times": times, "profiled_times": profiled, "profiled_self_ms": total_ms, "top_ops": ops,
              "operator_calls_per_unit": calls / len(profiled),
              "machine": machine, "verdict": None,
              "trace": None}
    if machine:
        dtype = roofline.compute_dtype(eng.dtype, opts.quantization, phase)
        result["verdict"] = roofline.verdict(machine, seconds, bytes_moved, flops, dtype)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / "trace.json"))
        result["trace"] = str(out / "trace.json")
        (out / "profile.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        if progress:
            print(f"wrote {out / 'trace.json'} (open in chrome://tracing or ui.perfetto.dev) and profile.json",
                  file=sys.stderr)
    return result


def _device(options: dict) -> torch.device:
    from .device import resolve_device

    return resolve_device(options.get("device") or "auto")


def verdict_line(result: dict) -> str:
    v = result["verdict"]
    if v is None:
        return f"{result['phase']}: no verdict (roofline measurement skipped)"
    return (f"{result['phase']}: {v['bound']}-bound: {v['intensity_flop_per_byte']:.1f} FLOP/byte against a machine "
            f"balance of {v['machine_balance_flop_per_byte']:.1f} ({v['dtype']} matmul); the {result['unit']} takes "
            f"{v['measured_seconds'] * 1e3:.1f} ms where the {v['bound']} roof allows {v['roof_seconds'] * 1e3:.2f} "
            f"ms: {100 * v['fraction_of_roof']:.0f} % of the roof")


def format_result(result: dict) -> str:
    head = (f"{result['model']} {result['phase']}, batch {result['batch']}, input {result['input_len']}, "
            f"{result['device']} {result['dtype']}, quantization {result['quantization'] or 'none'}, "
            f"fusion {'on' if result['fusion'] else 'off'}, compile {'on' if result['compile'] else 'off'}, "
            f"{result['kernels']} kernels: "
            f"{result['seconds_per_unit'] * 1e3:.1f} ms per {result['unit']} (median of {len(result['times'])}; "
            f"{statistics.median(result['profiled_times']) * 1e3:.1f} ms under the profiler)")
    units = f"{len(result['times'])} {'steps' if result['phase'] == 'decode' else 'prefills'}"
    lines = [head, "", f"| operator | calls | self ms ({units}) | share |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.2f} | {100 * o['share']:.1f} % |"
              for o in result["top_ops"]]
    lines += ["", f"{result['operator_calls_per_unit']:.0f} operator calls per {result['unit'].split(' of ')[0]} "
                  "(nested calls included)", verdict_line(result)]
    if result["trace"]:
        lines.append(f"Chrome trace: {result['trace']}")
    return "\n".join(lines)
