"""The OpenAI-compatible HTTP server's routes: /v1/models (and /v1/models/{id}), /v1/completions,
/v1/chat/completions, vLLM's /tokenize and /detokenize, /health, /metrics.

Requests route by their `model` field to a model of the pool (or to a cascade); each model streams from its own
engine. Every refusal (bad input 400, a body too large 413, a full queue 429) is decided before the reply
starts and answered with OpenAI's error object; a failure of ours is a 500 with the same object. A client that
goes away, streaming or not, aborts its request at the next step.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import routing
from .jobs import Job
from .metrics import Metrics
from .pool import ModelPool
from ..errors import InferRecipesError
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       bad_request, now, parse, server_error)
from .responses import completion_body, replay_events, stream_events
from .routing import Cascade
from .sse import EventStream

OPEN_PATHS = ("/health",)
MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is parsed


class _ClientGone(Exception):
    """The client closed the connection: nobody is left to answer (what happened is the message)."""


class Guard:
    """ASGI middleware before every route: the API key, refusal while draining, and the count of requests in
    flight (from the first byte in to the last byte out, streams included) that a drain waits for."""

    def __init__(self, app, state, api_key: str | None):
        self.app, self.state, self.api_key = app, state, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.api_key is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "invalid_request_error", None, "invalid_api_key")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        if self.state.draining:
            err = APIError(503, "the server is shutting down: not accepting new requests", "server_error", None,
                           "shutting_down")
            return await JSONResponse(err.body(), status_code=503)(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def create_app(pool: ModelPool, cascades: dict[str, Cascade] | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    cascades = cascades or {}
    app = FastAPI(title="infer-recipes", docs_url=None, redoc_url=None)
    app.state.pool, app.state.draining, app.state.in_flight = pool, False, 0
    metrics = Metrics(pool)
    app.state.metrics = metrics
    app.add_middleware(Guard, state=app.state, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone):
        print(f"{request.method} {request.url.path}: {e}", file=sys.stderr, flush=True)  # one line, no traceback
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):  # a bug of ours: still OpenAI's error object, never a bare 500
        body = server_error(f"internal error: {type(e).__name__}: {e}", "internal_error")
        return JSONResponse(body.body(), status_code=500)

    # ---- endpoints ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        problem = pool.device_thread.health()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return {"status": "ok", "models": {n: ("loaded" if e.loaded else "unloaded") for n, e in pool.entries.items()}}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def cards() -> dict[str, dict]:
        """What /v1/models says of each model and cascade, by name."""
        created = now()
        out = {n: {"id": n, "object": "model", "created": created, "owned_by": "infer-recipes", "root": e.spec.model,
                   "loaded": e.loaded, "max_model_len": e.llm.max_model_len if e.llm else None}
               for n, e in pool.entries.items()}
        out.update({c.name: {"id": c.name, "object": "model", "created": created, "owned_by": "infer-recipes",
                             "root": f"cascade({c.small} -> {c.large}, threshold {c.threshold})"}
                    for c in cascades.values()})
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": list(cards().values())}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        card = cards().get(model_id)
        if card is None:
            raise _no_such_model(model_id, [*pool.entries, *cascades])
        return card

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await read_json(request, max_body_bytes))
        return await _with_tokenizer(req.model, _tokenize, req)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await read_json(request, max_body_bytes))
        return await _with_tokenizer(req.model, _detokenize, req)

    async def _with_tokenizer(name: str, work, req):
        """work(entry, req) in a worker thread, on the model `name` (loaded if it was not)."""
        if name not in pool.entries:
            hint = " (a cascade: ask one of its models)" if name in cascades else ""
            raise _no_such_model(name, list(pool.entries), hint)
        entry = await pool.acquire(name)
        try:
            return await asyncio.to_thread(work, entry, req)
        finally:
            pool.release(entry)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, max_body_bytes))
        return await _serve(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await read_json(request, max_body_bytes))
        return await _serve(request, req)

    # ---- the request path ------------------------------------------------------------------------------------
    async def _serve(request: Request, req):
        chat = isinstance(req, ChatCompletionRequest)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.model not in pool.entries and req.model not in cascades:
            raise _no_such_model(req.model, [*pool.entries, *cascades])
        if req.model in cascades:
            body = await until_disconnected(request, routing.answer(cascades[req.model], pool, req, metrics))
            if req.stream:
                return EventStream(replay_events(body, chat, include_usage), lambda: None)
            return body
        entry = await pool.acquire(req.model)
        try:
            job = await Job.create(entry, req, metrics)
        except BaseException:
            pool.release(entry)
            raise

        def done():
            job.close()
            pool.release(entry)

        if req.stream:
            return EventStream(stream_events(job, chat, include_usage), done)
        try:
            finals = await until_disconnected(request, job.run_all())
        finally:
            done()
        return completion_body(job, chat, finals, job.name)

    return app


def _no_such_model(name: str, available: list[str], hint: str = "") -> APIError:
    return APIError(404, f"the model {name!r} does not exist{hint}; available: {', '.join(available)}",
                    "invalid_request_error", "model", "model_not_found")


def _tokenize(entry, req: TokenizeRequest) -> dict:
    """vLLM's answer: the token ids, their count, the context size, and each token's string when asked."""
    tok = entry.llm.tokenizer
    try:
        if req.messages is not None:
            text = tok.apply_chat_template(req.template_messages(), req.add_generation_prompt,
                                           tools=req.template_tools())
            ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    except InferRecipesError as e:
        raise bad_request(str(e), "messages" if req.messages is not None else "prompt") from None
    strs = [tok.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": entry.llm.max_model_len, "tokens": ids, "token_strs": strs}


def _detokenize(entry, req: DetokenizeRequest) -> dict:
    tok = entry.llm.tokenizer
    bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise bad_request(f"tokens: {bad} is not a token id of this model (ids are 0 to {tok.vocab_size - 1})",
                          "tokens")
    return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}


async def read_json(request: Request, limit: int):
    """The body as JSON, or a 400 (not JSON, nested too deep, text that is not Unicode) or 413 (too large)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
    except ClientDisconnect:
        raise _ClientGone("the client closed the connection before its request body arrived") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to parse") from None
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"the request body holds text that is not valid Unicode (an unpaired UTF-16 surrogate, "
                          f"{e.object[e.start:e.end]!a}): send UTF-8 text") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to parse") from None
    return body


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes, more than the {limit} this server accepts: send a "
                         f"shorter prompt", "invalid_request_error", None, "request_too_large")


async def until_disconnected(request: Request, work):
    """Awaits `work`, cancelling it (which aborts its requests) as soon as the client closes the connection:
    nobody is left to read the answer, and others are waiting for the device."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone("the client closed the connection before the answer: its request was aborted")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
