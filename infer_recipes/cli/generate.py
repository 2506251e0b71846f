"""`generate`, `chat`, `run` (a recipe), `info` and `recipes`: text out of a model, and what is shipped."""
from __future__ import annotations

import json
import sys
import time

from ..loading.source import DEFAULT_MODEL
from .common import MODEL_HELP, _add_engine_args, _add_sampling_args, _llm, _load, _progress, _sampling


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


def cmd_recipes(args) -> int:
    from ..recipe import load_recipe, shipped

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
    from ..optimizer import run_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    prompts = args.prompt or recipe.prompts()
    if not prompts:
        from ..errors import InferRecipesError

        raise InferRecipesError(f"recipe {recipe.name} has no data.prompts or data.prompts_file: give --prompt")
    recipe.data.sampling_params()  # a bad sampling section fails before the slow load
    llm = _load(recipe.model, recipe.llm_kwargs(), label=f"recipe {recipe.name}: ")
    outputs, summary = run_recipe(llm, recipe, prompts, progress=_progress())
    if args.json:
        print(json.dumps({**summary, "outputs": [{"prompt": p, "text": o.text, "finish_reason": o.finish_reason}
                                                 for p, o in zip(prompts, outputs)]}, ensure_ascii=False))
        return 0
    for p, o in zip(prompts, outputs):
        print(f"> {p}\n{o.text.strip()}\n")
    print(f"{summary['prompts']} prompts, {summary['generated_tokens']} tokens in {summary['seconds']:.2f} s "
          f"({summary['tokens_per_s']:.1f} tok/s, "
          f"batch <= {summary['max_batch_size']}), median TTFT {summary['median_ttft_s'] or 0:.3f} s, weights "
          f"{summary['weight_bytes'] / 1e6:.1f} MB, peak memory {summary['peak_memory_bytes'] / 1e6:.0f} MB")
    return 0


def cmd_info(args) -> int:
    from ..loading import resolve_model_source
    from ..loading.weights import read_config
    from ..runner import kv_bytes_per_token

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
            "kv_cache_bytes_per_token_fp32": int(kv_bytes_per_token(cfg, 4))}
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


def register(sub) -> None:
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

    p = sub.add_parser("run", help="run a recipe: load its model with its switches and generate for its prompts")
    p.add_argument("recipe", help="a recipe file or shipped name, e.g. smollm2-135m-instruct/int8")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. optimization.quantization=int4 (repeatable)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="instead of the recipe's prompts (repeatable)")
    p.add_argument("--json", action="store_true", help="print the outputs and the timings as one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("recipes", help="list the recipes shipped with the package")
    p.add_argument("--verbose", "-v", action="store_true", help="with each recipe's description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("info", help="architecture, parameter count, bytes per dtype, context length")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
