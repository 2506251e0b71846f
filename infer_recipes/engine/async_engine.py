"""The engine on a thread of its own, streaming each request's outputs to asyncio callers (the HTTP server).

The step loop runs on a worker thread so a forward pass never blocks the event loop. Callers never touch the
engine: adds and aborts are commands the worker applies between steps, and outputs come back through one
asyncio queue per request. A caller that stops listening (a client gone mid-stream) aborts its request, which
frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from ..config import SamplingParams
from ..errors import InferRecipesError
from .llm_engine import LLMEngine
from .request import RequestOutput
from .scheduler import QueueFullError


class EngineDeadError(InferRecipesError):
    """The engine's step loop failed; the model must be reloaded."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "model"):
        self.engine, self.name = engine, name
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # adds sent but not yet applied: counted against the waiting-queue bound
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- caller side (event loop) ----------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        """Requests queued or running (a model with any is never evicted)."""
        return len(self._streams)

    def check_capacity(self, count: int = 1) -> None:
        waiting = len(self.engine.scheduler.waiting) + self._pending
        if waiting + count > self.engine.config.max_waiting:
            raise QueueFullError(f"model {self.name!r}: the waiting queue is full "
                                 f"({self.engine.config.max_waiting} requests): retry later")

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that advanced it, the last one finished. Leaving the
        iteration early (or being cancelled) aborts the request."""
        if self.error is not None:
            raise EngineDeadError(f"model {self.name!r} failed earlier ({self.error}); restart the server")
        self.engine.token_ids(list(prompt_ids))  # validation errors reach the caller now
        self.check_capacity()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
            self._pending += 1
        self._commands.put(("add", request_id, list(prompt_ids), params))
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=30)

    # ---- worker side (engine thread) ---------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's loop has closed
                pass

    def _apply(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, ids, params = command
            with self._lock:
                self._pending -= 1
                live = request_id in self._streams
            if not live:  # the caller left before its request started
                return
            try:
                self.engine.add_request(ids, params, request_id)
            except InferRecipesError as e:
                self._deliver(request_id, e)
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failing step: fail every request loudly instead of hanging them
                self.error = e
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, EngineDeadError(f"model {self.name!r} failed: {e}"))
                return
            for out in outputs:
                self._deliver(out.request_id, out)
