"""The model pool under a memory budget, on real tiny models: LRU eviction, pinning, busy models, 503."""
from __future__ import annotations

import asyncio

import pytest

from infer_recipes import SamplingParams
from infer_recipes.serving.deployment import load_deployment, parse_bytes
from infer_recipes.serving.pool import ModelPool, ModelSpec, estimate_bytes, parse_model_arg
from infer_recipes.serving.protocol import APIError

OPTS = {"device": "cpu", "max_model_len": 256}
SIZE = estimate_bytes(ModelSpec("x", "synthetic:tiny-llama3", OPTS))  # ~2.5 MB with its KV pool


def _pool(budget_models: float, pinned=()):
    specs = [ModelSpec(n, "synthetic:tiny-llama3", dict(OPTS), n in pinned) for n in ("a", "b", "c")]
    return ModelPool(specs, int(SIZE * budget_models), log=lambda _: None)


async def _use(pool: ModelPool, name: str) -> int:
    entry = await pool.acquire(name)
    try:
        out = None
        async for out in entry.engine.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0)):
            pass
        return len(out.token_ids)
    finally:
        pool.release(entry)


def test_loads_on_demand_and_evicts_the_least_recently_used_idle_model():
    async def main():
        pool = _pool(2.2)
        assert await _use(pool, "a") == 2 and await _use(pool, "b") == 2
        await _use(pool, "a")  # a is now more recent than b
        await _use(pool, "c")  # two fit: b goes
        loaded = {n for n, e in pool.entries.items() if e.loaded}
        pool.shutdown()
        return loaded, pool.evictions, pool.used_bytes()

    loaded, evictions, used = asyncio.run(main())
    assert loaded == {"a", "c"} and evictions == 1 and used <= int(SIZE * 2.2)


def test_pinned_models_stay_and_busy_models_are_never_evicted():
    async def main():
        pool = _pool(2.2, pinned=("a",))
        await _use(pool, "a")
        busy = await pool.acquire("b")  # holds b as a request in flight would
        with pytest.raises(APIError) as e:
            await _use(pool, "c")  # a is pinned and b busy: no room
        pool.release(busy)
        await _use(pool, "c")  # b is idle now: it goes, a stays
        loaded = {n for n, ent in pool.entries.items() if ent.loaded}
        pool.shutdown()
        return e.value, loaded

    err, loaded = asyncio.run(main())
    assert err.status == 503 and err.code == "model_cannot_fit" and "a, b" in err.message
    assert loaded == {"a", "c"}


def test_preload_loads_what_fits_and_unknown_names_are_404():
    async def main():
        pool = _pool(1.5)
        pool.preload()
        loaded = [n for n, e in pool.entries.items() if e.loaded]
        with pytest.raises(APIError) as e:
            await pool.acquire("nope")
        pool.shutdown()
        return loaded, e.value

    loaded, err = asyncio.run(main())
    assert loaded == ["a"] and err.status == 404 and err.code == "model_not_found"


def test_a_model_that_cannot_load_is_a_503_naming_why():
    async def main():
        pool = ModelPool([ModelSpec("gone", "/nonexistent/model.gguf")], log=lambda _: None)
        with pytest.raises(APIError) as e:
            await pool.acquire("gone")
        pool.shutdown()
        return e.value, pool.entries["gone"].leases

    err, leases = asyncio.run(main())
    assert err.status == 503 and err.code == "model_load_failed" and "nonexistent" in err.message and leases == 0


def test_model_arguments_and_deployments_parse_with_clear_errors():
    from infer_recipes import InferRecipesError

    spec = parse_model_arg("small=smollm2-135m-instruct,quantization=int4,max_batch_size=4", {"device": "cpu"})
    assert (spec.name, spec.model) == ("small", "smollm2-135m-instruct")
    assert spec.options == {"device": "cpu", "quantization": "int4", "max_batch_size": 4}
    assert parse_model_arg("synthetic:tiny-llama3", {}).name == "synthetic:tiny-llama3"
    with pytest.raises(InferRecipesError, match="not KEY=VALUE"):
        parse_model_arg("x=smollm2-135m-instruct,turbo=yes", {})
    with pytest.raises(InferRecipesError, match="quantization"):
        parse_model_arg("x=smollm2-135m-instruct,quantization=int3", {})
    with pytest.raises(InferRecipesError, match="given twice"):
        ModelPool([ModelSpec("a", "m"), ModelSpec("a", "m")])
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("1500MB") == 1_500_000_000
    with pytest.raises(InferRecipesError, match="memory size"):
        parse_bytes("lots")
    d = load_deployment("smollm2-dual")
    assert [m.name for m in d.models] == ["smollm2", "smollm2-int4"] and d.models[1].pinned
    assert d.models[1].options["quantization"] == "int4" and d.models[0].options["max_model_len"] == 2048
    assert d.cascades[0].small == "smollm2-int4" and d.memory_budget == 6 * 2**30


def test_a_served_model_drafts_for_another_on_the_same_weights():
    from infer_recipes import InferRecipesError

    draft = ModelSpec("d", "synthetic:tiny-llama3", dict(OPTS))
    target = ModelSpec("t", "synthetic:tiny-llama3", {**OPTS, "speculative_model": "d"})
    own_draft = ModelSpec("t", "synthetic:tiny-llama3", {**OPTS, "speculative_model": "synthetic:tiny-llama3"})
    # counted once: the target adds the draft's KV pool, not its weights
    assert estimate_bytes(target, draft) < estimate_bytes(own_draft)

    async def main():
        pool = ModelPool([ModelSpec("a", "synthetic:tiny-llama3", dict(OPTS)), draft, target],
                         int(SIZE * 3.5), log=lambda _: None)
        assert await _use(pool, "t") == 2  # loads d first
        d, t = pool.entries["d"], pool.entries["t"]
        shared = d.loaded and t.llm.draft_runner.model is d.llm.runner.model
        await _use(pool, "a")  # no room for a third model: t (least recently used, idle) goes, never d under it
        gone_first = {n for n, e in pool.entries.items() if not e.loaded}
        leases_after = d.leases
        await _use(pool, "t")  # back, on d's weights again
        pool.shutdown()
        return shared, gone_first, leases_after

    shared, gone_first, leases_after = asyncio.run(main())
    assert shared and gone_first == {"t"} and leases_after == 0
    for options, match in [({"speculative_model": "t"}, "itself"), ({}, None)]:
        specs = [ModelSpec("t", "m", options), ModelSpec("u", "m", {"speculative_model": "t"})]
        if match is None:
            ModelPool(specs).shutdown()
        else:
            with pytest.raises(InferRecipesError, match=match):
                ModelPool(specs)
