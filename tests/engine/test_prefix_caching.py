"""Automatic prefix caching on the real SmolLM2: greedy outputs are exactly those without it (shared prefixes,
prompts that end on a block boundary or one token past it, preemption and eviction under a small pool), a later
request computes only what is not cached, and aborts leave every block free."""
from __future__ import annotations

import pytest

from infer_recipes import LLM, SamplingParams
from infer_recipes.engine.block_pool import BlockPool
from tests.conftest import abort_midway

SYSTEM = ("You are a careful assistant. Answer the question with a short phrase copied from the context. If the "
          "context does not contain the answer, reply: unanswerable. ")
QUESTIONS = ["Context: Paris is the capital of France. Question: What is the capital of France?",
             "Context: The Nile flows through Egypt. Question: Which river flows through Egypt?",
             "Context: Mount Everest is in Nepal. Question: Where is Mount Everest?"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts(tok) -> list[list[int]]:
    shared = [tok.encode(SYSTEM + q) for q in QUESTIONS]
    base = tok.encode(SYSTEM)
    boundary = [base[:n] for n in (32, 33, 47, 48, 49)]  # around block boundaries of 16
    return shared + boundary + shared[:1]  # the last one repeats the first exactly


@pytest.fixture(scope="module")
def uncached(smollm):
    return LLM("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False, prefix_caching=False)


@pytest.mark.parametrize("num_blocks", [None, 40])  # 40 blocks of 16: preemption and eviction
def test_cached_and_uncached_greedy_outputs_are_identical(smollm, uncached, num_blocks):
    prompts = _prompts(smollm.tokenizer)
    want = [o.token_ids for o in uncached.generate(prompts, GREEDY)]
    cached = smollm if num_blocks is None else LLM("smollm2-135m-instruct", device="cpu", dtype="float32",
                                                   progress=False, num_blocks=num_blocks, max_model_len=512)
    assert cached.engine.block_pool.caching
    for batch in (prompts, prompts[::-1]):  # the second pass finds the first pass's blocks
        assert [o.token_ids for o in cached.generate(batch, GREEDY)][::1 if batch is prompts else -1] == want
    stats = cached.engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    if num_blocks is not None:
        assert stats["preemptions"] > 0 or stats["prefix_cache_blocks"] < stats["kv_blocks_total"]


def test_a_later_request_computes_only_its_uncached_tail(smollm):
    engine = smollm.engine
    prompt = smollm.tokenizer.encode(SYSTEM + QUESTIONS[1])
    smollm.generate(prompt, GREEDY)
    before = engine.stats()
    smollm.generate(prompt + [13], GREEDY)  # one more token: all the first prompt's full blocks are cached
    after = engine.stats()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == len(prompt) // 16 * 16
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(prompt) + 1


def test_aborted_requests_leave_every_block_free(smollm):
    abort_midway(smollm.engine, _prompts(smollm.tokenizer),
                 SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), steps=3)


def test_int4_w8a8_does_not_cache_by_default_and_no_cache_refuses_it():
    from infer_recipes.config import ConfigError, EngineConfig, prefix_caching_on

    assert not prefix_caching_on(EngineConfig(quantization="int4-w8a8"))
    assert prefix_caching_on(EngineConfig(quantization="int8")) and not prefix_caching_on(EngineConfig(kv_cache=False))
    with pytest.raises(ConfigError, match="needs the KV cache"):
        EngineConfig(kv_cache=False, prefix_caching=True)


def test_a_reset_cache_is_cold_and_keeps_what_sequences_hold(smollm):
    """`reset_prefix_cache` (a cold cache for a measurement): a prompt seen before finds nothing afterwards and
    decodes the same tokens; in the pool, a block a sequence still holds keeps its name through the reset."""
    prompt = smollm.tokenizer.encode(SYSTEM + QUESTIONS[2])
    want = smollm.generate([prompt], GREEDY)[0].token_ids
    engine = smollm.engine
    assert engine.stats()["prefix_cache_blocks"] > 0
    assert engine.reset_prefix_cache() > 0
    before = engine.stats()
    assert before["prefix_cache_blocks"] == 0 and before["kv_blocks_free"] == before["kv_blocks_total"]
    assert smollm.generate([prompt], GREEDY)[0].token_ids == want
    assert engine.stats()["prefix_cache_hits"] == before["prefix_cache_hits"]

    pool = BlockPool(8, 4, caching=True)
    held, idle = [], []
    pool.grow(held, 8)
    pool.grow(idle, 8)
    a, b = list(range(9)), list(range(100, 109))
    pool.name_full_blocks(held, a, [], 0, 8)
    pool.name_full_blocks(idle, b, [], 0, 8)
    pool.release(idle)
    assert pool.num_cached == 4 and pool.forget_idle() == 2
    assert pool.match(a, []) == held and pool.match(b, []) == [] and pool.num_free == 6
