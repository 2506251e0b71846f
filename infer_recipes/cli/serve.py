"""`serve`: the OpenAI-compatible server for one or more models."""
from __future__ import annotations

import os
import sys

from ..config import DTYPES
from .common import _FLAGS, MODEL_HELP, _add_switch_args, _load

_SERVE_FLAGS = ("num_blocks", "block_size", "kv_cache_memory", "max_num_batched_tokens", "max_waiting")


def cmd_serve(args) -> int:
    from ..serving.deployment import assemble
    from ..serving.pool import ModelPool, log_stderr
    from ..serving.server import serve

    base = {name: getattr(args, name) for name in _FLAGS + _SERVE_FLAGS if getattr(args, name, None) is not None}
    if "quantization_skip" in base:
        base["quantization_skip"] = tuple(base["quantization_skip"])
    d = assemble(args.deployment, args.recipe, args.model, args.set, args.pin, args.cascade, args.memory_budget,
                 base)
    pool = ModelPool(d.models, d.memory_budget, log=log_stderr,
                     loader=lambda spec, draft: _load(spec.model, spec.options, f"[{spec.name}] ", draft))
    names = [s.name for s in d.models] + [c.name for c in d.cascades]
    print(f"serving {', '.join(names)} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    serve(pool, args.host, args.port, {c.name: c for c in d.cascades}, args.api_key, args.log_level)
    return 0


def register(sub) -> None:
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
