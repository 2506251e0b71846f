"""`bench latency | sweep | ablation | roofline | serve`, `profile` and `plan`: measurements and the deployment
planner."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import DTYPES
from ..loading.source import DEFAULT_MODEL
from .common import (
    MODEL_HELP,
    _add_engine_args,
    _add_switch_args,
    _flag_options,
    _model_and_options,
    _progress,
    _set_threads,
)


def cmd_bench_serve(args) -> int:
    import asyncio
    from pathlib import Path

    from ..bench import serve as bench

    slo = bench.parse_slo(args.slo)
    if args.dataset == "squad":
        prompts = bench.squad_prompts(Path(args.dataset_path) if args.dataset_path else bench.DEFAULT_SQUAD,
                                      args.num_prompts, args.seed)
    else:
        prompts = bench.random_prompts(args.num_prompts, args.input_len, args.seed)
    models = [m for m in args.model.split(",") if m]
    if args.duration is not None:
        report = asyncio.run(bench.soak(args.url.rstrip("/"), models, prompts, args.output_len, args.duration,
                                        args.max_concurrency, args.bad_fraction, args.abandon_fraction,
                                        args.window, args.api_key, args.seed, progress=_progress()))
        text, ok = bench.format_soak(report), report["unexpected"] == 0
    else:
        from ..errors import InferRecipesError

        if len(models) != 1 or args.bad_fraction or args.abandon_fraction:
            raise InferRecipesError("several models, --bad-fraction and --abandon-fraction go with --duration "
                                    "(a soak run)")
        rate = float("inf") if args.request_rate == "inf" else float(args.request_rate)
        report = asyncio.run(bench.run(args.url.rstrip("/"), models[0], prompts, args.output_len, rate,
                                       args.max_concurrency, args.api_key, slo, args.seed, progress=_progress()))
        text, ok = bench.format_report(report), report["failed"] == 0
    if args.label:
        report["label"] = args.label
    if args.out:
        Path(args.out).write_text(bench.to_json(report), encoding="utf-8")
    print(bench.to_json(report) if args.json else text)
    return 0 if ok else 1


def _add_bench_args(p: argparse.ArgumentParser, input_lens: list[int], multi_recipe: bool = True,
                    grid: bool = True) -> None:
    p.add_argument("--model", "-m", nargs="+", default=None,
                   help=MODEL_HELP + " (one or more; default: the recipe's model, or smollm2-135m-instruct)")
    p.add_argument("--recipe", nargs="+" if multi_recipe else None, default=None,
                   help="recipe file(s) or shipped name(s) for our engine; flags given here override each")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (repeatable)")
    p.add_argument("--device", default=None, help="auto (cuda, then npu, then cpu), cpu, cuda or npu")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    _add_switch_args(p)
    if grid:
        p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
        p.add_argument("--input-lens", type=int, nargs="+", default=input_lens)
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per sequence (EOS ignored)")
    _add_measure_args(p)


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="en", help="en: cut from SQuAD contexts, zh: from CMRC 2018 contexts "
                   "(../shared/data), or a UTF-8 text file")
    p.add_argument("--runs", type=int, default=3, help="measured runs per cell (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per cell (16 tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip peak memory (measured in a child process per engine)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="skip the bandwidth / FLOP/s measurement and the roofline column")
    p.add_argument("--out", default=None, help="directory for results.json, results.csv, report.md and plots")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")


def _bench_targets(args):
    from ..bench.suite import Target
    from ..errors import InferRecipesError
    from ..recipe import load_recipe

    recipes = args.recipe if isinstance(args.recipe, list) else [args.recipe]
    if args.set and not any(recipes):
        raise InferRecipesError("--set overrides a recipe's values: give --recipe too")
    targets = []
    for name in recipes:
        options, model, label = {}, DEFAULT_MODEL, "ours"
        if name:
            recipe = load_recipe(name, args.set)
            options, model, label = recipe.llm_kwargs(), recipe.model, recipe.name
        options = {**options, **_flag_options(args)}
        for m in args.model or [model]:
            targets.append(Target(label, m, options, name))
    seen = set()
    for t in targets:
        if (t.label, t.model) in seen:
            raise InferRecipesError(f"{t.label} on {t.model} is given twice")
        seen.add((t.label, t.model))
    return targets


def _bench_setup(args):
    from ..bench.prompts import load_prompt_set
    from ..distributed import launched

    _set_threads(args)
    if launched() and args.memory:
        print("note: peak memory is measured in a child process per engine, which cannot join this torchrun "
              "world: skipped (--no-memory)", file=sys.stderr)
        args.memory = False
    return load_prompt_set(args.prompts)


def _bench_finish(args, result: dict, text: str) -> int:
    from ..bench import report

    if args.out:
        files = report.write(args.out, result)
        print(f"wrote {', '.join(files)} to {args.out}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False) if args.json else text)
    return 0


def cmd_bench_latency(args) -> int:
    from ..bench import report, suite
    from ..bench.latency import grid

    prompts = _bench_setup(args)
    result = suite.latency(_bench_targets(args), grid(args.batch_sizes, args.input_lens, args.output_len), prompts,
                           args.runs, args.warmup, args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_sweep(args) -> int:
    from ..bench import report, suite
    from ..bench.latency import grid

    prompts = _bench_setup(args)
    result = suite.sweep(_bench_targets(args), args.baseline, args.baseline_dtype,
                         grid(args.batch_sizes, args.input_lens, args.output_len), prompts, args.runs, args.warmup,
                         args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_ablation(args) -> int:
    from ..bench import report, suite
    from ..bench.latency import grid

    prompts = _bench_setup(args)
    grid([args.batch], [args.input_len], args.output_len)  # the same checks as the grid commands
    result = suite.ablation(args.model, args.device or "auto", args.steps or list(suite.STEPS), args.batch, args.input_len,
                            args.output_len, prompts, args.runs, args.warmup, args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_roofline(args) -> int:
    from ..bench import report, suite
    from ..bench.latency import grid
    from ..bench.roofline import decode_bytes, format_machine

    prompts = _bench_setup(args)
    targets = _bench_targets(args)
    result = suite.latency(targets, grid(args.batch_sizes, [args.input_len], args.output_len), prompts, args.runs,
                           args.warmup, False, True, _progress())
    lines = [format_machine(result["machine"]), "",
             "| engine | model | batch | context | weights MB read / step | KV MB read / step | bound decode tok/s | "
             "achieved decode tok/s | fraction |", "|" + " --- |" * 9]
    for r in result["rows"]:
        kv = decode_bytes(0, r["kv_bytes_per_token"], r["batch"], r["input_len"], r["output_len"])
        lines.append(f"| {r['engine']} | {r['model']} | {r['batch']} | {r['input_len']}+{r['output_len']} | "
                     f"{r['weight_bytes_per_decode_step'] / 1e6:.1f} | {kv / 1e6:.1f} | "
                     f"{r['decode_bound_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{100 * r['roofline_fraction']:.0f} % |")
    return _bench_finish(args, result, "\n".join(lines) + "\n\n" + report.markdown(result))


def cmd_profile(args) -> int:
    from .. import profile

    _set_threads(args)
    spec, options = _model_and_options(args)
    result = profile.run(spec, options, args.phase, args.batch_size, args.input_len, args.steps, args.prompts,
                         args.top, args.out, args.roofline, _progress())
    print(json.dumps(result, ensure_ascii=False) if args.json else profile.format_result(result))
    return 0


def cmd_plan(args) -> int:
    from .. import plan
    from ..loading import resolve_model_source
    from ..loading.weights import read_config
    from ..models.registry import PRESETS

    spec = f"synthetic:{args.model}" if args.model in PRESETS else args.model
    config = read_config(resolve_model_source(spec))
    bandwidth, efficiency, calibrated = args.bandwidth, args.efficiency, None
    if args.calibrate:
        calibrated = plan.calibrate(args.calibrate)
        bandwidth = bandwidth or calibrated["bandwidth_gbs"]
        efficiency = efficiency or calibrated["efficiency"]
    hw = plan.Hardware(args.devices, args.device_memory, bandwidth or 2000.0, args.link, args.link_latency_us,
                       efficiency=efficiency or 1.0)
    scheme = args.quantization or args.dtype
    layouts = plan.plan(config, hw, scheme, args.kv_dtype, args.batch, args.context)
    if args.json:
        print(json.dumps({"model": args.model, "scheme": scheme, "kv_dtype": args.kv_dtype, "batch": args.batch,
                          "context": args.context, "calibrated_from": calibrated, **plan.to_json(layouts, hw)}))
        return 0
    print(plan.format_table(args.model, layouts, hw, scheme, args.kv_dtype, args.batch, args.context))
    if calibrated:
        print(f"- bandwidth and efficiency calibrated from {args.calibrate} ({calibrated['device_name']}; "
              "efficiency = the median fraction of the roof our decode reached there)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="measurements: latency grids, a recipe against a baseline, the ablation, the "
                       "roofline, load against a running server")
    bench = p.add_subparsers(dest="bench_command", required=True)
    q = bench.add_parser("latency", help="TTFT, TPOT, latency, tokens/s, peak memory, roofline fraction, energy "
                         "per batch size and input length, for one or more recipes")
    _add_bench_args(q, [16, 64, 256, 512])
    q.set_defaults(func=cmd_bench_latency)
    q = bench.add_parser("sweep", help="a recipe against a baseline (transformers, our engine with every switch off, "
                         "or llama.cpp): latency, throughput and memory change per model and batch size")
    _add_bench_args(q, [512], multi_recipe=False)
    q.add_argument("--baseline", choices=["transformers", "off", "llama.cpp"], default="transformers")
    q.add_argument("--baseline-dtype", choices=DTYPES, default="float32",
                   help="dtype of the transformers / off baseline (default float32)")
    q.set_defaults(func=cmd_bench_sweep)
    q = bench.add_parser("ablation", help="each optimization alone and cumulatively: which switch bought what")
    q.add_argument("--model", "-m", default=DEFAULT_MODEL, help=MODEL_HELP)
    q.add_argument("--device", default=None, help="auto (cuda, then npu, then cpu), cpu, cuda or npu")
    q.add_argument("--steps", nargs="+", default=None,
                   help="the switches, in the order the cumulative chain adds them (default: kv_cache fusion compile "
                        "bf16 int8 w8a8 int4 kernels batching, every one)")
    q.add_argument("--batch", type=int, default=8, help="sequences for the batching step (others run batch 1)")
    q.add_argument("--input-len", type=int, default=128)
    q.add_argument("--output-len", type=int, default=32)
    _add_measure_args(q)
    q.set_defaults(func=cmd_bench_ablation)
    q = bench.add_parser("roofline", help="this machine's bandwidth and matmul FLOP/s, and a model's decode against "
                         "the bandwidth bound: bytes per step, bound tokens/s, achieved fraction")
    _add_bench_args(q, [512], grid=False)
    q.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    q.add_argument("--input-len", type=int, default=512)
    q.set_defaults(func=cmd_bench_roofline)
    q = bench.add_parser("serve", help="Poisson load against a running server: throughput, TTFT, TPOT, ITL, "
                         "latency, goodput")
    q.add_argument("--url", default="http://127.0.0.1:8000")
    q.add_argument("--model", required=True, help="the served model name to load (a soak run: several, "
                   "comma-separated, taken in turn)")
    q.add_argument("--num-prompts", type=int, default=32)
    q.add_argument("--request-rate", default="inf", help="requests per second (Poisson), or inf: all at once")
    q.add_argument("--max-concurrency", type=int, default=16)
    q.add_argument("--dataset", choices=["squad", "random"], default="squad",
                   help="SQuAD contexts + questions from ../shared/data, or random words")
    q.add_argument("--dataset-path", default=None, help="a SQuAD-format JSON file (default: ../shared/data)")
    q.add_argument("--input-len", type=int, default=128, help="words per random prompt")
    q.add_argument("--output-len", type=int, default=64, help="tokens generated per request (EOS ignored)")
    q.add_argument("--slo", default=None, help="goodput counts requests within e.g. ttft=0.5,tpot=0.05 (seconds)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--api-key", default=os.environ.get("INFER_RECIPES_API_KEY"))
    q.add_argument("--duration", type=float, default=None, help="a soak run: keep --max-concurrency clients busy "
                   "for this many seconds instead of sending --num-prompts (the prompts are reused)")
    q.add_argument("--bad-fraction", type=float, default=0.0, help="soak: this share of requests is malformed "
                   "and must be refused cleanly (4xx with the error object)")
    q.add_argument("--abandon-fraction", type=float, default=0.0, help="soak: this share of requests is dropped "
                   "by its client after 0.05-1 s")
    q.add_argument("--window", type=float, default=30.0, help="soak: seconds per row of the report")
    q.add_argument("--label", default=None, help="a name for this run, kept in the JSON")
    q.add_argument("--out", default=None, help="also write the JSON report to this file")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("profile", help="torch.profiler over a few prefill or decode steps: top operators by self "
                       "time, a Chrome trace, and whether the phase is memory- or compute-bound")
    _add_engine_args(p)
    p.add_argument("--phase", choices=["prefill", "decode"], default="decode")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled (prefill: batches profiled)")
    p.add_argument("--prompts", default="en", help="en, zh or a text file (as for bench)")
    p.add_argument("--top", type=int, default=15, help="operators in the table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the verdict's measurement")
    p.add_argument("--out", default=None, help="directory for trace.json (Chrome trace) and profile.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="deployment planner: memory per device, largest batch and context, and a "
                       "roofline estimate of decode speed for one device, TP, PP and TP x PP")
    p.add_argument("--model", "-m", required=True, help="a preset (llama-2-7b, llama-2-70b, llama-3.2-1b, "
                   "llama-3.2-3b, ...), or any model spec as for generate (only its config is read)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--device-memory", type=float, default=80.0, help="GB per device (default 80)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bandwidth per device, GB/s (default 2000, or --calibrate's measurement)")
    p.add_argument("--link", type=float, default=300.0, help="device-to-device bandwidth, GB/s (default 300)")
    p.add_argument("--link-latency-us", type=float, default=10.0, help="per message (default 10 us)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--quantization", choices=["int8", "w8a8", "int4"], default=None)
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16", "float16", "int8"], default="bfloat16")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together for the estimate")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the batch and estimate")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of the bandwidth roof the kernels reach (default 1, or --calibrate's)")
    p.add_argument("--calibrate", default=None, help="a bench roofline / latency results.json: its measured "
                   "bandwidth and our median roofline fraction replace the defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
