"""OpenAI's response shapes: a whole completion, the chunks of a streamed one, and their logprobs."""
from __future__ import annotations

from collections.abc import AsyncIterator

from ..engine.request import RequestOutput
from .jobs import Job
from .protocol import new_id, now, usage
from .tool_calls import ToolCallParser, message


def completion_body(job: Job, chat: bool, finals: dict[int, RequestOutput], model: str,
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
        if chat and job.tool_mode is not None:
            parser = ToolCallParser(job.tool_names)
            choice["message"] = message(parser.feed(out.text) + parser.finish())
            choice["finish_reason"] = _finish_reason(out.finish_reason, "tool_calls" in choice["message"])
        elif chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        if answered is not None:
            choice["answered_by"] = answered[index]
        choices.append(choice)
    return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else
            "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(sum(len(p) for p in job.prompts), sum(len(o.token_ids) for o in finals.values()),
                           [o.metrics for o in finals.values()])}


async def stream_events(job: Job, chat: bool, include_usage: bool) -> AsyncIterator[dict]:
    """The chunks of a streamed completion: per choice (chat) a role chunk, then text deltas with their logprobs,
    then a chunk carrying the finish reason; last, the usage when asked for."""
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    kind = "chat.completion.chunk" if chat else "text_completion"
    tok = job.entry.llm.tokenizer
    head = {"id": rid, "object": kind, "created": created, "model": job.name}
    if chat:
        for index, *_ in job.choices():
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
    completion_tokens, metrics = 0, []
    # with tools, each choice's text goes through its own parser: content deltas and tool-call deltas
    parsers = {index: ToolCallParser(job.tool_names) for index, *_ in job.choices()} if chat and job.tool_mode else {}
    async for index, out in job.merged():
        lp = None
        if out.logprobs is not None and out.num_new_tokens:
            new = slice(len(out.token_ids) - out.num_new_tokens, len(out.token_ids))
            lp = (_chat_logprobs if chat else _completion_logprobs)(tok, out.token_ids[new], out.logprobs[new],
                                                                   out.top_logprobs[new])
        if index in parsers:
            deltas = parsers[index].feed(out.delta) + (parsers[index].finish() if out.finished else [])
        else:
            deltas = [{"content": out.delta} if chat else {"text": out.delta}] if out.delta else []
        if lp is not None and not deltas:
            deltas = [{"content": ""} if chat else {"text": ""}]
        for k, delta in enumerate(deltas):
            choice = {"index": index, "logprobs": lp if k == 0 else None, "finish_reason": None}
            choice.update({"delta": delta} if chat else delta)
            yield {**head, "choices": [choice]}
        if out.finished:
            completion_tokens += len(out.token_ids)
            metrics.append(out.metrics)
            called = index in parsers and parsers[index].calls > 0
            choice = {"index": index, "logprobs": None, "finish_reason": _finish_reason(out.finish_reason, called)}
            choice.update({"delta": {}} if chat else {"text": ""})
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(sum(len(p) for p in job.prompts), completion_tokens, metrics)}


async def replay_events(body: dict, chat: bool, include_usage: bool) -> AsyncIterator[dict]:
    """A finished completion sent as a stream, one content chunk per choice (a cascade's answer is known only
    once it is whole)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": body["id"], "object": kind, "created": body["created"], "model": body["model"]}
    for c in body["choices"]:
        extra = {"answered_by": c["answered_by"]}
        if chat:
            yield {**head, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
            delta = {"content": c["message"]["content"]}
            if "tool_calls" in c["message"]:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(c["message"]["tool_calls"])]
            yield {**head, "choices": [{"index": c["index"], "delta": delta,
                                        "logprobs": c["logprobs"], "finish_reason": None, **extra}]}
            yield {**head, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                        "finish_reason": c["finish_reason"]}]}
        else:
            yield {**head, "choices": [{"index": c["index"], "text": c["text"], "logprobs": c["logprobs"],
                                        "finish_reason": None, **extra}]}
            yield {**head, "choices": [{"index": c["index"], "text": "", "logprobs": None,
                                        "finish_reason": c["finish_reason"]}]}
    if include_usage:
        yield {**head, "choices": [], "usage": body["usage"]}


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """A choice that called tools and ended by itself (not cut by max_tokens) finished to have them run."""
    return "tool_calls" if called and reason == "stop" else reason


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
