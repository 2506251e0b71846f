"""Engines driven from one device thread, streaming each request's outputs to asyncio callers (the server).

All torch work of a serving process (loading models, every engine's steps) runs on one `DeviceThread`, and the
event loop never runs torch. Two reasons, both measured on a 2-core CPU: torch ops on a thread other than the
first one to run parallel torch code are slower (a second OpenMP team beside an idle first one;
`benchmarks/thread_cost.py`: a batch-16 SmolLM2 linear 1.4x, the block gather 2.1x), and two engines stepping at
once on separate threads would only split the same cores between them. The device thread steps the engines that have work round-robin, one
step each, so several models share the device fairly.

Callers never touch an engine: adds and aborts are commands the device thread applies between steps, and outputs
come back through one asyncio queue per request. A caller that stops listening (a client gone mid-stream) aborts
its request, which frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from ..config import SamplingParams
from ..errors import InferRecipesError
from .llm_engine import LLMEngine
from .request import RequestOutput
from .scheduler import QueueFullError


class EngineDeadError(InferRecipesError):
    """The engine's step failed; the model must be reloaded."""


class DeviceThread:
    """The one thread that runs torch: arbitrary calls (loading a model) and the steps of every attached engine."""

    def __init__(self, name: str = "device"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._engines: list[AsyncEngine] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Runs fn(*args) on the device thread, between steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, future))
        self._wake.set()
        return future

    async def run(self, fn: Callable, *args):
        return await asyncio.wrap_future(self.call(fn, *args))

    def call_and_wait(self, fn: Callable, *args, timeout: float | None = None):
        """fn(*args) on the device thread, waiting for it (directly when already on that thread)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.call(fn, *args).result(timeout=timeout)

    def wake(self) -> None:
        self._wake.set()

    def _attach(self, engine: "AsyncEngine") -> None:
        self._engines.append(engine)

    def _detach(self, engine: "AsyncEngine") -> None:
        if engine in self._engines:
            self._engines.remove(engine)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            while True:
                try:
                    fn, args, future = self._calls.get_nowait()
                except queue.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:
                        future.set_exception(e)
            busy = False
            for engine in list(self._engines):
                engine._apply_commands()
                if engine.engine.has_unfinished_requests():
                    engine._step()
                    busy = True
            if not busy:
                self._wake.wait(0.5)


class AsyncEngine:
    """One model's engine as seen from asyncio; its steps run on a DeviceThread (its own one if none is given)."""

    def __init__(self, engine: LLMEngine, name: str = "model", device: DeviceThread | None = None):
        if engine.driver is not None:
            raise InferRecipesError(f"model {name!r}: its engine is already driven by another AsyncEngine")
        engine.driver = self
        self.engine, self.name = engine, name
        self._own_device = device is None
        self.device = device or DeviceThread(f"device-{name}")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # adds sent but not yet applied: counted against the waiting-queue bound
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self.device.call_and_wait(self.device._attach, self)

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
        """Yields the request's output after every step that advanced it, the last one finished. A prompt the
        engine refuses raises here (from the device thread's add). Leaving the iteration early (or being
        cancelled) aborts the request."""
        if self.error is not None:
            raise EngineDeadError(f"model {self.name!r} failed earlier ({self.error}); restart the server")
        self.check_capacity()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
            self._pending += 1
        self._send(("add", request_id, list(prompt_ids), params))
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
                self._send(("abort", request_id))

    async def final(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestOutput:
        """The request's finished output (`generate` run to its end)."""
        out = None
        async for out in self.generate(prompt_ids, params):
            pass
        return out

    def _send(self, command) -> None:
        self._commands.put(command)
        self.device.wake()

    def shutdown(self) -> None:
        """Detaches from the device thread (aborting what is left); stops the thread if it is this engine's own."""
        def detach():
            self.device._detach(self)
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)

        self.device.call_and_wait(detach, timeout=60)
        if self._own_device:
            self.device.shutdown()
        self.engine.driver = None

    # ---- device side -------------------------------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hands items to their callers' loops, one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's loop has closed
                pass

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, ids, params = command
                with self._lock:
                    self._pending -= 1
                    live = request_id in self._streams
                if not live:  # the caller left before its request started
                    continue
                try:
                    self.engine.add_request(ids, params, request_id)
                except InferRecipesError as e:
                    self._deliver([(request_id, e)])
            elif command[0] == "abort":
                self.engine.abort_request(command[1])

    def _step(self) -> None:
        if self.error is not None:
            return
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failing step: fail every request loudly instead of hanging them
            self.error = e
            failed = list(self.engine.requests)
            for request_id in failed:
                self.engine.abort_request(request_id)
            self._deliver([(r, EngineDeadError(f"model {self.name!r} failed: {e}")) for r in failed])
            return
        self._deliver([(out.request_id, out) for out in outputs])


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)
