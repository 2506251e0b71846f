"""One API request on one model: its prompts tokenized and checked once, its choices admitted to the model's
queue before any reply is sent, then run to the end or streamed."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from ..config import ConfigError, SamplingParams
from ..engine.async_engine import RequestFailedError, Ticket
from ..engine.llm_engine import CheckedPrompt
from ..engine.request import RequestOutput
from ..engine.scheduler import QueueFullError
from ..errors import ContextLengthError, InferRecipesError
from .metrics import Metrics
from . import tool_calls
from .pool import Entry
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request, server_error

RETRY_AFTER_S = 1  # what a 429 asks a client to wait


class Job:
    """Prompts (token ids), one SamplingParams per choice (n per prompt), and the queue places they hold."""

    def __init__(self, entry: Entry, prompts: list[CheckedPrompt], params: SamplingParams, n: int,
                 metrics: Metrics, tool_mode: str | None = None, tool_names: frozenset[str] = frozenset()):
        self.entry, self.checked, self.n, self.metrics = entry, prompts, n, metrics
        self.prompts = [p.ids for p in prompts]
        # every choice its own seed, so n > 1 with a seed gives n different (reproducible) answers
        self.params = [replace(params, seed=None if params.seed is None else params.seed + j) for j in range(n)]
        self.ticket: Ticket | None = None
        # how the choices may call tools (ChatCompletionRequest.tool_mode), and the functions they may call
        self.tool_mode, self.tool_names = tool_mode, tool_names

    @classmethod
    async def create(cls, entry: Entry, req: CompletionRequest | ChatCompletionRequest, metrics: Metrics,
                     force_logprobs: bool = False) -> "Job":
        """Tokenizes and checks the prompts (off the event loop), builds the sampling params and admits the
        choices to the model's queue: every refusal (400, 429) happens here, before a reply starts."""
        chat = isinstance(req, ChatCompletionRequest)
        prompts = await asyncio.to_thread(_token_ids, entry, req, chat)
        limit = entry.llm.max_model_len
        longest = max(len(p.ids) for p in prompts)
        if req.max_tokens is not None and longest + req.max_tokens > limit:
            raise bad_request(f"the request exceeds the available context size: the prompt has {longest} tokens "
                              f"and max_tokens is {req.max_tokens}, {longest + req.max_tokens} in all, but the "
                              f"context is {limit} tokens; lower max_tokens or shorten the prompt", "max_tokens",
                              "exceed_context_size")
        default = limit - longest if chat else min(16, limit - longest)
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        if force_logprobs and logprobs is None:
            logprobs = 0
        try:
            params = req.sampling_params(req.max_tokens or default, logprobs)
        except ConfigError as e:
            raise bad_request(str(e), str(e).split(":")[0]) from None
        tool_mode = req.tool_mode if chat else None
        param = req.constraint_param
        if tool_mode not in (None, "auto"):  # a call is required: the grammar of the model's call syntax (one
            # call of a named function; calls of any tool, one per line unless parallel_tool_calls is false)
            parallel = tool_mode == "required" and req.parallel_tool_calls is not False
            params = replace(params, constraint=tool_calls.constraint(req.template_tools(), tool_mode, parallel,
                                                                      entry.llm.tokenizer))
            param = "tools"
        if params.constraint is not None:  # compiled now (and cached for the engine): a bad one is a 400
            try:
                await asyncio.to_thread(entry.llm.engine.grammars.compiled, params.constraint)
            except InferRecipesError as e:
                raise bad_request(str(e), param, "invalid_constraint") from None
        vocab = entry.llm.model_config.vocab_size
        if any(t >= vocab for t, _ in params.logit_bias):
            raise bad_request(f"logit_bias: token ids must be below the vocabulary size {vocab}", "logit_bias")
        names = frozenset(t.function.name for t in req.tools or ()) if tool_mode else frozenset()
        job = cls(entry, prompts, params, req.n, metrics, tool_mode, names)
        try:
            job.ticket = entry.engine.admit(len(job.choices()))
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except InferRecipesError as e:
            raise bad_request(str(e), "n", "too_many_sequences") from None
        return job

    @property
    def name(self) -> str:
        return self.entry.spec.name

    def choices(self) -> list[tuple[int, CheckedPrompt, SamplingParams]]:
        """(index, prompt, params) per choice: n consecutive indices per prompt."""
        return [(i * self.n + j, p, self.params[j]) for i, p in enumerate(self.checked) for j in range(self.n)]

    def close(self) -> None:
        """Gives back the queue places of choices that never started (a client gone early)."""
        if self.ticket is not None:
            self.ticket.close()

    def _record(self, out: RequestOutput) -> None:
        self.metrics.record(self.name, out.metrics, out.finish_reason)

    async def run_all(self, only: list[int] | None = None) -> dict[int, RequestOutput]:
        """Every choice (or those whose index is in `only`) to its end: {index: final output}. The first failure
        cancels (aborts) the others."""
        choices = [c for c in self.choices() if only is None or c[0] in only]
        try:
            outs = await asyncio.gather(*(self.entry.engine.final(ids, p, self.ticket) for _, ids, p in choices))
        except BaseException as e:
            raise as_api_error(e) from None
        for out in outs:
            self._record(out)
        return {index: out for (index, _, _), out in zip(choices, outs)}

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's outputs as they come, (index, output); leaving it (or a failure) aborts every choice."""
        channel: asyncio.Queue = asyncio.Queue()

        async def pump(index, ids, params):
            try:
                async for out in self.entry.engine.generate(ids, params, ticket=self.ticket):
                    await channel.put((index, out))
            except BaseException as e:
                await channel.put((index, e))

        tasks = [asyncio.create_task(pump(*c)) for c in self.choices()]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await channel.get()
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                if item.finished:
                    remaining -= 1
                    self._record(item)
                yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _token_ids(entry: Entry, req, chat: bool) -> list[CheckedPrompt]:
    """The request's prompts as token ids, each checked by the engine (vocabulary, context) once. Runs in a
    worker thread: a huge prompt never stops the event loop."""
    llm = entry.llm
    limit, tok = llm.max_model_len, llm.tokenizer
    param = "messages" if chat else "prompt"
    texts = [None] if chat else req.prompts
    if chat and req.tool_mode is not None:
        reason = tool_calls.unsupported(tok)
        if reason is not None:
            raise bad_request(f"the model {entry.spec.name!r} cannot call tools: {reason}. Send the request "
                              f"without tools (or with tool_choice 'none'), or to a model whose template renders "
                              f"them, such as Qwen2.5", "tools", "unsupported_parameter")
    out = []
    for item in texts:
        try:
            if chat:
                text = tok.apply_chat_template(req.template_messages(), tools=req.template_tools())
            else:
                text = item if isinstance(item, str) else None
            if text is not None and len(text) > 2 * limit * tok.max_token_chars:
                raise ContextLengthError(len(text) // tok.max_token_chars, limit, characters=len(text))
            ids = (tok.encode(text, add_special_tokens=not chat) if text is not None else list(item))
            out.append(llm.engine.token_ids(ids))  # the engine's own checks (vocabulary, context), once
        except ContextLengthError as e:
            raise bad_request(e.api_message(), param, "exceed_context_size") from None
        except InferRecipesError as e:
            raise bad_request(str(e), param) from None
    return out


def as_api_error(e: BaseException) -> BaseException:
    """What the client is told of an exception out of the engine: its fault (400), busy (429), ours (500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", None, "queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, RequestFailedError):
        return server_error(str(e), "request_failed")
    if isinstance(e, InferRecipesError):
        return bad_request(str(e))
    return e
