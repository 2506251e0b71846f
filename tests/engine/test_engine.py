"""The continuous-batching engine: greedy outputs do not depend on what a request is batched with."""
from __future__ import annotations

import pytest

from infer_recipes import LLM, SamplingParams

PROMPTS = ["The three primary colours are", "Once upon a time, in a land far away, there lived a",
           "def fibonacci(n):", "北京是中国的首都，", "Water boils at"]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(smollm):
    return {p: smollm.generate(p, GREEDY)[0].token_ids for p in PROMPTS}


def test_static_batch_equals_alone(smollm, alone):
    outs = smollm.generate(PROMPTS, GREEDY)
    assert {p: o.token_ids for p, o in zip(PROMPTS, outs)} == alone


def test_staggered_arrivals_chunked_prefill_and_preemption_equal_alone(alone):
    # a pool too small for all five (10 blocks of 16 tokens; each needs 3-4), an 8-token step budget so every
    # prompt is chunked, and requests arriving while others decode
    llm = LLM("smollm2-135m-instruct", device="cpu", progress=False, max_model_len=128, num_blocks=10,
              max_num_batched_tokens=8)
    engine = llm.engine
    ids, finals, step = {}, {}, 0
    pending = list(PROMPTS)
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            p = pending.pop(0)
            ids[engine.add_request(p, GREEDY)] = p
        for out in engine.step():
            assert len(out.token_ids) <= GREEDY.max_tokens
            if out.finished:
                finals[ids[out.request_id]] = out.token_ids
        assert sum(len(s.block_table) for s in engine.scheduler.running) + engine.block_pool.num_free == 10
        step += 1
    assert engine.scheduler.num_preemptions > 0, "the test meant to force a preemption"
    assert finals == alone
    assert engine.block_pool.num_free == 10


def test_abort_frees_blocks_and_the_others_continue(smollm, alone):
    engine = smollm.engine
    keep = engine.add_request(PROMPTS[0], GREEDY)
    drop = engine.add_request(PROMPTS[1], GREEDY)
    for _ in range(3):
        engine.step()
    engine.abort_request(drop)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == keep
            final = out
    assert final.token_ids == alone[PROMPTS[0]]
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_without_kv_cache_the_engine_recomputes_and_agrees(alone):
    llm = LLM("smollm2-135m-instruct", device="cpu", progress=False, kv_cache=False, max_model_len=128)
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [alone[p][:12] for p in PROMPTS[:2]]


def test_duplicate_request_id_and_bad_prompts_are_refused(smollm):
    from infer_recipes import InferRecipesError
    from infer_recipes.errors import ContextLengthError

    engine = smollm.engine
    engine.add_request("hi", GREEDY, request_id="same")
    try:
        with pytest.raises(InferRecipesError, match="already in use"):
            engine.add_request("hi", GREEDY, request_id="same")
    finally:
        engine.abort_request("same")
    with pytest.raises(ContextLengthError):
        engine.add_request([1] * smollm.max_model_len, GREEDY)
    assert not engine.has_unfinished_requests()
