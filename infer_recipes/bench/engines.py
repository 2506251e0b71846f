"""The engines a benchmark times, behind one interface: ours (the public `LLM` with any switches), Hugging Face
`transformers` eager on the same weights, and llama.cpp (`llama-cpp-python`, an optional extra) on the same GGUF.

Every engine runs a batch of prompts of one length to a fixed number of new tokens (end-of-sequence ignored) and
says when the whole batch had its first token and when it finished.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field

import torch

from ..device import resolve_device, synchronize
from ..errors import InferRecipesError

KINDS = ("ours", "transformers", "llama.cpp")


class Unsupported(InferRecipesError):
    """This engine cannot run this cell (e.g. llama.cpp beyond batch 1); the cell is reported as n/a."""


@dataclass(frozen=True)
class EngineSpec:
    """What to build: a label for the tables, the engine kind, the model and (ours) the LLM options."""

    label: str
    kind: str
    model: str
    options: dict = field(default_factory=dict)
    recipe: str | None = None

    def to_json(self) -> dict:
        return {"label": self.label, "kind": self.kind, "model": self.model, "options": self.options,
                "recipe": self.recipe}

    @classmethod
    def from_json(cls, d: dict) -> "EngineSpec":
        return cls(d["label"], d["kind"], d["model"], d.get("options") or {}, d.get("recipe"))


@dataclass(frozen=True)
class Timing:
    ttft_s: float  # submission to the moment every sequence of the batch has its first token
    e2e_s: float  # submission to the last token of the last sequence
    preemptions: int = 0


class Engine:
    spec: EngineSpec
    device: torch.device
    dtype: str

    def run(self, prompts: list[list[int]], output_len: int) -> Timing:
        raise NotImplementedError

    def weight_bytes_read(self, batch: int = 1) -> int:
        """Weight bytes one decode step of `batch` sequences reads: every layer, the final norm and the lm_head (the
        embedding table only where the lm_head is that table), whatever their storage."""
        raise NotImplementedError

    def kv_bytes_per_token(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict:
        return {**self.spec.to_json(), "device": self.device.type, "dtype": self.dtype}


def _unique_bytes(tensors) -> dict[int, int]:
    return {t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.numel()}


def _decode_bytes(model: torch.nn.Module, embedding: torch.nn.Module, head: torch.nn.Module, rows: int) -> int:
    """All weights, less the embedding table's tensors that the lm_head does not share (decode reads one row) and
    the forms a module keeps for other row counts (`idle_parts`: int4-w8a8's prefill form)."""
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if "rotary" not in n and "inv_freq" not in n)]
    total = _unique_bytes(tensors)
    for m in model.modules():
        for idle in getattr(m, "idle_parts", lambda rows: [])(rows):
            for ptr in _unique_bytes([*idle.parameters(), *idle.buffers()]):
                total.pop(ptr, None)
    head_ptrs = set(_unique_bytes([*head.parameters(), *head.buffers()]))
    for ptr in _unique_bytes([*embedding.parameters(), *embedding.buffers()]):
        if ptr not in head_ptrs:
            total.pop(ptr, None)
    return sum(total.values())


def _kv_bytes(config, element_size: int) -> int:
    from ..runner import kv_bytes_per_token

    return int(kv_bytes_per_token(config, element_size))


class OurEngine(Engine):
    def __init__(self, spec: EngineSpec, max_batch: int, max_len: int, progress: bool):
        from ..engine.llm import LLM

        options = dict(spec.options)
        options["max_batch_size"] = max(max_batch, options.get("max_batch_size") or 1)
        if options.get("max_model_len") is None:
            options["max_model_len"] = max_len  # a KV pool sized to the benchmark, not to a 128k context
        if options.get("prefix_caching") is None:
            # every run sends the same prompts: with their blocks cached from the warm-up, a run would time a
            # one-token prefill (an int4 SmolLM2 "prefilled" 512 tokens at 4,800 tok/s). On only when asked for
            options["prefix_caching"] = False
        self.llm = LLM(spec.model, progress=progress, **options)
        self.spec, self.device = spec, self.llm.device
        self.dtype = str(self.llm.dtype).removeprefix("torch.")
        if max_len > self.llm.max_model_len:
            raise InferRecipesError(f"{spec.label}: input + output = {max_len} tokens exceed the context window "
                                    f"({self.llm.max_model_len}); lower --input-lens or --output-len")

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def config(self):
        return self.llm.model_config

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], output_len: int) -> Timing:
        from ..config import SamplingParams

        engine = self.llm.engine
        if engine.has_unfinished_requests():
            raise InferRecipesError("the engine is busy with other requests")
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        before = engine.stats()["preemptions"]
        synchronize(self.device)
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        started, first, made = set(), None, {}
        while engine.has_unfinished_requests():
            for out in engine.step():  # sampled tokens reach the host: the step is complete
                if out.token_ids:
                    started.add(out.request_id)
                if out.finished:
                    made[out.request_id] = len(out.token_ids)
            if first is None and len(started) == len(ids):
                first = time.perf_counter()
        end = time.perf_counter()
        if any(made.get(i) != output_len for i in ids):
            raise InferRecipesError(f"{self.spec.label}: a sequence stopped before {output_len} tokens")
        return Timing(first - start, end - start, engine.stats()["preemptions"] - before)

    def weight_bytes_read(self, batch: int = 1) -> int:
        m = self.llm.model
        return _decode_bytes(m, m.model.embed_tokens, m.lm_head, batch)

    def kv_bytes_per_token(self) -> int:
        return int(self.llm.kv_bytes_per_token())


class TransformersEngine(Engine):
    """Hugging Face eager on the same weights: the GGUF or directory itself, or for `synthetic:` presets the very
    tensors our loader draws (same generator, same seed)."""

    def __init__(self, spec: EngineSpec, progress: bool):
        if importlib.util.find_spec("transformers") is None:
            raise InferRecipesError("the transformers baseline needs `pip install transformers accelerate` "
                                    "(the test extra: pip install -e '.[test]')")
        from ..device import resolve_dtype
        from ..loading import resolve_model_source
        from ..loading.weights import read_config

        self.spec = spec
        self.device = resolve_device(spec.options.get("device", "auto"))
        self.dtype = spec.options.get("dtype", "float32")
        torch_dtype = resolve_dtype(self.dtype, self.device)
        self.source = resolve_model_source(spec.model)
        self.config = read_config(self.source)
        if self.source.kind == "synthetic":
            self.model = self._synthetic(torch_dtype)
        else:
            from transformers import AutoModelForCausalLM

            kwargs = {"dtype": torch_dtype}
            if self.source.kind == "gguf":
                kwargs.update(pretrained_model_name_or_path=os.path.dirname(self.source.location),
                              gguf_file=os.path.basename(self.source.location))
            else:
                kwargs["pretrained_model_name_or_path"] = self.source.location
            self.model = AutoModelForCausalLM.from_pretrained(**kwargs)
        self.model = self.model.to(self.device).eval()

    def _synthetic(self, dtype: torch.dtype):
        import transformers

        from ..loading.synthetic import iter_tensors

        c = self.config
        hf_config = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, tie_word_embeddings=c.tie_word_embeddings,
            attention_bias=c.attention_bias, bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids))
        with torch.device("meta"):  # no random init of billions of parameters only to overwrite them
            model = transformers.LlamaForCausalLM(hf_config)
        state = dict(iter_tensors(c, dtype, torch.device("cpu")))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise InferRecipesError(f"synthetic weights do not map onto transformers' Llama: missing {missing}, "
                                    f"unexpected {unexpected}")
        model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)  # its buffers were on meta
        return model

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], output_len: int) -> Timing:
        from transformers import LogitsProcessor, LogitsProcessorList

        device, stamps = self.device, []

        class FirstToken(LogitsProcessor):  # called once per step, after the forward: the prefill is done
            def __call__(self, input_ids, scores):
                if not stamps:
                    synchronize(device)
                    stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts, device=self.device)
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                  min_new_tokens=output_len, do_sample=False, pad_token_id=0,
                                  logits_processor=LogitsProcessorList([FirstToken()]))
        synchronize(self.device)
        end = time.perf_counter()
        if out.shape[1] != ids.shape[1] + output_len:
            raise InferRecipesError(f"transformers made {out.shape[1] - ids.shape[1]} tokens, not {output_len}")
        return Timing(stamps[0] - start, end - start)

    def weight_bytes_read(self, batch: int = 1) -> int:
        return _decode_bytes(self.model, self.model.get_input_embeddings(), self.model.get_output_embeddings(), batch)

    def kv_bytes_per_token(self) -> int:
        return _kv_bytes(self.config, self.model.dtype.itemsize)


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python on the same GGUF file: batch 1 only (its high-level API runs one
    sequence), CPU, f16 KV cache."""

    def __init__(self, spec: EngineSpec, max_len: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise Unsupported("llama.cpp baseline: llama-cpp-python is not installed (optional extra: "
                              "pip install -e '.[llamacpp]', builds llama.cpp from source)") from None
        from ..loading import resolve_model_source
        from ..loading.weights import read_config

        source = resolve_model_source(spec.model)
        if source.kind != "gguf":
            raise Unsupported(f"llama.cpp baseline: {spec.model} is not a GGUF file; llama.cpp runs GGUF only")
        self.spec, self.device, self.dtype, self.path = spec, torch.device("cpu"), "gguf", source.location
        self.config = read_config(source)
        threads = torch.get_num_threads()
        self.llama = Llama(model_path=source.location, n_ctx=max_len, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False)

    def run(self, prompts: list[list[int]], output_len: int) -> Timing:
        if len(prompts) != 1:
            raise Unsupported("llama.cpp runs batch 1 only here")
        self.llama.reset()  # no reuse of the previous run's prompt cache
        start, first, made = time.perf_counter(), None, 0
        for _ in self.llama.generate(prompts[0], top_k=1, temp=0.0, reset=True):  # ignores end-of-sequence
            made += 1
            first = first or time.perf_counter()
            if made == output_len:
                break
        return Timing(first - start, time.perf_counter() - start)

    def weight_bytes_read(self, batch: int = 1) -> int:
        return os.path.getsize(self.path)  # the file is the weights (a tied table is read as the lm_head)

    def kv_bytes_per_token(self) -> int:
        return _kv_bytes(self.config, 2)


def build(spec: EngineSpec, max_batch: int, max_len: int, progress: bool = False) -> Engine:
    if spec.kind == "ours":
        return OurEngine(spec, max_batch, max_len, progress)
    if spec.kind == "transformers":
        return TransformersEngine(spec, progress)
    if spec.kind == "llama.cpp":
        return LlamaCppEngine(spec, max_len)
    raise InferRecipesError(f"unknown engine kind {spec.kind!r}: choose one of {', '.join(KINDS)}")
