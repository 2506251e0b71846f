"""The step machine: requests in, one continuous-batching step at a time, outputs out.

`step()` = schedule (which sequences, how many tokens each), execute (the runner's forward over all of them at
once, and the next token of each sequence that reached its end), update (append, detect stops, free finished
sequences' blocks). `LLM.generate` and the HTTP server both drive this one engine.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

from ..config import EngineConfig, SamplingParams, prefix_caching_on, speculative_rows, speculative_tokens
from ..errors import ContextLengthError, InferRecipesError
from ..runner import ModelRunner, Sampled, SampleRequest, StepSeq, make_generator
from ..runner.grammar import Grammars
from ..tokenizer import IncrementalDetokenizer, LLMTokenizer
from .block_pool import BlockPool
from .request import Request, RequestOutput
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .speculative import DraftModel, PromptLookup

Prompt = str | Sequence[int]


class CheckedPrompt(NamedTuple):
    """A prompt already tokenized and validated (`LLMEngine.token_ids`): added as it is, not checked again."""

    text: str | None
    ids: list[int]


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: LLMTokenizer, config: EngineConfig,
                 eos_token_ids: frozenset[int], draft_runner: ModelRunner | None = None):
        """draft_runner: the smaller model of `config.speculative_model` when it names one (built by the
        caller)."""
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.max_model_len, self.vocab_size = runner.max_model_len, runner.model_config.vocab_size
        self.eos_token_ids = eos_token_ids
        self.block_pool = BlockPool(runner.cache.num_blocks if runner.cache is not None else 1, config.block_size,
                                    caching=prefix_caching_on(config))
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_batch_size,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_waiting=config.max_waiting,
                                                   recompute=not config.kv_cache), self.block_pool)
        self.proposer = None
        if config.speculative_model == "ngram":
            self.proposer = PromptLookup(speculative_tokens(config), speculative_rows(config))
        elif config.speculative_model is not None:
            if draft_runner is None:
                raise InferRecipesError(f"speculative_model {config.speculative_model!r}: the draft model was not "
                                        "built (LLM builds it; an LLMEngine made by hand takes it as draft_runner)")
            self.proposer = DraftModel(draft_runner, speculative_tokens(config), speculative_rows(config))
        self.grammars = Grammars(tokenizer, self.vocab_size, eos_token_ids)  # structured output, compiled on use
        self.drafted = self.accepted = self.draft_steps = 0  # guesses verified and kept, in this many verifications
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.driver = None  # the AsyncEngine whose thread steps this engine, if any: nobody else may then

    # ---- requests -----------------------------------------------------------------------------------------------
    def token_ids(self, prompt: Prompt) -> CheckedPrompt:
        """(text or None, token ids) of a prompt, validated: non-empty, in the vocabulary, within the context."""
        if isinstance(prompt, CheckedPrompt):
            return prompt
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
        return CheckedPrompt(text, ids)

    def add_request(self, prompt: Prompt | CheckedPrompt, params: SamplingParams | None = None,
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
        matcher = self.grammars.matcher(params.constraint) if params.constraint is not None else None
        request = Request(request_id, text, list(ids), params, stop_ids, IncrementalDetokenizer(self.tokenizer, ids),
                          max_len=self.max_model_len, generator=make_generator(params.seed, self.runner.device),
                          matcher=matcher)
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its KV blocks (an unknown or finished id is ignored)."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.finish_reason = request.finish_reason or "abort"
            self.scheduler.finish(request)
            if self.proposer is not None:
                self.proposer.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one iteration. Returns an output for every request that produced a token or failed (finished ones
        the last time they appear); a request that broke inside the step has finish_reason "error"."""
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running)  # sets (or clears) every running request's draft
        scheduled = self.scheduler.schedule()
        results = self.runner.execute(*_runner_inputs(scheduled)) if scheduled.scheduled else []
        return self._update(scheduled, results)

    def _update(self, scheduled: SchedulerOutput,
                results: list[Sampled | list[Sampled] | str | None]) -> list[RequestOutput]:
        self.num_steps += bool(results)
        done: list[tuple[Request, str, int]] = []  # (request, new text, new tokens) of those that produced any
        accepted: dict[str, int] = {}
        for s, result in zip(scheduled.scheduled, results):
            request: Request = s.seq
            if result is None:
                continue  # a prefill chunk: nothing sampled yet
            if isinstance(result, str):
                request.fail(result)
                done.append((request, "", 0))
                continue
            picks = result if isinstance(result, list) else [result]
            delta, added = "", 0
            for pick in picks:  # kept guesses, then the model's own token; none past a stop or the length
                delta += request.append(pick.token, pick.logprob, pick.top)
                added += 1
                if request.finish_reason is not None:
                    break
            if s.draft:
                accepted[request.request_id] = added - 1  # fewer than kept when a stop came first
                request.drafted += len(s.draft)
                request.accepted += len(picks) - 1
                request.draft_steps += 1
                self.drafted += len(s.draft)
                self.accepted += len(picks) - 1
                self.draft_steps += 1
            done.append((request, delta, added))
        self.scheduler.update(scheduled, frozenset(s.seq.request_id for s, r in zip(scheduled.scheduled, results)
                                                   if isinstance(r, str)), accepted)
        outputs = []
        for request, delta, added in done:
            if request.finish_reason is None:
                outputs.append(request.output(delta, added))
                continue
            self.scheduler.finish(request)  # its blocks go back to the pool
            self.requests.pop(request.request_id, None)
            if self.proposer is not None:
                self.proposer.forget(request.request_id)
            outputs.append(request.output(delta, 0 if request.error else added))
        return outputs

    def reset_prefix_cache(self) -> int:
        """Forgets the cached blocks no sequence holds (BlockPool.forget_idle); how many."""
        return self.block_pool.forget_idle()

    # ---- state, for metrics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_cache_usage": self.block_pool.usage if self.config.kv_cache else 0.0,
                "kv_blocks_total": self.block_pool.num_blocks, "kv_blocks_free": self.block_pool.num_free,
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps,
                "prefix_cache_queries": self.block_pool.queries, "prefix_cache_hits": self.block_pool.hits,
                "prefix_cache_blocks": self.block_pool.num_cached,
                "spec_draft_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_steps": self.draft_steps}


def _runner_inputs(scheduled: SchedulerOutput) -> tuple[list[StepSeq], list[SampleRequest]]:
    """The step's sequences as the runner takes them, and what sampling needs of those that reach their end."""
    seqs = [StepSeq(s.seq.tokens(s.start, s.num_tokens - len(s.draft)) + list(s.draft), s.start, s.seq.block_table,
                    s.sample, len(s.draft)) for s in scheduled.scheduled]
    sampling = [SampleRequest(s.seq.params, s.seq.generator, s.seq.output_ids, s.seq.matcher)
                for s in scheduled.scheduled if s.sample]
    return seqs, sampling
