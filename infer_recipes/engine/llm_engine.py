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
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput

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
        too_big = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if too_big:
            raise InferRecipesError(f"logit_bias: token id {too_big[0]} is outside the vocabulary "
                                    f"[0, {self.vocab_size})")
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
        """Runs one iteration: schedule, execute, update. Returns an output for every request that produced a
        token or failed (finished ones the last time they appear)."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        logits, failed = self._execute(plan)
        self.scheduler.update(plan)
        self.num_steps += 1
        return self._update(plan, logits, failed)

    def _execute(self, plan: SchedulerOutput) -> tuple[torch.Tensor, dict[int, str]]:
        """The step's logits (rows of the sampling sequences, in order). Should the step fail, each sequence runs
        again alone, so that only the ones that fail by themselves fail ({index in the plan: why}): one bad
        request never takes the others down with it. Re-running rewrites the same keys and values."""
        seqs = [StepSeq(s.seq.tokens(s.start, s.num_tokens), s.start, s.seq.block_table, s.sample)
                for s in plan.scheduled]
        try:
            return self.runner.execute(seqs), {}
        except Exception as e:
            if len(seqs) == 1:
                return torch.empty(0, self.vocab_size), {0: _describe(e)}
        rows, failed = [], {}
        for i, seq in enumerate(seqs):
            try:
                out = self.runner.execute([seq])
            except Exception as e:
                failed[i] = _describe(e)
                continue
            if seq.sample:
                rows.append(out)
        return (torch.cat(rows) if rows else torch.empty(0, self.vocab_size)), failed

    def _update(self, plan: SchedulerOutput, logits: torch.Tensor, failed: dict[int, str]) -> list[RequestOutput]:
        outputs = []
        for i, why in failed.items():
            request = plan.scheduled[i].seq
            request.fail(f"the model's forward pass failed on this request: {why}")
            outputs.append(self._finish(request, ""))
        sampling = [s.seq for i, s in enumerate(plan.scheduled) if s.sample and i not in failed]
        if not sampling:
            return outputs
        for request, pick in zip(sampling, self._sample(sampling, logits)):
            try:
                if isinstance(pick, Exception):
                    raise pick
                delta = request.append(*pick)
            except Exception as e:
                request.fail(f"sampling failed: {_describe(e)}")
                delta = ""
            outputs.append(self._finish(request, delta) if request.finish_reason else request.output(delta, 1))
        return outputs

    @staticmethod
    def _sample(requests: list[Request], logits: torch.Tensor) -> list[tuple | Exception]:
        """(token, logprob, top logprobs) per request, sampled as one batch; should that fail, row by row, so
        that a row that cannot be sampled fails alone (its Exception in its place)."""
        def picks(rows: list[Request], lg: torch.Tensor) -> list[tuple]:
            r = sample(lg, [q.params for q in rows], [q.generator for q in rows], [q.output_ids for q in rows])
            return [(r.tokens[i], r.logprobs[i] if r.logprobs else None, r.top_logprobs[i] if r.top_logprobs
                     else None) for i in range(len(rows))]

        # the batch may fail after drawing from some rows' generators: they restart from here, so a row's draws
        # are the same whichever way it is sampled
        states = [(q.generator, q.generator.get_state()) for q in requests
                  if isinstance(q.generator, torch.Generator) and not q.params.greedy]
        try:
            return picks(requests, logits)
        except Exception:
            for generator, state in states:
                generator.set_state(state)
            out = []
            for row, request in enumerate(requests):
                try:
                    out += picks([request], logits[row:row + 1])
                except Exception as e:
                    out.append(e)
            return out

    def _finish(self, request: Request, delta: str) -> RequestOutput:
        """A request that just finished leaves the scheduler (its blocks go back to the pool)."""
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)
        return request.output(delta, 0 if request.error else 1)

    # ---- state, for metrics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_cache_usage": self.block_pool.usage if self.config.kv_cache else 0.0,
                "kv_blocks_total": self.block_pool.num_blocks, "kv_blocks_free": self.block_pool.num_free,
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps}


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
