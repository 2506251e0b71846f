"""`infer-recipes quantize`: a calibrated checkpoint (`infer_recipes.checkpoint`)."""
from __future__ import annotations

import argparse
import json

from ..config import GROUP_SIZES
from ..loading.source import DEFAULT_MODEL
from .common import _progress, _set_threads


def cmd_quantize(args) -> int:
    from ..checkpoint import quantize_checkpoint

    _set_threads(args)
    report = quantize_checkpoint(args.model, args.scheme, args.calibrate, args.out, samples=args.samples,
                                 seq_len=args.seq_len, group_size=args.group_size,
                                 skip=tuple(args.quantization_skip or ()), progress=_progress())
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
    print(f"wrote {args.out}: load it as --model {args.out} (it runs as {report['scheme']} unless --quantization "
          "names another)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate a model for a scheme (SmoothQuant for w8a8, activation-aware "
                       "scaling for int4 / int8) and save it as a checkpoint that loads directly",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="a model directory, .gguf file or alias")
    p.add_argument("--scheme", required=True, choices=["w8a8", "int4", "int8"])
    p.add_argument("--calibrate", required=True, metavar="FILE",
                   help="a plain-text calibration file, not the text you evaluate on (e.g. ptb.valid.txt)")
    p.add_argument("--samples", type=int, default=32, help="windows of the text run through the model")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size")
    p.add_argument("--quantization-skip", action="append", default=None, metavar="PATTERN",
                   help="modules kept in float (repeatable), e.g. lm_head")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_quantize)
