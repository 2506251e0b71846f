"""Server-sent events: OpenAI's `data: {json}` framing, ended by `data: [DONE]`, and a streaming response that
always cleans up after itself (queue places, the model's lease), even when the client leaves before it starts."""
from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from .protocol import APIError, server_error


async def frames(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """`data:` lines for each event, then `[DONE]`. Every refusal happens before the stream starts (see
    Job.create), so an error here is the server's: it travels as an error event, and the stream still ends."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"  # ASCII: no U+2028 or NEL to split an SSE line
    except Exception as e:
        err = e if isinstance(e, APIError) else server_error(f"{type(e).__name__}: {e}")
        if not isinstance(e, APIError):
            print(f"stream failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        yield f"data: {json.dumps(err.body())}\n\n"
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response whose `on_close` runs once the response is over, however it ended."""

    def __init__(self, events: AsyncIterator[dict], on_close: Callable[[], None]):
        super().__init__(frames(events), media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
