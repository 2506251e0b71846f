"""Shared by the commands: the engine and switch flags, the model and its options from flags and recipes,
loading with a line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import DTYPES, GROUP_SIZES, KERNELS, KV_CACHE_DTYPES, QUANTIZATIONS
from ..loading.source import DEFAULT_MODEL

MODEL_HELP = ("a Hugging Face directory (config.json + *.safetensors), a .gguf file, an alias of a model that "
              "installs from pip (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct), "
              "or synthetic:<preset> with random weights in a published shape (llama-3.2-1b, llama-3.2-3b, "
              "llama-2-7b, smollm2-135m, tiny-llama3): synthetic outputs are meaningless, for speed work only")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP + f" (default: {DEFAULT_MODEL}, or the recipe's model)")
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
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV blocks of prefixes seen before (default: on where exact: a KV cache, not "
                        "int4-w8a8)")
    g.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep keys/values between steps (off recomputes the whole prefix each step)")
    g.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="what the KV cache stores: auto (the activation dtype) or int8 (a scale per token and KV "
                        "head: half bfloat16's bytes, a quarter of float32's)")
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
    g.add_argument("--kernels", default=None, choices=KERNELS,
                   help="quantized linears and decode attention on our own CPU kernels (native, the default, where "
                        "they build and run) or torch's")
    g.add_argument("--speculative-model", default=None,
                   help="speculative decoding: 'ngram' (prompt lookup) or a smaller model with the same tokenizer "
                        "(path or alias); greedy outputs are unchanged")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="guesses per step (default 5 for ngram, 3 for a draft model)")
    g.add_argument("--speculative-quantization", default=None, choices=["none", *(q for q in QUANTIZATIONS if q)],
                   help="the draft model's scheme (default: the model's)")
    g.add_argument("--speculative-max-rows", type=int, default=None,
                   help="decoding positions a step verifies at most (default: guesses + 1; raise it on a GPU)")
    g = p.add_argument_group("across devices (start the command under torchrun --nproc-per-node TP*PP)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="ranks splitting every layer: heads, MLP columns, vocabulary (default 1)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None,
                   help="ranks holding contiguous layer stages (default 1)")


_FLAGS = ("device", "dtype", "max_model_len", "max_batch_size", "kv_cache", "kv_cache_dtype", "prefix_caching",
          "fusion", "compile", "quantization", "quantization_skip", "group_size", "kernels", "speculative_model",
          "num_speculative_tokens", "speculative_quantization", "speculative_max_rows", "tensor_parallel_size",
          "pipeline_parallel_size")


def _model_and_options(args) -> tuple[str, dict]:
    """The model spec and LLM keyword arguments: the recipe's (if any), then every flag given on the line."""
    options, model = {}, None
    if args.recipe or args.set:
        from ..recipe import load_recipe

        if not args.recipe:
            from ..errors import InferRecipesError

            raise InferRecipesError("--set overrides a recipe's values: give --recipe too")
        recipe = load_recipe(args.recipe, args.set)
        model, options = recipe.model, recipe.llm_kwargs()
    return args.model or model or DEFAULT_MODEL, {**options, **_flag_options(args)}


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
            from ..errors import InferRecipesError

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


def _sampling(args):
    from ..config import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop))


def _llm(args):
    return _load(*_model_and_options(args))


def _load(spec: str, options: dict, label: str = "", draft=None):
    from ..engine.llm import LLM

    llm = LLM(spec, progress=_progress(), draft=draft, **options)
    compiled = f", compiled {llm.compiles} graphs in {llm.compile_seconds:.1f} s" if llm.compiles else ""
    print(f"{label}loaded {llm.source.name} ({llm.source.kind}) on {llm.device.type} in {llm.load_seconds:.2f} s"
          f"{compiled}", file=sys.stderr)
    return llm


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("INFER_RECIPES_PROGRESS"))


def _print_result(args, result: dict, line: str) -> int:
    print(json.dumps(result) if args.json else line)
    return 0
