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
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence

from ..config import SamplingParams
from ..errors import InferRecipesError
from .llm_engine import CheckedPrompt, LLMEngine
from .request import RequestOutput
from .scheduler import QueueFullError


class RequestFailedError(InferRecipesError):
    """A request failed inside the engine through no fault of its own (a server error, not bad input)."""


WEDGED_AFTER_S = 300.0  # a step or call running longer than this: /health reports the device thread wedged


class DeviceThread:
    """The one thread that runs torch: arbitrary calls (loading a model) and the steps of every attached engine."""

    def __init__(self, name: str = "device"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._engines: list[AsyncEngine] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy_since: float | None = None  # when the step or call now running began
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def health(self) -> str | None:
        """None when the thread is alive and not stuck in one step or call; otherwise what is wrong."""
        if not self._thread.is_alive():
            return "the device thread has stopped"
        since = self._busy_since
        if since is not None and time.monotonic() - since > WEDGED_AFTER_S:
            return f"the device thread has been in one step for {time.monotonic() - since:.0f} s"
        return None

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
                    self._busy_since = time.monotonic()
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:
                        future.set_exception(e)
                    finally:
                        self._busy_since = None
            busy = False
            for engine in list(self._engines):
                self._busy_since = time.monotonic()
                try:
                    busy = engine._advance() or busy
                except BaseException as e:  # nothing an engine does may stop the thread that serves them all
                    engine._fail_everything(e)
                finally:
                    self._busy_since = None
            if not busy:
                self._wake.wait(0.5)


class AsyncEngine:
    """One model's engine as seen from asyncio; its steps run on a DeviceThread (its own one if none is given)."""

    def __init__(self, engine: LLMEngine, name: str = "model", device_thread: DeviceThread | None = None):
        if engine.driver is not None:
            raise InferRecipesError(f"model {name!r}: its engine is already driven by another AsyncEngine")
        engine.driver = self
        self.llm_engine, self.name = engine, name
        self._own_device = device_thread is None
        self.device_thread = device_thread or DeviceThread(f"device-{name}")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # places admitted but not yet added: counted against the waiting-queue bound
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.device_thread.call_and_wait(self.device_thread._attach, self)

    # ---- caller side (event loop) ----------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        """Requests queued or running (a model with any is never evicted)."""
        return len(self._streams)

    def admit(self, count: int = 1) -> "Ticket":
        """Reserves room in the waiting queue for `count` requests, to be sent with `generate(..., ticket=)`,
        or raises: QueueFullError (429, retry later) when the queue is full now, a plain InferRecipesError (400)
        when it could never hold them. A server decides this before the first byte of its reply."""
        limit = self.llm_engine.config.max_waiting
        if count > limit:
            raise InferRecipesError(f"model {self.name!r}: the request needs {count} sequences at once but the "
                                    f"waiting queue holds at most {limit}: lower n or send fewer prompts")
        with self._lock:
            if len(self.llm_engine.scheduler.waiting) + self._pending + count > limit:
                raise QueueFullError(f"model {self.name!r}: the waiting queue is full ({limit} requests): retry "
                                     f"later")
            self._pending += count
        return Ticket(self, count)

    async def generate(self, prompt_ids: Sequence[int] | CheckedPrompt, params: SamplingParams, request_id: str | None = None,
                       ticket: "Ticket | None" = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that advanced it, the last one finished. A request the
        engine refuses or fails raises here (InferRecipesError: bad input; RequestFailedError: the server's).
        Leaving the iteration early (or being cancelled) aborts the request. ticket: a place reserved by
        `admit` (otherwise one is taken now)."""
        (ticket or self.admit()).take()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        prompt = prompt_ids if isinstance(prompt_ids, CheckedPrompt) else list(prompt_ids)  # checked: not again
        self._send(("add", request_id, prompt, params))
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine no longer holds it
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

    async def final(self, prompt_ids: Sequence[int] | CheckedPrompt, params: SamplingParams,
                    ticket: "Ticket | None" = None) -> RequestOutput:
        """The request's finished output (`generate` run to its end)."""
        out = None
        async for out in self.generate(prompt_ids, params, ticket=ticket):
            pass
        return out

    def reset_prefix_cache(self) -> int:
        """LLMEngine.reset_prefix_cache, run on the device thread between steps; how many blocks it forgot."""
        return self.device_thread.call_and_wait(self.llm_engine.reset_prefix_cache, timeout=60)

    def _send(self, command) -> None:
        self._commands.put(command)
        self.device_thread.wake()

    def shutdown(self) -> None:
        """Detaches from the device thread (aborting what is left); stops the thread if it is this engine's own."""
        def detach():
            self.device_thread._detach(self)
            for request_id in list(self.llm_engine.requests):
                self.llm_engine.abort_request(request_id)

        self.device_thread.call_and_wait(detach, timeout=60)
        if self._own_device:
            self.device_thread.shutdown()
        self.llm_engine.driver = None

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

    def _advance(self) -> bool:
        """Applies the callers' adds and aborts, then runs one step if there is work; whether it stepped."""
        self._apply_commands()
        if not self.llm_engine.has_unfinished_requests():
            return False
        self._step()
        return True

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
                    self.llm_engine.add_request(ids, params, request_id)
                except InferRecipesError as e:  # the request's own fault
                    self._deliver([(request_id, e)])
                except Exception as e:
                    self._log(e)
                    self._deliver([(request_id, RequestFailedError(f"adding the request failed: "
                                                                   f"{type(e).__name__}: {e}"))])
            elif command[0] == "abort":
                self.llm_engine.abort_request(command[1])

    def _step(self) -> None:
        outputs = self.llm_engine.step()  # a request that fails inside comes back with finish_reason "error"
        self._deliver([(out.request_id, RequestFailedError(f"model {self.name!r}: {out.error}")
                        if out.finish_reason == "error" else out) for out in outputs])

    def _fail_everything(self, e: BaseException) -> None:
        """Something outside any one request failed (a bug of ours): every request this engine holds fails with
        it and gives its blocks back; the engine stays up for the next requests."""
        self._log(e)
        failed = list(self.llm_engine.requests)
        for request_id in failed:
            try:
                self.llm_engine.abort_request(request_id)
            except Exception:
                pass
        self._deliver([(r, RequestFailedError(f"model {self.name!r} failed: {type(e).__name__}: {e}"))
                       for r in failed])

    def _log(self, e: BaseException) -> None:
        print(f"model {self.name!r}: {''.join(traceback.format_exception_only(e)).strip()}", file=sys.stderr,
              flush=True)


class Ticket:
    """Places in an engine's waiting queue reserved by `AsyncEngine.admit`; each `generate` takes one, `close`
    gives back the ones left (a client gone before all its choices started)."""

    def __init__(self, engine: AsyncEngine, count: int):
        self.llm_engine, self.left = engine, count

    def take(self) -> None:
        if self.left < 1:
            raise InferRecipesError("no place left on this ticket: admit more requests first")
        self.left -= 1

    def close(self) -> None:
        if self.left:
            with self.llm_engine._lock:
                self.llm_engine._pending -= self.left
            self.left = 0


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)
