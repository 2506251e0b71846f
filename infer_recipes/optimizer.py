"""The optimizer API of the CANN write-up: a thin chainable façade over `LLM`.

    opt = LLMInferenceOptimizer("smollm2-135m-instruct")
    outputs = opt.enable_kv_cache().enable_fusion().set_batch_size(8).enable_quantization("int8").infer(prompts)

It starts from the original model (every switch off, float32) and each call turns one optimization on; the model
is (re)built on the first `infer` after a change, so a chain costs one load.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

from .config import EngineConfig, SamplingParams
from .engine.llm import LLM
from .engine.request import RequestOutput
from .recipe import Recipe, load_recipe


class LLMInferenceOptimizer:
    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", progress: bool = True):
        self.model = model
        self.progress = progress
        self._config = EngineConfig(device=device, dtype=dtype, kv_cache=False, fusion=False)
        self._llm: LLM | None = None
        self._built_with: EngineConfig | None = None

    @classmethod
    def from_recipe(cls, recipe: str | Recipe, progress: bool = True) -> LLMInferenceOptimizer:
        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        opt = cls(r.model, progress=progress)
        opt._config = r.engine
        return opt

    def _set(self, **changes) -> LLMInferenceOptimizer:
        self._config = replace(self._config, **changes)  # validates, naming the field
        return self

    def enable_kv_cache(self, enabled: bool = True) -> LLMInferenceOptimizer:
        return self._set(kv_cache=enabled)

    def enable_fusion(self, enabled: bool = True) -> LLMInferenceOptimizer:
        return self._set(fusion=enabled)

    def enable_compile(self, enabled: bool = True) -> LLMInferenceOptimizer:
        return self._set(compile=enabled)

    def enable_quantization(self, precision: str = "int8", group_size: int = 32,
                            skip: Sequence[str] = ()) -> LLMInferenceOptimizer:
        """precision: int8, int8-minmax, w8a8, int4, int4-w8a8 or gguf; skip: module-name patterns kept in
        float."""
        return self._set(quantization=precision, group_size=group_size, quantization_skip=tuple(skip))

    def disable_quantization(self) -> LLMInferenceOptimizer:
        return self._set(quantization=None)

    def set_dtype(self, dtype: str) -> LLMInferenceOptimizer:
        return self._set(dtype=dtype)

    def set_batch_size(self, batch_size: int) -> LLMInferenceOptimizer:
        return self._set(max_batch_size=batch_size)

    def set_max_model_len(self, max_model_len: int | None) -> LLMInferenceOptimizer:
        return self._set(max_model_len=max_model_len)

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def llm(self) -> LLM:
        """The engine for the current configuration (built now if the configuration changed since)."""
        if self._llm is None or self._built_with != self._config:
            self._llm = None  # release the old model's memory before loading the next
            self._llm = LLM(self.model, progress=self.progress, **asdict(self._config))
            self._built_with = self._config
        return self._llm

    def infer(self, prompts: str | Sequence[str], max_tokens: int = 128, temperature: float = 0.0,
              chat: bool = False, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generates for each prompt (greedy by default); `chat` wraps each in the model's chat template."""
        params = sampling_params or SamplingParams(max_tokens=max_tokens, temperature=temperature)
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        llm = self.llm
        if chat:
            return llm.chat([[{"role": "user", "content": p}] for p in items], params)
        return llm.generate(items, params)


def run_recipe(llm: LLM, recipe: Recipe, prompts: Sequence[str], progress: bool = False):
    """A recipe's prompts (chat-wrapped when its data says so) through a loaded model: (outputs, summary) with
    tokens/s, median time to first token, weight bytes and peak memory."""
    import time

    from .device import peak_memory_bytes

    items = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts] if recipe.data.chat \
        else list(prompts)
    start = time.perf_counter()
    outputs = llm.generate(items, recipe.data.sampling_params(), use_tqdm=progress)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    ttfts = sorted(o.metrics["ttft_s"] for o in outputs if "ttft_s" in o.metrics)
    summary = {"recipe": recipe.name, "model": llm.source.name, "device": llm.device.type,
               "prompts": len(prompts), "max_batch_size": llm.engine_config.max_batch_size,
               "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
               "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else None,
               "weight_bytes": llm.weight_bytes(), "peak_memory_bytes": peak_memory_bytes(llm.device),
               "load_s": llm.load_seconds, "compile_s": llm.compile_seconds, "compiles": llm.compiles}
    return outputs, summary
