"""`infer-recipes quantize`: a calibrated checkpoint (`infer_recipes.checkpoint`); `infer-recipes tune`: the
fastest configuration within an accuracy budget, written as a recipe (`infer_recipes.eval.tune`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import GROUP_SIZES
from ..loading.source import DEFAULT_MODEL
from .common import _progress, _set_threads


def cmd_quantize(args) -> int:
    from ..checkpoint import quantize_checkpoint

    _set_threads(args)
    report = quantize_checkpoint(args.model, args.scheme, args.calibrate, args.out, samples=args.samples,
                                 seq_len=args.seq_len, group_size=args.group_size,
                                 skip=tuple(args.quantization_skip or ()), progress=_progress(),
                                 use_gptq=args.gptq)
    if args.json:
        print(json.dumps(report))
        return 0
    cal, err = report["calibration"], report["output_error"]
    print(f"{report['method']} for {report['scheme']} on {cal['tokens']} tokens of {cal['file']} "
          f"({cal['windows']} windows of {cal['seq_len']}) in {report['seconds']:.1f} s")
    print("| group | median alpha | output error, scaled / unscaled |\n| --- | ---: | ---: |")
    for kind, row in report["by_kind"].items():
        print(f"| {kind} | {row['median_alpha']:.1f} | {row['error_ratio']:.3f} |")
    print(f"| all | | {err['scaled'] / max(err['unscaled'], 1e-30):.3f} |")
    if "gptq" in report:
        g = report["gptq"]
        print("| linear | GPTQ output error / round-to-nearest's |\n| --- | ---: |")
        for kind, ratio in g["by_kind"].items():
            print(f"| {kind} | {ratio:.3f} |")
        e = g["output_error"]
        print(f"| all {g['linears']} | {e['gptq'] / max(e['round_to_nearest'], 1e-30):.3f} |")
    print(f"wrote {args.out}: load it as --model {args.out} (it runs as {report['scheme']} unless --quantization "
          "names another)")
    return 0


def cmd_tune(args) -> int:
    from ..eval.tune import Settings, recipe_text, table, tune, why

    _set_threads(args)
    out = os.path.abspath(args.out)
    if os.path.isdir(out) or not out.endswith((".yaml", ".yml")):
        from ..errors import InferRecipesError

        raise InferRecipesError(f"--out {args.out}: give the recipe file to write, ending in .yaml")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    settings = Settings(args.accuracy_budget, args.data, args.tokens, args.window, args.window // 2,
                        batch=args.batch, input_len=args.input_len,
                        output_len=args.output_len, runs=args.runs, objective=args.objective, device=args.device,
                        check_data=args.check_data)
    result = tune(args.model, settings, args.calibrate, os.path.dirname(out), progress=_progress(),
                  log=lambda line: print(line, file=sys.stderr))
    name = f"{result['source']}/{os.path.splitext(os.path.basename(out))[0]}"
    text = recipe_text(result, name)
    tmp = out + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    if args.json:
        print(json.dumps({**result, "recipe": out}))
        return 0
    print("\n".join(table(result)))
    print(f"{why(result)}; wrote {args.out}: run it with --recipe {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate a model for a scheme (SmoothQuant for w8a8, activation-aware "
                       "scaling for int4 / int8, then GPTQ for int4 with --gptq) and save it as a checkpoint that "
                       "loads directly",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a model directory, .gguf file or alias")
    p.add_argument("--scheme", required=True, choices=["w8a8", "int4", "int8"])
    p.add_argument("--calibrate", required=True, metavar="FILE",
                   help="a plain-text calibration file, not the text you evaluate on (e.g. ptb.valid.txt)")
    p.add_argument("--samples", type=int, default=32, help="windows of the text run through the model")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=False,
                   help="int4: after the scaling, round the decoder linears and the lm_head with GPTQ (each "
                   "column's error corrected on the columns after it) and save the codes")
    p.add_argument("--quantization-skip", action="append", default=None, metavar="PATTERN",
                   help="modules kept in float (repeatable), e.g. lm_head")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_quantize)

    t = sub.add_parser("tune", help="try the schemes and switches that apply on this host, measure each one's "
                       "speed and accuracy against float32, and write the recipe of the fastest within a budget",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a model directory, .gguf file or alias")
    t.add_argument("--accuracy-budget", type=float, required=True, metavar="PCT",
                   help="the perplexity increase over float32 allowed, in percent (e.g. 1)")
    t.add_argument("--data", required=True, metavar="FILE",
                   help="the held-in text the perplexity is measured on (re-measure the result on other text)")
    t.add_argument("--check-data", default=None, metavar="FILE",
                   help="a second text, unlike --data: the chosen configuration is scored on it too and, over the "
                   "budget there, set aside and the choice made again (catches a calibration that fits one kind of "
                   "text only)")
    t.add_argument("--tokens", type=int, default=4096, help="tokens of --data (and --check-data) scored per "
                   "configuration")
    t.add_argument("--window", type=int, default=1024, help="tokens per scored window (each advances by half)")
    t.add_argument("--calibrate", default=None, metavar="FILE",
                   help="also make and try calibrated w8a8 and int4 checkpoints (SmoothQuant / activation-aware) "
                   "from this text, written beside --out; not the --data text")
    t.add_argument("--batch", type=int, default=1, help="sequences decoded together when timing")
    t.add_argument("--input-len", type=int, default=256, help="prompt tokens when timing")
    t.add_argument("--output-len", type=int, default=64, help="new tokens when timing")
    t.add_argument("--runs", type=int, default=3, help="timed runs of each configuration (and of float32 beside it)")
    t.add_argument("--objective", default="decode", choices=["decode", "prefill"], help="the speed to maximize")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    t.add_argument("--out", required=True, metavar="RECIPE.yaml", help="the recipe file to write")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.set_defaults(func=cmd_tune)
