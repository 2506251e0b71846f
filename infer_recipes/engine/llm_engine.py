"""The step machine: requests in, one continuous-batching step at a time, outputs out.

`step()` = schedule (which sequences, how many tokens each), execute (the runner's forward over all of them at
once), update (sample, append, detect stops, free finished sequences' blocks). `LLM.generate` and the HTTP server
both drive this one engine.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..config import EngineConfig, ModelConfig, SamplingParams
from ..device import device_memory_bytes
from ..errors import ContextLengthError, InferRecipesError
from ..runner import ModelRunner, StepSeq
from ..sampling import make_generator, sample
from ..tokenizer import IncrementalDetokenizer, LLMTokenizer
from .block_pool import BlockPool
from .request import Request, RequestOutput
from .scheduler import Scheduler, SchedulerConfig

Prompt = str | Sequence[int]
DEFAULT_KV_FRACTION = 0.25


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers: keys and values of block_size tokens."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * block_size \
        * torch.empty((), dtype=dtype).element_size()


def kv_pool_blocks(model: ModelConfig, cfg: EngineConfig, max_model_len: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """Blocks for the KV pool: `num_blocks` if given, else what `kv_cache_memory` of the device holds, capped at
    what max_batch_size sequences of max_model_len tokens need, and never fewer than one full-length sequence."""
    one_seq = -(-max_model_len // cfg.block_size)
    if cfg.num_blocks is not None:
        if cfg.num_blocks < one_seq:
            raise InferRecipesError(f"num_blocks={cfg.num_blocks} cannot hold one sequence of max_model_len="
                                    f"{max_model_len} tokens ({one_seq} blocks of {cfg.block_size}): raise "
                                    f"num_blocks or lower max_model_len")
        return cfg.num_blocks
    budget = int((cfg.kv_cache_memory or DEFAULT_KV_FRACTION) * device_memory_bytes(device))
    return max(one_seq, min(cfg.max_batch_size * one_seq, budget // kv_block_bytes(model, cfg.block_size, dtype)))


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: LLMTokenizer, config: EngineConfig, max_model_len: int,
                 vocab_size: int, eos_token_ids: frozenset[int]):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.max_model_len, self.vocab_size, self.eos_token_ids = max_model_len, vocab_size, eos_token_ids
        blocks = runner.pool.num_blocks if runner.pool is not None else 1
        self.block_pool = BlockPool(blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_batch_size,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_waiting=config.max_waiting,
                                                   recompute=not config.kv_cache), self.block_pool)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.driver = None  # the AsyncEngine whose thread steps this engine, if any: nobody else may then

    # ---- requests -----------------------------------------------------------------------------------------------
    def token_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, validated: non-empty, in the vocabulary, within the context."""
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise InferRecipesError("a prompt must be a string or a list of integer token ids")
        if not ids:
            raise InferRecipesError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InferRecipesError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(len(ids), self.max_model_len)
        return text, ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues a request; returns its id. Raises QueueFullError when the waiting queue is at its bound."""
        params = params or SamplingParams()
        text, ids = self.token_ids(prompt)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InferRecipesError(f"request id {request_id!r} is already in use")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request = Request(request_id, text, ids, params, stop_ids, IncrementalDetokenizer(self.tokenizer, ids),
                          max_len=self.max_model_len,
                          generator=make_generator(params.seed, self.runner.device))
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its KV blocks (an unknown or finished id is ignored)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.finish_reason = request.finish_reason or "abort"
            self.scheduler.finish(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns an output for every request that produced a token (finished ones last
        time they appear)."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        seqs = [StepSeq(s.seq.tokens(s.start, s.num_tokens), s.start, s.seq.block_table, s.sample)
                for s in plan.scheduled]
        logits = self.runner.execute(seqs)
        self.scheduler.update(plan)
        self.num_steps += 1
        sampling = [s.seq for s in plan.scheduled if s.sample]
        if not sampling:
            return []
        result = sample(logits, [r.params for r in sampling], [r.generator for r in sampling])
        outputs = []
        for i, request in enumerate(sampling):
            delta = request.append(result.tokens[i], result.logprobs[i] if result.logprobs else None,
                                   result.top_logprobs[i] if result.top_logprobs else None)
            if request.finish_reason is not None:
                self.scheduler.finish(request)
                self.requests.pop(request.request_id, None)
            outputs.append(request.output(delta, 1))
        return outputs

    # ---- state, for metrics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_cache_usage": self.block_pool.usage if self.config.kv_cache else 0.0,
                "kv_blocks_total": self.block_pool.num_blocks, "kv_blocks_free": self.block_pool.num_free,
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps}
