"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from ..config import EngineConfig, ModelConfig, SamplingParams
from ..device import resolve_device, resolve_dtype, returning_host_memory
from ..errors import InferRecipesError
from ..loading import load_model, resolve_model_source
from ..loading.gguf import quantized_blocks
from ..loading.weights import drop_metadata, read_config, release_loader_memory
from ..models.llama import LlamaForCausalLM
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
    """

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", max_model_len: int | None = None,
                 max_batch_size: int = 16, progress: bool = True, **switches):
        """switches: the optimization fields of `EngineConfig` (kv_cache, fusion, compile, quantization,
        quantization_skip, group_size)."""
        known = set(EngineConfig.__dataclass_fields__) - {"device", "dtype", "max_model_len", "max_batch_size"}
        unknown = sorted(set(switches) - known)
        if unknown:
            raise InferRecipesError(f"unknown LLM option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.engine_config = EngineConfig(device=device, dtype=dtype, max_model_len=max_model_len,
                                          max_batch_size=max_batch_size, **switches)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.source = resolve_model_source(model)
        with returning_host_memory():
            self.model_config: ModelConfig = read_config(self.source)
            self.max_model_len = min(max_model_len or self.model_config.max_position_embeddings,
                                     self.model_config.max_position_embeddings)
            self.tokenizer: LLMTokenizer = load_tokenizer(self.source)
            drop_metadata(self.source)
            self._check_switches()
            self._gguf_replaced = 0
            # fusion and quantization happen layer by layer as the loader fills them (see load_model)
            self.model = load_model(self.source, self.dtype, self.device, max_positions=self.max_model_len,
                                    progress=progress, config=self.model_config, on_loaded=self._optimize_unit)
            release_loader_memory()
        if self.engine_config.quantization == "gguf" and self._gguf_replaced == 0:
            raise InferRecipesError("this GGUF file has no Q4_0/Q4_1 tensors to keep: use int4 or int8")
        self.load_seconds = self.model.load_seconds
        self.compile_seconds = 0.0
        cfg = self.engine_config
        self.runner = ModelRunner(self.model, self.device, self.dtype, kv_cache=cfg.kv_cache, compile=cfg.compile,
                                  num_blocks=kv_pool_blocks(self.model_config, cfg, self.max_model_len, self.dtype,
                                                            self.device) if cfg.kv_cache else 0,
                                  block_size=cfg.block_size)
        if self.engine_config.compile:
            start = time.perf_counter()
            if progress:
                print("compiling the decoder layer (torch.compile: one token / more x first layer / others)...",
                      file=sys.stderr)
            self.runner.warm_up()
            self.compile_seconds = time.perf_counter() - start
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.engine = LLMEngine(self.runner, self.tokenizer, cfg, self.max_model_len, self.model_config.vocab_size,
                                self.eos_token_ids)

    def _check_switches(self) -> None:
        cfg = self.engine_config
        if cfg.quantization == "gguf" and self.source.kind != "gguf":
            raise InferRecipesError("quantization 'gguf' keeps a GGUF file's own blocks: the model must be a "
                                    "GGUF file (or use int4 / int8 for other sources)")
        if cfg.quantization and cfg.quantization != "gguf":
            check_scheme(cfg.quantization, cfg.group_size)

    def _gguf_blocks(self, name: str):
        return quantized_blocks(self.source.location, self.model_config, name)

    def _optimize_unit(self, model: LlamaForCausalLM, unit: str) -> None:
        """Fusion and quantization of one unit (a decoder layer, the embedding, the lm_head) as soon as the
        loader has filled it."""
        cfg = self.engine_config
        if unit.startswith("model.layers."):
            if cfg.fusion:
                model.get_submodule(unit).fuse()
            self._quantize(model, unit)
        elif unit == "model.embed_tokens" and cfg.quantization:
            if model.config.tie_word_embeddings:
                self._quantize(model, "lm_head")  # the tied head first: the int8 table can then share its weight
            quantize_embedding(model, cfg.quantization_skip)
        elif unit == "lm_head":
            self._quantize(model, unit)

    def _quantize(self, model: LlamaForCausalLM, root: str) -> None:
        cfg = self.engine_config
        if cfg.quantization == "gguf":
            self._gguf_replaced += quantize_gguf(model, self._gguf_blocks, cfg.quantization_skip, False, root)
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
