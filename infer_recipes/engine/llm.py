"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import functools
import gc
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import NoReturn
from dataclasses import replace

import torch
from tqdm import tqdm

from .. import distributed
from ..config import EngineConfig, ModelConfig, SamplingParams
from ..device import resolve_device, resolve_dtype, returning_host_memory
from ..errors import InferRecipesError
from ..loading import load_model, resolve_model_source
from ..loading.gguf import quantized_blocks
from ..layers.parallel import Shard, check_split, stage_layers
from ..loading.weights import drop_metadata, read_config, release_loader_memory
from ..models.llama import WHOLE, LlamaForCausalLM, shard_range
from ..quantization import quantize
from ..quantization.api import check_scheme, quantize_embedding, quantize_gguf
from ..runner import ModelRunner
from ..tokenizer import LLMTokenizer, load_tokenizer
from .llm_engine import LLMEngine, Prompt, kv_pool_blocks
from .request import RequestOutput


class LLM:
    """A model, its tokenizer and an engine, ready to generate.

    model: a Hugging Face directory, a .gguf file, an alias (`smollm2-135m-instruct`) or `synthetic:<preset>`
    (random weights in a published shape: fast to build, meaningless output).

    Across devices (`tensor_parallel_size` x `pipeline_parallel_size` > 1, every rank started by torchrun): the
    constructor returns on rank 0 only, which holds the tokenizer and the engine and drives the others. On the
    other ranks it runs the steps rank 0 sends (for this LLM and any rank 0 builds later) and exits the process
    when rank 0 stops them (`infer_recipes.distributed.shutdown()`, or rank 0's exit).
    """

    _next_id = 0

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", max_model_len: int | None = None,
                 max_batch_size: int = 16, progress: bool = True, _worker_id: int | None = None, **switches):
        """switches: the optimization fields of `EngineConfig` (kv_cache, fusion, compile, quantization,
        quantization_skip, group_size) and the parallel sizes (tensor_parallel_size, pipeline_parallel_size)."""
        known = set(EngineConfig.__dataclass_fields__) - {"device", "dtype", "max_model_len", "max_batch_size"}
        unknown = sorted(set(switches) - known)
        if unknown:
            raise InferRecipesError(f"unknown LLM option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.engine_config = cfg = EngineConfig(device=device, dtype=dtype, max_model_len=max_model_len,
                                                max_batch_size=max_batch_size, **switches)
        self.device = resolve_device(device)
        if distributed.launched() and _worker_id is None:
            world = distributed.context(self.device.type)
            if world.rank != 0:
                run_worker(world)  # serves rank 0's models until it stops them, then ends the process
        self.source = resolve_model_source(model)
        driver = _worker_id is None
        progress = progress and driver
        with returning_host_memory():
            self.model_config: ModelConfig = read_config(self.source)
            self._check_switches()
            ranks = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
            self.world = distributed.context(self.device.type) if ranks > 1 else None
            if self.world is not None:
                self.device = self.world.device
            self.dtype = resolve_dtype(dtype, self.device)
            self.max_model_len = min(max_model_len or self.model_config.max_position_embeddings,
                                     self.model_config.max_position_embeddings)
            self.tokenizer: LLMTokenizer | None = load_tokenizer(self.source) if driver else None
            drop_metadata(self.source)
            num_blocks = self._kv_blocks() if cfg.kv_cache else 0
            if self.world is None:
                self.model_id = 0
                self._build(Shard(), num_blocks, progress)
            elif driver:
                self.model_id, LLM._next_id = LLM._next_id, LLM._next_id + 1
                kwargs = dict(device=device, dtype=dtype, max_model_len=max_model_len, max_batch_size=max_batch_size,
                              progress=False, **{**switches, "num_blocks": num_blocks or None})
                with self.world.command("load", self.model_id, model, kwargs):  # the others build theirs now
                    self._build(self._shard(), num_blocks, progress)
                weakref.finalize(self, self.world.free_later, self.model_id)
            else:
                self.model_id = _worker_id
                self._build(self._shard(), num_blocks, progress)
        if not driver:
            return
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.engine = LLMEngine(self.runner, self.tokenizer, cfg, self.max_model_len, self.model_config.vocab_size,
                                self.eos_token_ids)

    def _shard(self) -> Shard:
        cfg = self.engine_config
        return self.world.shard(self.model_config.num_layers, cfg.tensor_parallel_size, cfg.pipeline_parallel_size)

    def _kv_blocks(self) -> int:
        """KV blocks per rank (every rank has the same count, rank 0 decides): a rank holds its KV heads of its
        layers, so the blocks are sized by the largest share."""
        cfg, mc = self.engine_config, self.model_config
        tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
        first, end = stage_layers(mc.num_layers, pp, 0)
        kv_first, kv_end = Shard(tp_size=tp).kv_heads(mc.num_kv_heads)
        kv_heads = kv_end - kv_first
        per_rank = replace(mc, num_layers=end - first, num_heads=kv_heads, num_kv_heads=kv_heads)
        return kv_pool_blocks(per_rank, cfg, self.max_model_len, self.dtype, self.device)

    def _build(self, shard: Shard, num_blocks: int, progress: bool) -> None:
        """Loads this rank's part of the model (fused and quantized as it loads) and its runner."""
        cfg = self.engine_config
        self._gguf_replaced = 0
        # fusion and quantization happen layer by layer as the loader fills them (see load_model)
        self.model = load_model(self.source, self.dtype, self.device, max_positions=self.max_model_len,
                                progress=progress, config=self.model_config, on_loaded=self._optimize_unit,
                                shard=shard)
        release_loader_memory()
        if cfg.quantization == "gguf" and self._gguf_replaced == 0 and shard.first_stage:
            raise InferRecipesError("this GGUF file has no Q4_0/Q4_1 tensors to keep: use int4 or int8")
        self.load_seconds = self.model.load_seconds
        self.compile_seconds = 0.0
        self.runner = ModelRunner(self.model, self.device, self.dtype, kv_cache=cfg.kv_cache, compile=cfg.compile,
                                  num_blocks=num_blocks, block_size=cfg.block_size, world=self.world,
                                  model_id=self.model_id)
        if cfg.compile:
            start = time.perf_counter()
            if progress:
                print("compiling the decoder layer (torch.compile: one token / more x first layer / others)...",
                      file=sys.stderr)
            self.runner.warm_up()
            self.compile_seconds = time.perf_counter() - start

    def _check_switches(self) -> None:
        cfg = self.engine_config
        tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
        mc = self.model_config
        why = check_split(mc.num_heads, mc.num_kv_heads, mc.intermediate_size, mc.num_layers, tp, pp)
        if why:
            raise InferRecipesError(f"{mc.name} cannot run with tensor_parallel_size {tp} x pipeline_parallel_size "
                                    f"{pp}: {why}")
        if tp * pp > 1 and not distributed.launched():
            raise InferRecipesError(
                f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} needs {tp * pp} processes: start the "
                f"same command under torchrun --nproc-per-node {tp * pp} (several nodes: torchrun's --nnodes and "
                f"--rdzv-endpoint)")
        if tp * pp > 1 and tp * pp != distributed.world_size():  # before rank 0 asks the others for anything
            raise InferRecipesError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} ranks, "
                                    f"but torchrun started {distributed.world_size()}: make them equal")
        if cfg.quantization == "gguf" and self.source.kind != "gguf":
            raise InferRecipesError("quantization 'gguf' keeps a GGUF file's own blocks: the model must be a "
                                    "GGUF file (or use int4 / int8 for other sources)")
        if cfg.quantization and cfg.quantization != "gguf":
            check_scheme(cfg.quantization, cfg.group_size)

    def _gguf_blocks(self, name: str, shard: Shard):
        """The GGUF blocks of checkpoint tensor `name` that this rank's slice of it holds."""
        found = quantized_blocks(self.source.location, self.model_config, name)
        where = shard_range(name, self.model_config, shard)
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

    def _optimize_unit(self, model: LlamaForCausalLM, unit: str) -> None:
        """Fusion and quantization of one unit (a decoder layer, the embedding, the lm_head) as soon as the
        loader has filled it."""
        cfg = self.engine_config
        if unit.startswith("model.layers."):
            if cfg.fusion:
                model.get_submodule(unit).fuse()
            self._quantize(model, unit)
        elif unit == "model.embed_tokens" and cfg.quantization:
            if model.config.tie_word_embeddings and model.shard.last_stage:
                self._quantize(model, "lm_head")  # the tied head first: the int8 table can then share its weight
            quantize_embedding(model, cfg.quantization_skip)
        elif unit == "lm_head":
            self._quantize(model, unit)

    def _quantize(self, model: LlamaForCausalLM, root: str) -> None:
        cfg = self.engine_config
        if cfg.quantization == "gguf":
            blocks = functools.partial(self._gguf_blocks, shard=model.shard)
            self._gguf_replaced += quantize_gguf(model, blocks, cfg.quantization_skip, False, root)
        elif cfg.quantization:
            quantize(model, cfg.quantization, cfg.quantization_skip, cfg.group_size, progress=False, root=root)

    @property
    def compiles(self) -> int:
        """Graphs torch.compile has built so far; after the warm-up at load, growth means a recompile."""
        return self.runner.compiles

    def weight_bytes(self) -> int:
        """Bytes of the weights as they are held now (quantized ones included, tied ones counted once)."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + [b for n, b in self.model.named_buffers() if "rotary" not in n]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def kv_cache_bytes(self) -> int:
        """Bytes reserved for the KV block pool (0 without a KV cache; on the CPU pages are committed on use)."""
        return self.runner.pool.nbytes() if self.runner.pool is not None else 0

    # ---- generation, on the continuous-batching engine ---------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates for each prompt (text or token ids); outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InferRecipesError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        for p in prompts:
            self.engine.token_ids(p)  # every prompt checked before any runs
        if self.engine.driver is not None or self.engine.has_unfinished_requests():
            raise InferRecipesError("this LLM's engine is serving other requests (a server or another caller): "
                                    "use one LLM per caller")
        ids = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.engine.add_request(p, sp))
            finals: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="generating", unit="prompt", disable=not use_tqdm, file=sys.stderr)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
            bar.close()
        except BaseException:
            for i in ids:
                self.engine.abort_request(i)
            raise
        return [finals[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text as it is produced for one prompt; the final output is the generator's return value."""
        if self.engine.driver is not None:
            raise InferRecipesError("this LLM's engine is driven by a server: use one LLM per caller")
        request_id = self.engine.add_request(prompt, sampling_params or SamplingParams())
        final = None
        try:
            while final is None:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        if out.delta:
                            yield out.delta
                        if out.finished:
                            final = out
        finally:
            self.engine.abort_request(request_id)  # a consumer that stops early frees the blocks
        return final

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates replies."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [T, V] (float32) at every position of one prompt."""
        return self.runner.full_logits(self.engine.token_ids(prompt)[1])


def run_worker(world: distributed.ParallelContext) -> NoReturn:
    """A rank other than 0: builds the models rank 0 builds and runs their steps, until rank 0 stops them; then
    the process ends (see `distributed.leave_world`)."""
    models: dict[int, LLM] = {}
    while True:
        message = world.receive()
        if message[0] == "load":
            _, model_id, spec, kwargs = message
            models[model_id] = LLM(spec, _worker_id=model_id, **kwargs)
        elif message[0] == "run":
            _, model_id, kind, payload = message
            models[model_id].runner.run(kind, payload)
        elif message[0] == "free":
            models.pop(message[1], None)
            gc.collect()
        elif message[0] == "stop":
            models.clear()  # their process groups go with them, now, not at interpreter exit
            gc.collect()
            distributed.leave_world(world)
            distributed.exit_process(0)
