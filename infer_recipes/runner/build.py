"""Building a runner: the model read from its source, fused and quantized unit by unit as it loads (so the whole
model never sits in float), GGUF blocks kept where they map onto our kernels, the KV cache sized, the compiled
layers warmed up.

Two phases, because the tokenizer is read from the same source in between: `prepare` (the source, the model's
shape, the checks that need no weights) and `build` (everything else). A worker rank of a split model runs the
same `build` with the same arguments as rank 0, for its own shard.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from .. import kernels
from ..config import EngineConfig, ModelConfig
from ..device import resolve_dtype
from ..distributed import ParallelContext, launched, world_size
from ..errors import InferRecipesError
from ..layers.attention import key_scales
from ..layers.parallel import Shard, check_split, stage_layers
from ..loading import ModelSource, load_model, resolve_model_source
from ..loading.hf import read_quantization, saved_codes
from ..loading.gguf import quantized_blocks, release_blocks, tensor_shapes, tensor_types
from ..loading.weights import drop_metadata, read_config, release_loader_memory
from ..models.llama import WHOLE, LlamaForCausalLM, shard_range
from ..quantization import quantize
from ..quantization.api import (BYTES_PER_WEIGHT, EMBEDDING, check_scheme, gguf_embedding, gguf_module,
                                gguf_sources, quantize_codes, quantize_embedding, quantize_gguf, skipped)
from ..quantization.gguf import kernel_for
from . import converted
from .kv_cache import kv_bytes_per_token, kv_element_size, kv_pool_blocks, kv_storage_dtype
from .model_runner import ModelRunner


@dataclass(frozen=True)
class Blueprint:
    """What is known of a model before its weights load: where it comes from, its shape, how it will run."""

    spec: str  # what the user gave (path, alias, synthetic:<preset>)
    source: ModelSource
    model_config: ModelConfig
    engine_config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int


def prepare(spec: str, cfg: EngineConfig, device: torch.device) -> Blueprint:
    """Resolves the model and reads its shape; refuses switches that cannot run it, before anything loads."""
    source = resolve_model_source(spec)
    mc = read_config(source)
    _check_switches(mc, cfg, source)
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    return Blueprint(spec, source, mc, cfg, device, resolve_dtype(cfg.dtype, device), max_len)


def checkpoint_switches(spec: str, switches: dict) -> dict:
    """The switches a calibrated checkpoint (`infer-recipes quantize`) brings: it runs in the scheme it was
    calibrated for unless `switches` name a quantization (`none` included: its float weights are the model,
    scaled for that scheme's rounding)."""
    if "quantization" in switches:
        return switches
    source = resolve_model_source(spec)
    saved = read_quantization(source.location) if source.kind == "hf" else None
    if saved is None:
        return switches
    brought = {"quantization": saved["scheme"], "group_size": int(saved.get("group_size", 32)),
               "quantization_skip": tuple(saved.get("quantization_skip", ()))}
    return {**brought, **switches}


def kv_blocks(bp: Blueprint) -> int:
    """KV blocks per rank (every rank has the same count, rank 0 decides): a rank holds its KV heads of its
    layers, so the blocks are sized by the largest share."""
    cfg, mc = bp.engine_config, bp.model_config
    if not cfg.kv_cache:
        return 0
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    first, end = stage_layers(mc.num_layers, pp, 0)
    kv_first, kv_end = Shard(tp_size=tp).kv_heads(mc.num_kv_heads)
    kv_heads = kv_end - kv_first
    per_rank = replace(mc, num_layers=end - first, num_heads=kv_heads, num_kv_heads=kv_heads)
    return kv_pool_blocks(per_rank, cfg, bp.max_model_len, bp.dtype, bp.device)


def kv_estimate(bp: Blueprint) -> int:
    """Bytes of the KV cache `kv_blocks` will reserve."""
    element = kv_element_size(kv_storage_dtype(bp.engine_config.kv_cache_dtype, bp.dtype), bp.model_config.head_dim)
    return int(kv_blocks(bp) * kv_bytes_per_token(bp.model_config, element) * bp.engine_config.block_size)


def memory_estimate(bp: Blueprint) -> int:
    """Bytes the built model will hold, before building it: its weights in their scheme's bytes per weight, and
    the KV cache `kv_blocks` will reserve."""
    cfg = bp.engine_config
    kv = kv_estimate(bp)
    if cfg.quantization == "gguf":  # each tensor's kernel follows its type in the file
        per_kernel = {"int4": BYTES_PER_WEIGHT["gguf"], "int8": BYTES_PER_WEIGHT["int8"], None: bp.dtype.itemsize}
        shapes = tensor_shapes(bp.source.location)
        return int(sum(math.prod(shapes[n]) * per_kernel[kernel_for(t)]
                       for n, t in tensor_types(bp.source.location).items()) + kv)
    per_weight = BYTES_PER_WEIGHT.get(cfg.quantization or "", bp.dtype.itemsize)
    return int(bp.model_config.num_parameters * per_weight + kv)


def build(bp: Blueprint, num_blocks: int, shard: Shard = Shard(), world: ParallelContext | None = None,
          model_id: int = 0, progress: bool = True) -> ModelRunner:
    """Loads this rank's part of the model (fused and quantized as it loads) and returns its runner."""
    cfg = bp.engine_config
    drop_metadata(bp.source)  # config and tokenizer are read: the GGUF reader's metadata can go
    start = time.perf_counter()
    cached_at = converted.cache_file(bp.source, cfg, bp.dtype, bp.max_model_len, bp.device)
    model = converted.load(cached_at)
    if model is not None:
        model.load_seconds = time.perf_counter() - start
    else:
        model = _convert(bp, shard, progress)
        converted.save(cached_at, model)
    if cfg.quantization == "gguf" and progress:
        print(f"GGUF blocks kept: {model.load_report}", file=sys.stderr)
    elif model.load_report and progress:
        print(model.load_report, file=sys.stderr)
    # eager only: inside a compiled graph each call would be a graph break
    model.use_native_kernels(cfg.kv_cache and not cfg.compile and kernels.wanted(cfg.kernels, bp.device), bp.dtype)
    if cfg.kernels == "native" and bp.device.type == "cpu" and kernels.reason() and progress:
        print(kernels.reason(), file=sys.stderr)
    runner = ModelRunner(model, bp.device, bp.dtype, kv_cache=cfg.kv_cache, num_blocks=num_blocks,
                         block_size=cfg.block_size, world=world, model_id=model_id,
                         kv_dtype=kv_storage_dtype(cfg.kv_cache_dtype, bp.dtype))
    runner.source, runner.model_config, runner.max_model_len = bp.source, bp.model_config, bp.max_model_len
    runner.load_seconds, runner.compile_seconds = model.load_seconds, 0.0
    if runner.kv_dtype == torch.int8:  # eagerly, before any layer compiles
        _scale_int8_keys(runner, progress)
    if cfg.compile:
        runner.compile_layers()
        start = time.perf_counter()
        if progress:
            print("compiling the decoder layer (torch.compile: one token / more x first layer / others)...",
                  file=sys.stderr)
        runner.warm_up()
        runner.compile_seconds = time.perf_counter() - start
    return runner


# random token ids whose keys set an int8 pool's key scaling (`_scale_int8_keys`)
KEY_CALIBRATION_TOKENS = 512


def _scale_int8_keys(runner: ModelRunner, progress: bool) -> None:
    """Scales the key channels of a model whose pool is int8 (`LlamaAttention.scale_keys`): one scoring pass over
    random token ids observes every layer's rotated queries and keys, and `key_scales` picks each KV head's
    scaling by the error its int8 keys leave in the attention weights (only heads with outlier channels are
    scaled). The seed is fixed, so every rank of a split model runs the same pass
    (together, as at warm-up) and finds its own heads' scales. Random ids rather than a text: the outlier
    channels come from the weights (Qwen2.5's key biases); on Qwen2.5-Coder-0.5B they gave WikiText-2
    perplexity within 0.02 of scales found on 4,096 tokens of PTB."""
    start = time.perf_counter()
    model = runner.model
    n = min(KEY_CALIBRATION_TOKENS, runner.max_model_len)
    ids = torch.randint(model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    attentions = [model.model.layers[i].self_attn for i in model.layer_range]
    found = {}

    def observer(attention):
        return lambda q, k: found.__setitem__(attention, key_scales(q, k, attention.scale))

    for attention in attentions:
        attention.observe = observer(attention)
    try:
        runner.run("last_logits", ids)  # the observers see every layer; one row of logits is enough
    finally:
        for attention in attentions:
            attention.observe = None
    alphas = Counter()
    for attention in attentions:
        s, a = found[attention]
        attention.scale_keys(s, runner.dtype)
        alphas.update(a.tolist())
    if progress:
        chosen = ", ".join(f"{a:g}: {alphas[a]}" for a in sorted(alphas))
        print(f"int8 KV cache: key channels scaled on {n} random tokens in {time.perf_counter() - start:.1f} s "
              f"(KV heads per exponent a: {chosen})", file=sys.stderr)


def sharing(runner: ModelRunner, cfg: EngineConfig, max_model_len: int) -> ModelRunner:
    """A runner on `runner`'s model, the same weights (no copy), with a KV cache of its own sized by `cfg` for
    contexts of `max_model_len`: a loaded model drafting for another while it serves its own requests. Its keys
    are scaled only if that model's own pool is int8 (`_scale_int8_keys`): scaling a model already serving would
    leave the keys it has cached unscaled against scaled queries."""
    num_blocks = kv_pool_blocks(runner.model_config, cfg, max_model_len, runner.dtype, runner.device)
    shared = ModelRunner(runner.model, runner.device, runner.dtype, num_blocks=num_blocks, block_size=cfg.block_size,
                         kv_dtype=kv_storage_dtype(cfg.kv_cache_dtype, runner.dtype))
    shared.compiled = runner.compiled  # the layers' forwards are the model's: compiled there, compiled here
    shared.source, shared.model_config, shared.max_model_len = runner.source, runner.model_config, runner.max_model_len
    shared.load_seconds = shared.compile_seconds = 0.0
    shared.owns_weights = False
    return shared


def _convert(bp: Blueprint, shard: Shard, progress: bool) -> LlamaForCausalLM:
    """The model read from its source, fused and quantized unit by unit as it loads."""
    cfg = bp.engine_config
    # a split model takes the float detour: a rank's slice can cut through blocks
    optimizer = _UnitOptimizer(bp, keep_blocks=shard == Shard(), whole_linears=shard.tp_size == 1)
    model = load_model(bp.source, bp.dtype, bp.device, max_positions=bp.max_model_len, progress=progress,
                       config=bp.model_config, on_loaded=optimizer, shard=shard,
                       keep_quantized=optimizer.kept.__contains__)
    release_loader_memory()
    if cfg.quantization == "gguf" and not optimizer.gguf_report and shard.first_stage:
        raise InferRecipesError("this GGUF file has no quantized tensors to keep (it is float): use int4 or int8")
    model.load_report = optimizer.report()
    return model


def _check_switches(mc: ModelConfig, cfg: EngineConfig, source: ModelSource) -> None:
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    why = check_split(mc.num_heads, mc.num_kv_heads, mc.intermediate_size, mc.num_layers, tp, pp)
    if why:
        raise InferRecipesError(f"{mc.name} cannot run with tensor_parallel_size {tp} x pipeline_parallel_size "
                                f"{pp}: {why}")
    if tp * pp > 1 and not launched():
        raise InferRecipesError(
            f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} needs {tp * pp} processes: start the "
            f"same command under torchrun --nproc-per-node {tp * pp} (several nodes: torchrun's --nnodes and "
            f"--rdzv-endpoint)")
    if tp * pp > 1 and tp * pp != world_size():  # before rank 0 asks the others for anything
        raise InferRecipesError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} ranks, "
                                f"but torchrun started {world_size()}: make them equal")
    if cfg.quantization == "gguf" and source.kind != "gguf":
        raise InferRecipesError("quantization 'gguf' keeps a GGUF file's own blocks: the model must be a "
                                "GGUF file (or use int4 / int8 for other sources)")
    if cfg.quantization and cfg.quantization != "gguf":
        check_scheme(cfg.quantization, cfg.group_size)


class _UnitOptimizer:
    """Fusion and quantization of one unit (a decoder layer, the embedding, the lm_head) as soon as the loader
    has filled it (load_model's `on_loaded`)."""

    def __init__(self, bp: Blueprint, keep_blocks: bool, whole_linears: bool = True):
        self.bp = bp
        cfg = bp.engine_config
        # a GPTQ checkpoint's int4 codes, used where the model runs the int4 scheme of the group size they were
        # made for, in whole linears (a tensor-parallel slice rounds the saved weights to nearest instead)
        codes = saved_codes(bp.source.location) if bp.source.kind == "hf" and cfg.quantization == "int4" else None
        self.codes = codes if codes and codes.group_size == cfg.group_size and whole_linears else None
        # why a checkpoint's codes go unused ("" when they are used or there are none)
        self.codes_unused = "" if codes is None or self.codes is not None else (
            f"made for group size {codes.group_size}, {cfg.group_size} asked" if codes.group_size != cfg.group_size
            else "a tensor-parallel slice cannot use a whole linear's codes")
        self.codes_built = 0
        # tensors whose modules are built from their GGUF blocks (the loader never dequantizes them)
        self.kept: set[str] = self._kept_in_blocks() if keep_blocks and bp.engine_config.quantization == "gguf" \
            else set()
        self.gguf_report: Counter = Counter()  # (GGUF type, what it became) -> tensors
        self.native = kernels.wanted(bp.engine_config.kernels, bp.device)

    def _kept_in_blocks(self) -> set[str]:
        """Every quantized weight whose module is not skipped and whose parts are all quantized (a fused module
        is built from blocks only if each part has them); a tied table stays float when its lm_head is skipped."""
        cfg, mc = self.bp.engine_config, self.bp.model_config
        quantized = {n for n, qtype in tensor_types(self.bp.source.location).items() if kernel_for(qtype) is not None}
        skip = cfg.quantization_skip
        table_float = mc.tie_word_embeddings and skipped("lm_head", skip)
        kept = set()
        for name in quantized:
            module = gguf_module(name, cfg.fusion)
            if skipped(module, skip) or (module == EMBEDDING and table_float):
                continue
            if all(s in quantized for s in gguf_sources(module)):
                kept.add(name)
        return kept

    def __call__(self, model: LlamaForCausalLM, unit: str) -> None:
        cfg = self.bp.engine_config
        if unit.startswith("model.layers."):
            if cfg.fusion:
                model.get_submodule(unit).fuse()
            self._quantize(model, unit)
        elif unit == "model.embed_tokens" and cfg.quantization == "gguf":
            if model.config.tie_word_embeddings and model.shard.last_stage:
                self._quantize(model, "lm_head")  # from the table's blocks: the table itself may stay in them
            blocks = self._gguf_blocks("model.embed_tokens.weight", model.shard)
            if not skipped(EMBEDDING, cfg.quantization_skip) and \
                    gguf_embedding(model, blocks, self.bp.dtype, self.native):
                self.gguf_report[(blocks[0], "table in its blocks")] += 1
        elif unit == "model.embed_tokens" and cfg.quantization:
            if model.config.tie_word_embeddings and model.shard.last_stage:
                self._quantize(model, "lm_head")  # the tied head first: the int8 table can then share its weight
            quantize_embedding(model, cfg.quantization_skip)
        elif unit == "lm_head":
            self._quantize(model, unit)

    def _quantize(self, model: LlamaForCausalLM, root: str) -> None:
        cfg = self.bp.engine_config
        if cfg.quantization == "gguf":
            blocks = functools.partial(self._gguf_blocks, shard=model.shard)
            self.gguf_report += quantize_gguf(model, blocks, cfg.quantization_skip, False, root, self.native)
            for name in self.kept:  # converted: their file pages need not stay resident
                if name.startswith(root + "."):
                    release_blocks(self.bp.source.location, name)
        elif cfg.quantization:
            if self.codes is not None:
                self.codes_built += quantize_codes(model, self.codes.get, cfg.group_size, cfg.quantization_skip,
                                                   root, self.native)
            quantize(model, cfg.quantization, cfg.quantization_skip, cfg.group_size, progress=False, root=root,
                     native=self.native)

    def report(self) -> str:
        """What each GGUF tensor type became, e.g. `Q4_K -> int4 x 168, Q6_K -> int8 x 29`; how many linears a
        GPTQ checkpoint's codes built."""
        if self.codes_built:
            return f"GPTQ int4 codes -> int4 x {self.codes_built}, the rest rounded to nearest"
        if self.codes_unused:
            return (f"the checkpoint's GPTQ codes not used ({self.codes_unused}): its saved weights rounded to "
                    "nearest")
        return ", ".join(f"{qtype} -> {kernel} x {n}" for (qtype, kernel), n in sorted(self.gguf_report.items()))

    def _gguf_blocks(self, name: str, shard: Shard):
        """The GGUF blocks of checkpoint tensor `name` that this rank's slice of it holds."""
        mc = self.bp.model_config
        found = quantized_blocks(self.bp.source.location, mc, name)
        where = shard_range(name, mc, shard)
        if found is None or where in (None, WHOLE):
            return found
        qtype, blocks = found  # [rows, bytes of the row's blocks]: slice whole rows or whole blocks
        dim, lo, hi = where
        if dim == 0:
            return qtype, blocks[lo:hi]
        import gguf

        elements, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        if lo % elements or hi % elements:
            return None  # this rank's columns cut through blocks: the layer stays float
        return qtype, blocks[:, lo // elements * nbytes:hi // elements * nbytes]
