"""One bad request never harms another: a request that breaks inside a step (its forward pass, its sampling)
fails alone, the others finish exactly as they would have, and the KV pool is whole afterwards; the device thread
that steps every engine survives anything and says when it is stuck."""
from __future__ import annotations

import time

import pytest

from infer_recipes import LLM, SamplingParams
from infer_recipes.engine import async_engine
from infer_recipes.engine.async_engine import DeviceThread

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [300, 1, 2, 9, 9], [12, 13]]


@pytest.fixture(scope="module")
def tiny():
    return LLM("synthetic:tiny-llama3", device="cpu", progress=False)


def _run(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_a_request_whose_forward_pass_fails_fails_alone(tiny):
    alone = [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)]
    engine = tiny.engine
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.requests[ids[1]].prompt_token_ids[2] = 10**6  # past the vocabulary: its embedding lookup raises
    finals = _run(engine)
    assert finals[ids[1]].finish_reason == "error" and "forward pass failed" in finals[ids[1]].error
    assert [finals[ids[0]].token_ids, finals[ids[2]].token_ids] == [alone[0], alone[2]]
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_a_request_that_cannot_be_sampled_fails_alone(tiny):
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    want = tiny.generate(PROMPTS[0], sampled)[0].token_ids
    engine = tiny.engine
    good, bad = engine.add_request(PROMPTS[0], sampled), engine.add_request(PROMPTS[1], sampled)
    engine.requests[bad].generator = "not a generator"  # torch refuses it when drawing the noise
    finals = _run(engine)
    assert finals[bad].finish_reason == "error" and "sampling failed" in finals[bad].error
    assert finals[good].token_ids == want
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def test_the_device_thread_says_when_it_is_stuck_or_stopped(monkeypatch):
    monkeypatch.setattr(async_engine, "WEDGED_AFTER_S", 0.2)
    device = DeviceThread("test-device")
    assert device.health() is None
    future = device.call(time.sleep, 1.0)
    time.sleep(0.6)
    assert "in one step for" in device.health()
    future.result()
    assert device.health() is None
    device.call(lambda: 1 / 0)  # a failing call fails its caller, not the thread
    assert device.call_and_wait(lambda: 42) == 42 and device.health() is None
    device.shutdown()
    assert device.health() == "the device thread has stopped"
