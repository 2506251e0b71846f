"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Requests route by their `model` field to a model of the pool (or to a cascade); each model streams from its own
engine. Bad input is answered with OpenAI's error object and a 4xx status, never a 500.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingParams
from ..engine.async_engine import EngineDeadError
from ..engine.request import RequestOutput
from ..engine.scheduler import QueueFullError
from ..errors import ContextLengthError, InferRecipesError
from .metrics import Metrics
from .pool import Entry, ModelPool
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request, new_id, now, parse, usage
from .routing import Cascade

_OPEN_PATHS = ("/health",)


class _Job:
    """One API request on one model: its prompts (token ids) and the sampling params of each choice."""

    def __init__(self, entry: Entry, prompts: list[list[int]], params: SamplingParams, n: int):
        self.entry, self.prompts, self.n = entry, prompts, n
        # every choice its own seed, so n > 1 with a seed gives n different (reproducible) answers
        self.params = [replace(params, seed=None if params.seed is None else params.seed + j) for j in range(n)]

    @property
    def name(self) -> str:
        return self.entry.spec.name

    def choices(self) -> list[tuple[int, list[int], SamplingParams]]:
        return [(i * self.n + j, p, self.params[j]) for i, p in enumerate(self.prompts) for j in range(self.n)]


def create_app(pool: ModelPool, cascades: dict[str, Cascade] | None = None, api_key: str | None = None) -> FastAPI:
    cascades = cascades or {}
    app = FastAPI(title="infer-recipes", docs_url=None, redoc_url=None)
    app.state.pool, app.state.draining = pool, False
    metrics = Metrics(pool)
    app.state.metrics = metrics

    # ---- cross-cutting: auth, draining, error shapes -----------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path not in _OPEN_PATHS:
            if api_key is not None:
                header = request.headers.get("authorization", "")
                given = header[7:] if header.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(given.encode(), api_key.encode()):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   "invalid_request_error", None, "invalid_api_key")
                    return JSONResponse(err.body(), status_code=401)
            if app.state.draining:
                err = APIError(503, "the server is shutting down: not accepting new requests", "server_error",
                               None, "shutting_down")
                return JSONResponse(err.body(), status_code=503)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    # ---- endpoints ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "models": {n: ("loaded" if e.loaded else "unloaded") for n, e in pool.entries.items()}}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        created = now()
        data = [{"id": n, "object": "model", "created": created, "owned_by": "infer-recipes",
                 "root": e.spec.model, "loaded": e.loaded, "max_model_len": e.llm.max_model_len if e.llm else None}
                for n, e in pool.entries.items()]
        data += [{"id": c.name, "object": "model", "created": created, "owned_by": "infer-recipes",
                  "root": f"cascade({c.small} -> {c.large}, threshold {c.threshold})"} for c in cascades.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _json(request))
        return await _serve(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await _json(request))
        return await _serve(req, chat=True)

    # ---- the request path ------------------------------------------------------------------------------------
    async def _serve(req, chat: bool):
        if req.model in cascades:
            return await _serve_cascade(req, chat, cascades[req.model])
        entry = await pool.acquire(req.model)
        try:
            job = _job(entry, req, chat)
            entry.engine.check_capacity(len(job.choices()))
        except BaseException as e:
            pool.release(entry)
            raise _api_error(e) from None
        if req.stream:
            return StreamingResponse(_sse(_stream(job, req, chat), lambda: pool.release(entry)),
                                     media_type="text/event-stream")
        try:
            finals = await _run_all(job)
        except BaseException as e:
            raise _api_error(e) from None
        finally:
            pool.release(entry)
        return _response(job, req, chat, finals, job.name)

    async def _serve_cascade(req, chat: bool, cascade: Cascade):
        small = await pool.acquire(cascade.small)
        try:
            job = _job(small, req, chat, force_logprobs=True)
            small.engine.check_capacity(len(job.choices()))
            finals = await _run_all(job)
        except BaseException as e:
            raise _api_error(e) from None
        finally:
            pool.release(small)
        answered = {i: cascade.small for i in finals}
        confidence = {i: _mean(out.logprobs) for i, out in finals.items()}
        unsure = [i for i, out in finals.items() if cascade.escalate(out.logprobs)]
        if unsure:
            large = await pool.acquire(cascade.large)
            try:
                job_large = _job(large, req, chat)
                choices = {c[0]: c for c in job_large.choices()}
                large.engine.check_capacity(len(unsure))
                results = await asyncio.gather(*(large.engine.final(choices[i][1], choices[i][2]) for i in unsure))
            except BaseException as e:
                raise _api_error(e) from None
            finally:
                pool.release(large)
            for i, out in zip(unsure, results):
                finals[i], answered[i] = out, cascade.large
                metrics.record(cascade.large, out.metrics, out.finish_reason)
        if (not req.logprobs) if chat else req.logprobs is None:  # asked for by the cascade, not the client
            for out in finals.values():
                out.logprobs = out.top_logprobs = None
        body = _response(job, req, chat, finals, cascade.name, answered)
        body["cascade"] = {"small": cascade.small, "large": cascade.large, "threshold": cascade.threshold,
                           "small_mean_logprob": confidence}
        if req.stream:  # the answer is known only once the small model is done: sent as one chunk per choice
            return StreamingResponse(_sse(_replay(body, req, chat), lambda: None), media_type="text/event-stream")
        return body

    def _job(entry: Entry, req, chat: bool, force_logprobs: bool = False) -> _Job:
        llm = entry.llm
        if chat:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
                        for m in req.messages]
            prompts = [llm.tokenizer.encode_chat(messages)]
        else:
            raw = req.prompt
            items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
            prompts = [llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]
        limit = llm.max_model_len
        for ids in prompts:
            try:
                llm.engine.token_ids(ids)  # the engine's own checks: vocabulary, context
            except ContextLengthError as e:
                raise bad_request(f"the request exceeds the available context size: the prompt has "
                                  f"{e.prompt_tokens} tokens and the context is {e.max_model_len} tokens (one must "
                                  f"be left to generate); shorten the prompt", "messages" if chat else "prompt",
                                  "exceed_context_size") from None
            except InferRecipesError as e:
                raise bad_request(str(e), "messages" if chat else "prompt") from None
            if req.max_tokens is not None and len(ids) + req.max_tokens > limit:
                raise bad_request(f"the request exceeds the available context size: the prompt has {len(ids)} "
                                  f"tokens and max_tokens is {req.max_tokens}, {len(ids) + req.max_tokens} in all, "
                                  f"but the context is {limit} tokens; lower max_tokens or shorten the prompt",
                                  "max_tokens", "exceed_context_size")
        longest = max(len(p) for p in prompts)
        default = limit - longest if chat else min(16, limit - longest)
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        if force_logprobs and logprobs is None:
            logprobs = 0
        params = SamplingParams(max_tokens=req.max_tokens or default, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=tuple(req.stop or ()),
                                ignore_eos=req.ignore_eos, logprobs=logprobs)
        return _Job(entry, prompts, params, req.n)

    async def _run_all(job: _Job) -> dict[int, RequestOutput]:
        choices = job.choices()
        outs = await asyncio.gather(*(job.entry.engine.final(ids, p) for _, ids, p in choices))
        for out in outs:
            metrics.record(job.name, out.metrics, out.finish_reason)
        return {index: out for (index, _, _), out in zip(choices, outs)}

    async def _merged(job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's outputs as they come, (index, output); cancelling it aborts every choice."""
        channel: asyncio.Queue = asyncio.Queue()

        async def pump(index, ids, params):
            try:
                async for out in job.entry.engine.generate(ids, params):
                    await channel.put((index, out))
            except BaseException as e:
                await channel.put((index, e))

        tasks = [asyncio.create_task(pump(*c)) for c in job.choices()]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await channel.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                    metrics.record(job.name, item.metrics, item.finish_reason)
                yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(job: _Job, req, chat: bool) -> AsyncIterator[dict]:
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        kind = "chat.completion.chunk" if chat else "text_completion"
        tok = job.entry.llm.tokenizer
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": kind, "created": created, "model": job.name}
        if chat:
            for index, *_ in job.choices():
                yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        completion_tokens = 0
        async for index, out in _merged(job):
            lp = None
            if out.logprobs is not None and out.num_new_tokens:
                new = slice(len(out.token_ids) - out.num_new_tokens, len(out.token_ids))
                lp = (_chat_logprobs if chat else _completion_logprobs)(tok, out.token_ids[new], out.logprobs[new],
                                                                       out.top_logprobs[new])
            if out.delta or lp is not None:
                choice = {"index": index, "logprobs": lp, "finish_reason": None}
                choice.update({"delta": {"content": out.delta}} if chat else {"text": out.delta})
                yield {**head, "choices": [choice]}
            if out.finished:
                completion_tokens += len(out.token_ids)
                choice = {"index": index, "logprobs": None, "finish_reason": out.finish_reason}
                choice.update({"delta": {}} if chat else {"text": ""})
                yield {**head, "choices": [choice]}
        if include_usage:
            prompt_tokens = sum(len(p) for p in job.prompts)
            yield {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    async def _replay(body: dict, req, chat: bool) -> AsyncIterator[dict]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": body["id"], "object": kind, "created": body["created"], "model": body["model"]}
        for c in body["choices"]:
            extra = {"answered_by": c["answered_by"]}
            if chat:
                yield {**head, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
                yield {**head, "choices": [{"index": c["index"], "delta": {"content": c["message"]["content"]},
                                            "logprobs": c["logprobs"], "finish_reason": None, **extra}]}
                yield {**head, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                            "finish_reason": c["finish_reason"]}]}
            else:
                yield {**head, "choices": [{"index": c["index"], "text": c["text"], "logprobs": c["logprobs"],
                                            "finish_reason": None, **extra}]}
                yield {**head, "choices": [{"index": c["index"], "text": "", "logprobs": None,
                                            "finish_reason": c["finish_reason"]}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**head, "choices": [], "usage": body["usage"]}

    def _response(job: _Job, req, chat: bool, finals: dict[int, RequestOutput], model: str,
                  answered: dict[int, str] | None = None) -> dict:
        tok = job.entry.llm.tokenizer
        choices = []
        for index in sorted(finals):
            out = finals[index]
            lp = None
            if out.logprobs is not None:
                lp = (_chat_logprobs if chat else _completion_logprobs)(tok, out.token_ids, out.logprobs,
                                                                       out.top_logprobs)
            choice = {"index": index, "logprobs": lp, "finish_reason": out.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = out.text
            if answered is not None:
                choice["answered_by"] = answered[index]
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in job.prompts)
        completion_tokens = sum(len(o.token_ids) for o in finals.values())
        return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat
                else "text_completion", "created": now(), "model": model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    return app


# ---- helpers ----------------------------------------------------------------------------------------------------
async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def _api_error(e: BaseException) -> BaseException:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", None, "queue_full")
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), "server_error", None, "engine_failed")
    if isinstance(e, InferRecipesError):
        return bad_request(str(e))
    return e


async def _sse(events: AsyncIterator[dict], done) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"  # ASCII: no U+2028 or NEL to split an SSE line
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 is sent an error can only travel inside the stream
        err = _api_error(e)
        body = err.body() if isinstance(err, APIError) else APIError(500, str(e), "server_error").body()
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        done()


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(tok, ids, logprobs, tops) -> dict:
    content = []
    for t, lp, top in zip(ids, logprobs, tops):
        text = _token_text(tok, t)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _token_text(tok, a), "logprob": b,
                                          "bytes": list(_token_text(tok, a).encode())} for a, b in top]})
    return {"content": content}


def _completion_logprobs(tok, ids, logprobs, tops) -> dict:
    tokens = [_token_text(tok, t) for t in ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": list(logprobs),
            "top_logprobs": [{_token_text(tok, a): b for a, b in top} for top in tops], "text_offset": offsets}

