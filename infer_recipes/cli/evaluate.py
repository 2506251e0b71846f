"""`eval perplexity | agreement | squad | cmrc | compare`: accuracy, as the evaluation library measures it."""
from __future__ import annotations

import argparse
import json

from .common import _add_engine_args, _llm, _load, _model_and_options, _print_result, _progress


def _add_qa_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--limit", type=int, default=None, help="the first N questions of the file")
    p.add_argument("--batch-size", type=int, default=None,
                   help="questions in flight at once on the engine (default 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer at most (default 32)")
    p.add_argument("--shots", type=int, default=3, help="fixed demonstrations (made-up context, never from the "
                   "data) before the question, 0-3 (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def cmd_eval_perplexity(args) -> int:
    from ..eval.perplexity import perplexity, read_text

    read_text(args.data)  # a bad path fails before the slow load
    result = perplexity(_llm(args), args.data, args.max_tokens, args.window, args.stride, progress=_progress())
    return _print_result(args, result, f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
                         f"({result['seconds']:.1f} s, window {result['window']}, stride {result['stride']})")


def cmd_eval_agreement(args) -> int:
    from ..engine.llm import LLM
    from ..eval.perplexity import agreement, read_text

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
    from ..eval.qa import answer_questions, load_qa, report, write_outputs

    task = args.eval_command  # squad | cmrc
    examples = load_qa(args.data, args.limit)  # a bad file fails before the slow load
    spec, options = _model_and_options(args)
    batch_size = args.batch_size or options.get("max_batch_size") or 16
    options["max_batch_size"] = max(batch_size, options.get("max_batch_size") or 0)
    llm = _load(spec, options)
    lang = "zh" if task == "cmrc" else "en"
    results, seconds = answer_questions(llm, examples, lang, args.shots, batch_size, args.max_tokens,
                                        progress=_progress())
    stats = llm.engine.stats()
    hit_rate = stats["prefix_cache_hits"] / stats["prefix_cache_queries"] if stats["prefix_cache_queries"] else None
    result = report(task, examples, results, seconds, data=args.data, model=llm.source.name,
                    prefix_cache_hit_rate=hit_rate,
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
          + (f", prefix cache hit rate {hit_rate:.0%}" if hit_rate is not None else "")
          + (f"; predictions.json, metrics.json, answers.jsonl, data.json in {args.out}" if args.out else ""))
    return 0


def cmd_eval_compare(args) -> int:
    from pathlib import Path

    from ..errors import InferRecipesError
    from ..eval.compare import compare, table
    from ..eval.qa import detect_language, load_qa
    from ..serving.deployment import model_spec
    from ..serving.pool import log_stderr

    if len(args.models) != 2:
        raise InferRecipesError(f"--models takes two models (A B), got {len(args.models)}")
    examples = load_qa(args.data, args.limit)
    args.batch_size = args.batch_size or 16
    specs = [model_spec(m, {"max_batch_size": args.batch_size,
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


def register(sub) -> None:
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
    q = ev.add_parser("compare", help="two models alone, served at once, and as a cascade, on the same "
                      "questions: latency, p99, questions/s, EM, F1, memory; the cascade's EM/F1 per threshold")
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
