"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from tqdm import tqdm

from .. import distributed
from ..config import EngineConfig, SamplingParams, draft_config
from ..device import resolve_device, returning_host_memory
from ..errors import InferRecipesError
from ..runner import build, checkpoint_switches, kv_blocks, prepare, run_worker, sharing
from ..tokenizer import LLMTokenizer, load_tokenizer
from .llm_engine import LLMEngine, Prompt
from .request import RequestOutput


class LLM:
    """A model, its tokenizer and an engine, ready to generate.

    model: a Hugging Face directory, a .gguf file, an alias (`smollm2-135m-instruct`) or `synthetic:<preset>`
    (random weights in a published shape: fast to build, meaningless output).

    Across devices (`tensor_parallel_size` x `pipeline_parallel_size` > 1, every rank started by torchrun): the
    constructor returns on rank 0 only, which holds the tokenizer and the engine and drives the others. On the
    other ranks it runs the steps rank 0 sends (for this LLM and any rank 0 builds later) and ends the process
    when rank 0 stops them (`infer_recipes.distributed.shutdown()`, or rank 0's exit).
    """

    _next_id = 0

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", max_model_len: int | None = None,
                 max_batch_size: int = 16, progress: bool = True, draft: "LLM | None" = None, **switches):
        """switches: the optimization fields of `EngineConfig` (kv_cache, prefix_caching, fusion, compile,
        quantization, quantization_skip, group_size, speculative_model, num_speculative_tokens,
        speculative_quantization, speculative_max_rows), the KV cache's and scheduler's (block_size, num_blocks,
        ...) and the parallel sizes (tensor_parallel_size, pipeline_parallel_size).

        draft: an LLM already loaded that drafts for this one (speculative decoding) on its own weights, no second
        copy, with KV blocks of its own here; it goes on serving its own requests. Instead of loading
        `speculative_model`, which then only names it."""
        known = set(EngineConfig.__dataclass_fields__) - {"device", "dtype", "max_model_len", "max_batch_size"}
        unknown = sorted(set(switches) - known)
        if unknown:
            raise InferRecipesError(f"unknown LLM option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.name = model
        self.draft_llm = draft  # kept alive while it drafts here
        if draft is not None:
            if switches.get("speculative_model") == "ngram" or switches.get("speculative_quantization"):
                raise InferRecipesError("draft: a loaded draft model drafts with its own weights and scheme; drop "
                                        "speculative_model: ngram and speculative_quantization")
            switches["speculative_model"] = switches.get("speculative_model") or draft.name
        switches = checkpoint_switches(model, switches)  # a calibrated checkpoint's scheme, unless one is named
        self.engine_config = cfg = EngineConfig(device=device, dtype=dtype, max_model_len=max_model_len,
                                                max_batch_size=max_batch_size, **switches)
        device_ = resolve_device(device)
        if distributed.launched():
            world = distributed.context(device_.type)
            if world.rank != 0:
                run_worker(world)  # serves rank 0's models until it stops them, then ends the process
        with returning_host_memory():
            blueprint = prepare(model, cfg, device_)  # every check that needs no weights, before joining a world
            world = None
            if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
                world = distributed.context(device_.type)
                blueprint = replace(blueprint, device=world.device)  # this rank's device (cuda:LOCAL_RANK)
            self.tokenizer: LLMTokenizer = load_tokenizer(blueprint.source)
            num_blocks = kv_blocks(blueprint)
            draft_bp = None  # checked before either model loads
            if draft is not None:
                _check_draft(f"draft {draft.name!r}", draft.max_model_len, draft.model_config.vocab_size,
                             draft.tokenizer, blueprint, self.tokenizer)
                if draft.device != device_:
                    raise InferRecipesError(f"draft {draft.name!r} is on {draft.device}, this model on {device_}: "
                                            "a shared draft must be on the same device")
            elif cfg.speculative_model not in (None, "ngram"):
                draft_bp = _prepare_draft(cfg, blueprint, self.tokenizer, device_)
            if world is None:
                self.model_id = 0
                self.runner = build(blueprint, num_blocks, progress=progress)
            else:
                self.model_id, LLM._next_id = LLM._next_id, LLM._next_id + 1
                with world.command("load", self.model_id, model, cfg, num_blocks):  # the others build theirs now
                    # after the command: making a layout's process groups is collective, every rank joins in
                    shard = world.shard(blueprint.model_config.num_layers, cfg.tensor_parallel_size,
                                        cfg.pipeline_parallel_size)
                    self.runner = build(blueprint, num_blocks, shard, world, self.model_id, progress)
                weakref.finalize(self, world.free_later, self.model_id)
            if draft is not None:
                draft = sharing(draft.runner, draft_config(cfg, blueprint.max_model_len), blueprint.max_model_len)
            elif draft_bp is not None:
                draft = build(draft_bp, kv_blocks(draft_bp), progress=progress)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.draft_runner = draft
        self.engine = LLMEngine(self.runner, self.tokenizer, cfg, self.eos_token_ids, draft)

    # ---- what was built (the runner owns it) -------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def model_config(self):
        return self.runner.model_config

    @property
    def source(self):
        return self.runner.source

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def load_seconds(self) -> float:
        return self.runner.load_seconds

    @property
    def compile_seconds(self) -> float:
        return self.runner.compile_seconds

    @property
    def compiles(self) -> int:
        """Graphs torch.compile has built so far; after the warm-up at load, growth means a recompile."""
        return self.runner.compiles

    def weight_bytes(self) -> int:
        """Bytes of the weights as they are held now (quantized ones included, tied ones counted once), a draft
        model's included."""
        return sum(r.weight_bytes() for r in (self.runner, self.draft_runner) if r is not None)

    def kv_cache_bytes(self) -> int:
        """Bytes reserved for the KV cache, a draft model's included (0 without one; on the CPU pages are
        committed on use)."""
        return sum(r.kv_cache_bytes() for r in (self.runner, self.draft_runner) if r is not None)

    def kv_bytes_per_token(self) -> float:
        """Bytes one token's keys and values take in this model's KV pool (its kv_cache_dtype, scales included)."""
        return self.runner.kv_bytes_per_token()

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
        checked = [self.engine.token_ids(p) for p in prompts]  # every prompt checked (once) before any runs
        if self.engine.driver is not None or self.engine.has_unfinished_requests():
            raise InferRecipesError("this LLM's engine is serving other requests (a server or another caller): "
                                    "use one LLM per caller")
        ids = []
        try:
            for p, sp in zip(checked, params_list):
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
        return self.runner.full_logits(self.engine.token_ids(prompt).ids)


def _prepare_draft(cfg: EngineConfig, target, tokenizer: LLMTokenizer, device: torch.device):
    """The blueprint of the draft model of `cfg.speculative_model` (config.draft_config); refused, with the
    reason, when its context is shorter than the target's or its tokenizer is not the target's (its guesses would
    be other tokens)."""
    draft_cfg = draft_config(cfg, target.max_model_len)
    where = f"speculative_model {cfg.speculative_model!r}"
    try:
        bp = prepare(cfg.speculative_model, draft_cfg, device)
    except InferRecipesError as e:
        raise InferRecipesError(f"{where}: {e}") from None
    _check_draft(where, bp.max_model_len, bp.model_config.vocab_size, load_tokenizer(bp.source), target, tokenizer)
    return bp


def _check_draft(where: str, max_len: int, vocab_size: int, draft_tok: LLMTokenizer, target,
                 tokenizer: LLMTokenizer) -> None:
    """Refuses a draft whose context is shorter than the target's or whose tokenizer is not the target's."""
    if max_len < target.max_model_len:
        raise InferRecipesError(f"{where}: its context ({max_len} tokens) is shorter than the model's "
                                f"({target.max_model_len}); set max_model_len to at most {max_len}")
    if (vocab_size != target.model_config.vocab_size
            or draft_tok.tokenizer.get_vocab(with_added_tokens=True) != tokenizer.tokenizer.get_vocab(
                with_added_tokens=True)):
        raise InferRecipesError(f"{where}: its vocabulary differs from the model's ({vocab_size} "
                                f"vs {target.model_config.vocab_size} token ids, or other tokens at the same ids): a "
                                "draft model must share the model's tokenizer")
