"""Several models in one process under a memory budget: load on demand, evict the least recently used idle one.

Every model has its own engine (its own KV pool and scheduler); one device thread loads them and steps them all
(see `engine/async_engine.py` for why one). A model counts against the budget
with its weights plus its whole KV pool (what it may use). A model serving or holding requests is never evicted,
nor one pinned; a model that cannot fit even after evicting every idle unpinned one is refused with a 503.

A model whose `speculative_model` is the name of another served model drafts with that model's loaded weights
(no second copy, KV blocks of its own): the draft loads first, and stays while the model it drafts for is loaded.
A cascade of the two then runs on the same two loaded models.
"""
from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..config import QUANTIZATIONS, EngineConfig, draft_config
from ..device import resolve_device, trim_host_memory
from ..engine.async_engine import AsyncEngine, DeviceThread
from ..engine.llm import LLM
from ..errors import InferRecipesError
from ..runner import checkpoint_switches, kv_estimate, memory_estimate, prepare
from .protocol import APIError


@dataclass
class ModelSpec:
    """One served model: its name in the API, what to load, and how."""

    name: str
    model: str
    options: dict = field(default_factory=dict)  # LLM keyword arguments (EngineConfig fields)
    pinned: bool = False


@dataclass
class Entry:
    spec: ModelSpec
    llm: LLM | None = None
    engine: AsyncEngine | None = None
    nbytes: int = 0  # measured once loaded, estimated before
    last_used: float = 0.0
    leases: int = 0  # requests holding the model (from routing to their last output)

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def busy(self) -> bool:
        return self.leases > 0 or (self.engine is not None and self.engine.num_active > 0)


def _config(spec: ModelSpec) -> EngineConfig:
    known = set(EngineConfig.__dataclass_fields__)
    return EngineConfig(**checkpoint_switches(spec.model, {k: v for k, v in spec.options.items() if k in known}))


def estimate_bytes(spec: ModelSpec, draft: ModelSpec | None = None) -> int:
    """Weights (by scheme) + the KV pool the engine will reserve, before loading anything; a draft model's too,
    or, with `draft` (the served model that drafts for it, its weights counted there), the draft's KV pool only."""
    cfg = _config(spec)
    device = resolve_device(cfg.device)
    bp = prepare(spec.model, cfg, device)
    total = memory_estimate(bp)
    if draft is not None:
        own = prepare(draft.model, _config(draft), device)
        total += kv_estimate(replace(own, engine_config=draft_config(cfg, bp.max_model_len),
                                     max_model_len=bp.max_model_len))
    elif cfg.speculative_model not in (None, "ngram"):
        total += memory_estimate(prepare(cfg.speculative_model, draft_config(cfg, bp.max_model_len), device))
    return total


class ModelPool:
    def __init__(self, specs: list[ModelSpec], memory_budget: int | None = None,
                 loader: Callable[[ModelSpec], LLM] | None = None, log=print):
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InferRecipesError(f"model name {dup[0]!r} is given twice: name each --model NAME=SPEC uniquely")
        self.entries = {s.name: Entry(s) for s in specs}
        # name -> the served model that drafts for it
        self.drafts = {s.name: s.options["speculative_model"] for s in specs
                       if s.options.get("speculative_model") in self.entries}
        for name, draft in self.drafts.items():
            if draft == name or draft in self.drafts:
                raise InferRecipesError(f"model {name!r}: its speculative_model {draft!r} is "
                                        f"{'itself' if draft == name else 'drafted for by another served model'}: "
                                        f"a served draft must be a plain model")
        self.memory_budget = memory_budget
        self.loader = loader or (lambda spec, draft: LLM(spec.model, progress=False, draft=draft, **spec.options))
        self.log = log
        self._lock = asyncio.Lock()
        self.evictions = 0
        self.device_thread = DeviceThread("device")

    # ---- accounting ---------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.loaded)

    def _fits(self, extra: int) -> bool:
        return self.memory_budget is None or self.used_bytes() + extra <= self.memory_budget

    def _evictable(self) -> list[Entry]:
        idle = [e for e in self.entries.values() if e.loaded and not e.busy and not e.spec.pinned]
        return sorted(idle, key=lambda e: e.last_used)

    def _draft(self, entry: Entry) -> Entry | None:
        """The served model that drafts for `entry`, if one does."""
        name = self.drafts.get(entry.spec.name)
        return self.entries[name] if name is not None else None

    def _needed(self, entry: Entry) -> int:
        """Bytes loading `entry` adds: its own, and its served draft's when that is not loaded yet."""
        draft = self._draft(entry)
        total = estimate_bytes(entry.spec, draft.spec if draft is not None else None)
        return total + (estimate_bytes(draft.spec) if draft is not None and not draft.loaded else 0)

    def _unload(self, entry: Entry) -> None:
        self.log(f"evicting model {entry.spec.name!r} ({entry.nbytes / 2**20:.0f} MiB)")
        entry.engine.shutdown()
        entry.engine = entry.llm = None
        entry.nbytes = 0
        self.evictions += 1
        draft = self._draft(entry)
        if draft is not None:
            draft.leases -= 1  # it may go now
        gc.collect()
        trim_host_memory()

    def _load(self, entry: Entry) -> None:
        draft = self._draft(entry)
        if draft is not None:
            if not draft.loaded:
                self._load(draft)
            draft.leases += 1  # held while it drafts for `entry`: never evicted under it
        start = time.perf_counter()
        try:
            llm = self.loader(entry.spec, draft.llm if draft is not None else None)
        except BaseException:
            if draft is not None:
                draft.leases -= 1
            raise
        entry.llm, entry.engine = llm, AsyncEngine(llm.engine, entry.spec.name, self.device_thread)
        entry.nbytes = llm.weight_bytes() + llm.kv_cache_bytes()
        shared = f", drafting with the weights of {draft.spec.name!r}" if draft is not None else ""
        self.log(f"loaded model {entry.spec.name!r} ({entry.spec.model}) in {time.perf_counter() - start:.1f} s: "
                 f"{entry.nbytes / 2**20:.0f} MiB with its KV pool{shared}")

    # ---- the public side ------------------------------------------------------------------------------------------
    def preload(self) -> None:
        """Loads models in the order given while they fit the budget (the rest load on first request)."""
        for entry in self.entries.values():
            if entry.loaded:  # loaded already, as another's draft
                continue
            estimate = self._needed(entry)
            if not self._fits(estimate):
                self.log(f"model {entry.spec.name!r} (~{estimate / 2**20:.0f} MiB) does not fit the budget now: "
                         f"it loads on its first request")
                continue
            self.device_thread.call_and_wait(self._load, entry)
            entry.last_used = time.monotonic()

    async def acquire(self, name: str) -> Entry:
        """The model, loaded (evicting idle ones if needed), with a lease the caller must `release`."""
        entry = self.entries.get(name)
        if entry is None:
            raise APIError(404, f"the model {name!r} does not exist; available: {', '.join(self.entries)}",
                           "invalid_request_error", "model", "model_not_found")
        entry.leases += 1
        try:
            if not entry.loaded:
                async with self._lock:
                    if not entry.loaded:
                        await self._make_room_and_load(entry)
        except InferRecipesError as e:  # a spec that cannot load (moved file, bad switches): not the client's fault
            entry.leases -= 1
            raise APIError(503, f"model {name!r} could not be loaded: {e}", "server_error", "model",
                           "model_load_failed") from None
        except BaseException:
            entry.leases -= 1
            raise
        entry.last_used = time.monotonic()
        return entry

    def release(self, entry: Entry) -> None:
        entry.leases -= 1
        entry.last_used = time.monotonic()

    async def _make_room_and_load(self, entry: Entry) -> None:
        estimate = await asyncio.to_thread(self._needed, entry)
        victims = []
        for candidate in self._evictable():
            if candidate is self._draft(entry):
                continue  # about to draft for `entry`
            if self._fits(estimate - sum(v.nbytes for v in victims)):
                break
            victims.append(candidate)
        if not self._fits(estimate - sum(v.nbytes for v in victims)):
            busy = [e.spec.name for e in self.entries.values() if e.loaded and (e.busy or e.spec.pinned)]
            raise APIError(503, f"model {entry.spec.name!r} needs ~{estimate / 2**20:.0f} MiB and the memory "
                                f"budget ({self.memory_budget / 2**20:.0f} MiB) cannot make room: models busy or "
                                f"pinned: {', '.join(busy) or 'none'}; retry later or raise --memory-budget",
                           "server_error", "model", "model_cannot_fit")
        def swap():
            for victim in victims:
                self._unload(victim)
            self._load(entry)

        await self.device_thread.run(swap)

    def shutdown(self) -> None:
        for entry in self.entries.values():
            if entry.engine is not None:
                entry.engine.shutdown()
        self.device_thread.shutdown()


def parse_model_arg(arg: str, base_options: dict) -> ModelSpec:
    """`[NAME=]SPEC[,key=value...]`: key=value are engine options (quantization=int8, dtype=bfloat16, ...)."""
    name, sep, rest = arg.partition("=")
    if not sep or "," in name or "/" in name or name.endswith(".gguf"):
        name, rest = "", arg
    spec, *pairs = rest.split(",")
    options = dict(base_options)
    known = set(EngineConfig.__dataclass_fields__)
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise InferRecipesError(f"--model {arg!r}: {pair!r} is not KEY=VALUE with KEY one of "
                                    f"{', '.join(sorted(known))}")
        options[key] = _option_value(key, value.strip())
    EngineConfig(**{k: v for k, v in options.items() if k in known})  # validate now, not at first request
    return ModelSpec(name or spec, spec, options)


def _option_value(key: str, value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lower() in ("none", "null"):
        return None
    if key == "quantization" and value in QUANTIZATIONS:
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
