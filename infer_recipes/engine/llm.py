"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from ..config import EngineConfig, ModelConfig, SamplingParams
from ..device import resolve_device, resolve_dtype, returning_host_memory
from ..errors import ContextLengthError, InferRecipesError
from ..loading import load_model, resolve_model_source
from ..loading.gguf import quantized_blocks
from ..loading.weights import drop_metadata, read_config, release_loader_memory
from ..models.llama import LlamaForCausalLM
from ..quantization import quantize
from ..quantization.api import check_scheme, quantize_embedding, quantize_gguf
from ..runner import ModelRunner
from ..sampling import make_generator, sample
from ..tokenizer import IncrementalDetokenizer, LLMTokenizer, load_tokenizer
from .request import Request, RequestOutput

Prompt = str | Sequence[int]


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
        self.runner = ModelRunner(self.model, self.device, self.dtype, kv_cache=self.engine_config.kv_cache,
                                  compile=self.engine_config.compile)
        if self.engine_config.compile:
            start = time.perf_counter()
            if progress:
                print("compiling the decoder layer (torch.compile: batch 1 / more x one query / more x first "
                      "layer / others)...", file=sys.stderr)
            self.runner.warm_up()
            self.compile_seconds = time.perf_counter() - start
        self._ids = itertools.count()
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

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

    # ---- requests -------------------------------------------------------------------------------------------
    def _token_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise InferRecipesError("a prompt must be a string or a list of integer token ids")
        if not ids:
            raise InferRecipesError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InferRecipesError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(len(ids), self.max_model_len)
        return text, ids

    def _request(self, prompt: Prompt, params: SamplingParams) -> Request:
        text, ids = self._token_ids(prompt)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        return Request(str(next(self._ids)), text, ids, params, stop_ids, IncrementalDetokenizer(self.tokenizer, ids),
                       max_len=self.max_model_len)

    # ---- the generation loop -----------------------------------------------------------------------------------
    def _run_batch(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        """Generates for a static batch; yields (request, new text) after every step, until all finish."""
        room = self.max_model_len - max(len(r.prompt_token_ids) for r in requests)
        max_new = min(max(r.params.max_tokens for r in requests), room)
        generators = [make_generator(r.params.seed, self.device) for r in requests]
        params = [r.params for r in requests]
        state, logits = self.runner.prefill([r.prompt_token_ids for r in requests], max_new)
        for step in range(max_new):
            result = sample(logits, params, generators)
            for i, r in enumerate(requests):
                if r.finish_reason is not None:
                    continue
                delta = r.append(result.tokens[i], result.logprobs[i] if result.logprobs else None,
                                 result.top_logprobs[i] if result.top_logprobs else None)
                yield r, delta
            if all(r.finish_reason is not None for r in requests) or step == max_new - 1:
                break
            logits = self.runner.decode(state, result.tokens)

    def _batches(self, requests: list[Request]) -> list[list[Request]]:
        # similar lengths together: less padding to compute
        order = sorted(requests, key=lambda r: len(r.prompt_token_ids))
        size = self.engine_config.max_batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates for each prompt (text or token ids); outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InferRecipesError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        requests = [self._request(p, sp) for p, sp in zip(prompts, params_list)]
        bar = tqdm(total=len(requests), desc="generating", unit="prompt", disable=not use_tqdm, file=sys.stderr)
        for batch in self._batches(requests):
            for _ in self._run_batch(batch):
                pass
            bar.update(len(batch))
        bar.close()
        return [r.output() for r in requests]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text as it is produced for one prompt; the final output is the generator's return value."""
        request = self._request(prompt, sampling_params or SamplingParams())
        for _, delta in self._run_batch([request]):
            if delta:
                yield delta
        return request.output()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates replies."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [T, V] (float32) at every position of one prompt."""
        return self.runner.full_logits(self._token_ids(prompt)[1])
