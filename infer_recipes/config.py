"""Configuration dataclasses: the model's shape, the engine's switches, and per-request sampling.

Frozen and validated at construction; every error names the field at fault. Standard library only.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InferRecipesError

DTYPES = ("float32", "bfloat16", "float16")
# what the paged KV cache stores: "auto" is the activation dtype; "int8" one byte per element plus a float32 scale
# per token and KV head (symmetric, absmax / 127), dequantized as attention reads it
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DEVICES = ("auto", "cpu", "cuda", "npu")
KERNELS = ("native", "torch")
QUANTIZATIONS = (None, "int8", "int8-minmax", "w8a8", "int4", "int4-w8a8", "gguf")
GROUP_SIZES = (32, 64, 128)


def cache_dir() -> Path:
    """Where our caches live (assembled models, converted weights, built kernels): $INFER_RECIPES_CACHE, by default
    ~/.cache/infer-recipes."""
    return Path(os.environ.get("INFER_RECIPES_CACHE") or Path.home() / ".cache" / "infer-recipes")


STALE_PARTIAL_SECONDS = 3600  # a half-written cache file untouched this long was left by a writer that died


def remove_stale_partials(folder: Path, prefix: str = "", now: float | None = None) -> int:
    """Removes `folder`'s `prefix*.partial` files (our caches' half-written files) that no one has written for an
    hour: a killed writer's leftovers, up to a model's size each. Returns the bytes freed. A live writer's file is
    younger, and kept."""
    now = time.time() if now is None else now
    freed = 0
    for f in folder.glob(f"{prefix}*.partial"):
        try:
            st = f.stat()
            if now - st.st_mtime > STALE_PARTIAL_SECONDS:
                f.unlink()
                freed += st.st_size
        except OSError:
            continue
    return freed


class ConfigError(InferRecipesError, ValueError):
    """A configuration field with a bad value."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one Llama-family model (Llama 2/3/3.x, SmolLM2, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1+ frequency scaling: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    architecture: str = "llama"
    name: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _require(kind in ("llama3", "default", "freq_factors", None), "rope_scaling",
                     f"rope type {kind!r} is not supported (supported: llama3, default)")

    @property
    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads * d) * 2 + h * (self.num_kv_heads * d) * 2
        if self.attention_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * d
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        return self.num_layers * layer + embed + h + (0 if self.tie_word_embeddings else embed)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, precision, context limits, and the optimization switches."""

    device: str = "auto"
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's own context length
    max_batch_size: int = 16
    kv_cache: bool = True  # off: recompute the whole prefix at every step (the "original" behaviour)
    fusion: bool = True  # merged QKV / gate-up GEMMs, add+RMSNorm, fused attention; off: the textbook module
    compile: bool = False  # torch.compile each decoder layer (the token count dynamic), warmed up at load
    quantization: str | None = None
    quantization_skip: tuple[str, ...] = ()  # module-name patterns kept in float (mixed precision)
    group_size: int = 32  # int4 group size
    # quantized linears (AVX-512 VNNI, int8 activations per block) and paged decode attention on our own CPU
    # kernels where they build and run, else torch's; "torch" keeps torch's everywhere (the ablation's before)
    kernels: str = "native"
    # the paged KV cache and the continuous-batching scheduler
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: sized from kv_cache_memory
    kv_cache_memory: float | None = None  # fraction of device memory for the KV pool (None: 0.25, capped at
    #   what max_batch_size sequences of max_model_len tokens need)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    max_num_batched_tokens: int = 512  # tokens per step: the chunked-prefill budget
    max_waiting: int = 1024  # queued requests at most; more are refused (the server answers 429)
    # automatic prefix caching: full KV blocks are named by their tokens and reused by later sequences with the
    # same prefix. None: on where it is exact (a KV cache, and not int4-w8a8, whose int4 form for <= 4 rows would
    # compute a cached prefix's suffix differently from the w8a8 form that computes a whole prompt)
    prefix_caching: bool | None = None
    # speculative decoding: "ngram" (prompt lookup) or a smaller model with the same tokenizer (a path or alias)
    # proposes num_speculative_tokens tokens per step, which the model verifies in one step; greedy outputs are
    # unchanged, sampled ones keep the model's distribution. None: off
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None  # None: 5 (prompt lookup) or 3 (a draft model), measured best here
    speculative_quantization: str | None = None  # the draft model's scheme; None: the model's own
    # positions of decoding sequences a step verifies at most (their last tokens and guesses): the spare rows are
    # split evenly over them. None: num_speculative_tokens + 1, one fully guessed sequence (on a 2-core
    # CPU a step of more rows costs more than the guesses yield; a GPU can take far more)
    speculative_max_rows: int | None = None
    # across devices (torch.distributed, launched by torchrun): ranks = tensor x pipeline parallel size
    tensor_parallel_size: int = 1  # heads, MLP columns and vocabulary split across this many ranks
    pipeline_parallel_size: int = 1  # contiguous layer stages on this many ranks

    def __post_init__(self) -> None:
        _require(self.device in DEVICES or self.device.startswith(("cuda:", "npu:")), "device",
                 f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        _require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_model_len is not None:
            _require(isinstance(self.max_model_len, int) and self.max_model_len > 1, "max_model_len",
                     f"must be an integer > 1, got {self.max_model_len!r}")
        _require(isinstance(self.max_batch_size, int) and self.max_batch_size >= 1, "max_batch_size",
                 f"must be a positive integer, got {self.max_batch_size!r}")
        if self.prefix_caching is not None:
            _require(isinstance(self.prefix_caching, bool), "prefix_caching",
                     f"must be true, false or null (on where exact), got {self.prefix_caching!r}")
            _require(not (self.prefix_caching and not self.kv_cache), "prefix_caching",
                     "needs the KV cache (kv_cache: true)")
        for name in ("kv_cache", "fusion", "compile"):
            _require(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        if self.quantization in ("none", "off", "fp", ""):
            object.__setattr__(self, "quantization", None)
        _require(self.quantization in QUANTIZATIONS, "quantization",
                 f"unknown scheme {self.quantization!r}; choose one of none, "
                 f"{', '.join(q for q in QUANTIZATIONS if q)}")
        if isinstance(self.quantization_skip, str):
            object.__setattr__(self, "quantization_skip", (self.quantization_skip,))
        object.__setattr__(self, "quantization_skip", tuple(self.quantization_skip or ()))
        for name in ("block_size", "max_num_batched_tokens", "max_waiting", "tensor_parallel_size",
                     "pipeline_parallel_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     f"must be a positive integer, got {value!r}")
        if self.num_blocks is not None:
            _require(isinstance(self.num_blocks, int) and self.num_blocks >= 1, "num_blocks",
                     f"must be a positive integer (or null: sized from kv_cache_memory), got {self.num_blocks!r}")
        if self.kv_cache_memory is not None:
            _require(isinstance(self.kv_cache_memory, (int, float)) and 0 < self.kv_cache_memory <= 1,
                     "kv_cache_memory", f"must be a fraction in (0, 1], got {self.kv_cache_memory!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"unknown KV cache dtype {self.kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
        _require(self.kv_cache or self.kv_cache_dtype == "auto", "kv_cache_dtype",
                 "needs the KV cache (kv_cache: true)")
        if self.speculative_model is not None:
            _require(isinstance(self.speculative_model, str) and self.speculative_model.strip() != "",
                     "speculative_model", f"must be 'ngram' or a model path or alias, got {self.speculative_model!r}")
            _require(self.kv_cache, "speculative_model", "needs the KV cache (kv_cache: true)")
            _require(self.tensor_parallel_size * self.pipeline_parallel_size == 1, "speculative_model",
                     "runs on one device: set tensor_parallel_size and pipeline_parallel_size to 1")
        if self.num_speculative_tokens is not None:
            _require(isinstance(self.num_speculative_tokens, int) and not isinstance(self.num_speculative_tokens, bool)
                     and 1 <= self.num_speculative_tokens <= 16, "num_speculative_tokens",
                     f"must be an integer in [1, 16], got {self.num_speculative_tokens!r}")
        if self.speculative_max_rows is not None:
            _require(isinstance(self.speculative_max_rows, int) and not isinstance(self.speculative_max_rows, bool)
                     and self.speculative_max_rows >= 2, "speculative_max_rows",
                     f"must be an integer >= 2, got {self.speculative_max_rows!r}")
        if self.speculative_quantization is not None:
            _require(self.speculative_quantization in ("none", *filter(None, QUANTIZATIONS)),
                     "speculative_quantization", f"unknown scheme {self.speculative_quantization!r}; choose one of "
                     f"none, {', '.join(q for q in QUANTIZATIONS if q)}")
        _require(self.kernels in KERNELS, "kernels",
                 f"unknown kernels {self.kernels!r}; choose one of {', '.join(KERNELS)}")
        _require(self.group_size in GROUP_SIZES, "group_size",
                 f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")


def speculative_tokens(cfg: "EngineConfig") -> int:
    """Guesses per step: as set, or the default measured best for the kind of proposer."""
    if cfg.num_speculative_tokens is not None:
        return cfg.num_speculative_tokens
    return 5 if cfg.speculative_model == "ngram" else 3


def speculative_rows(cfg: "EngineConfig") -> int:
    """Positions of decoding sequences one step verifies at most."""
    return cfg.speculative_max_rows or speculative_tokens(cfg) + 1


def draft_config(cfg: "EngineConfig", max_model_len: int) -> "EngineConfig":
    """How the draft model of `cfg.speculative_model` runs: the model's switches, its own scheme when
    speculative_quantization says so, the model's context (`max_model_len`, resolved), no prefix cache."""
    scheme = cfg.speculative_quantization or cfg.quantization
    return replace(cfg, speculative_model=None, num_speculative_tokens=None, speculative_quantization=None,
                   speculative_max_rows=None, quantization=None if scheme == "none" else scheme,
                   prefix_caching=False, max_model_len=max_model_len)


def prefix_caching_on(cfg: "EngineConfig") -> bool:
    """Whether `cfg` caches prefixes: as set, or (None) where exact."""
    if cfg.prefix_caching is not None:
        return cfg.prefix_caching
    return cfg.kv_cache and cfg.quantization != "int4-w8a8"


CONSTRAINTS = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the generated text must match. kind: json_schema (value: the schema as JSON text),
    json_object (any JSON object; value ""), regex, grammar (GBNF as llama.cpp takes it, or Lark), choice (value: a
    JSON list of strings)."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        _require(self.kind in CONSTRAINTS, "constraint",
                 f"unknown kind {self.kind!r}; choose one of {', '.join(CONSTRAINTS)}")
        _require(isinstance(self.value, str), "constraint", f"the {self.kind} must be text, got {self.value!r}")
        _require(bool(self.value) or self.kind == "json_object", "constraint", f"the {self.kind} is empty")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return the chosen token's log-probability and this many alternatives
    include_stop_str_in_output: bool = False
    # OpenAI's penalties on the tokens generated so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), a dict is accepted too
    constraint: Constraint | None = None  # structured output: only tokens that keep the text matching it

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        _require(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
                 "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        _require(isinstance(t, (int, float)) and not math.isnan(t) and 0.0 <= t, "temperature",
                 f"must be a number >= 0 (0 = greedy), got {t!r}")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        _require(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0, "top_p",
                 f"must be in (0, 1], got {self.top_p!r}")
        _require(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0, "min_p",
                 f"must be in [0, 1], got {self.min_p!r}")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        if self.logprobs is not None:
            _require(isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20, "logprobs",
                     f"must be an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None:
            _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and -2**63 <= self.seed < 2**64,
                     "seed", f"must be an integer in [-2^63, 2^64), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and -2.0 <= value <= 2.0,
                     name, f"must be a number in [-2, 2], got {value!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        try:
            bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        except (TypeError, ValueError):
            raise ConfigError(f"logit_bias: must map token ids to numbers, got {self.logit_bias!r}") from None
        _require(all(t >= 0 and -100.0 <= b <= 100.0 for t, b in bias), "logit_bias",
                 "token ids must be >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        _require(self.constraint is None or isinstance(self.constraint, Constraint), "constraint",
                 f"must be a Constraint, got {self.constraint!r}")

    @property
    def penalized(self) -> bool:
        """Whether the logits need processing before sampling (penalties or a bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
