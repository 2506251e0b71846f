"""The async engine: the outputs an asyncio caller streams are the engine's own, places in the queue are taken
at admission (429 when full now, refused outright when they could never fit), and a caller that leaves aborts
its request and gives its blocks back."""
from __future__ import annotations

import asyncio

import pytest

from infer_recipes import LLM, SamplingParams
from infer_recipes.engine.async_engine import AsyncEngine
from infer_recipes.engine.scheduler import QueueFullError
from infer_recipes.errors import InferRecipesError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return LLM("synthetic:tiny-llama3", device="cpu", progress=False, max_waiting=2, max_batch_size=1)


def test_streamed_outputs_are_the_engines_own(tiny):
    want = tiny.generate([[1, 2, 3], [4, 5]], GREEDY)

    async def main():
        engine = AsyncEngine(tiny.engine, "tiny")
        try:
            async def collect(ids):
                return [out async for out in engine.generate(ids, GREEDY)]
            return await asyncio.gather(collect([1, 2, 3]), collect([4, 5]))
        finally:
            engine.shutdown()

    streams = asyncio.run(main())
    for stream, final in zip(streams, want):
        assert stream[-1].finished and stream[-1].token_ids == final.token_ids
        assert "".join(o.delta for o in stream) == final.text
        assert [len(o.token_ids) for o in stream] == list(range(1, 9))


def test_admission_reserves_places_and_tickets_give_them_back(tiny):
    async def main():
        engine = AsyncEngine(tiny.engine, "tiny")
        try:
            with pytest.raises(InferRecipesError, match="holds at most 2") as never:
                engine.admit(3)
            assert not isinstance(never.value, QueueFullError)  # a 400, not a 429
            ticket = engine.admit(2)
            with pytest.raises(QueueFullError):
                engine.admit(1)
            ticket.close()  # unused places go back
            ticket = engine.admit(2)
            out = await engine.final([1, 2], GREEDY, ticket)
            ticket.close()
            assert out.finished and len(out.token_ids) == 8
            engine.admit(2).close()  # the queue is empty again
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_a_caller_that_leaves_aborts_its_request(tiny):
    async def main():
        engine = AsyncEngine(tiny.engine, "tiny")
        try:
            params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
            async for out in engine.generate([1, 2, 3], params):
                if len(out.token_ids) == 3:
                    break  # the generator's close sends the abort
            for _ in range(100):
                if not tiny.engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.02)
            return tiny.engine.block_pool.num_free, tiny.engine.block_pool.num_blocks, tiny.engine.requests
        finally:
            engine.shutdown()

    free, total, left = asyncio.run(main())
    assert free == total and not left
