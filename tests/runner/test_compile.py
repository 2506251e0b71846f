"""torch.compile switch: exact in fp32, and no recompiles for any prompt length once warmed up."""
from __future__ import annotations

import itertools
import random

import pytest

from infer_recipes import LLM, SamplingParams

TINY = "synthetic:tiny-llama3"
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_compiled():
    return LLM(TINY, device="cpu", compile=True, max_model_len=1024, max_batch_size=8, progress=False)


@pytest.fixture(scope="module")
def tiny_eager():
    return LLM(TINY, device="cpu", kv_cache=False, fusion=False, max_model_len=1024, progress=False)


def test_warm_up_compiles_every_graph_class_and_lengths_1_to_512_need_no_recompile(tiny_compiled, tiny_eager):
    llm = tiny_compiled
    warmed = llm.compiles
    assert warmed >= 4  # batch 1 / more x one query / more (first layers may add their own)
    rng = random.Random(0)
    one = SamplingParams(max_tokens=2, temperature=0.0)
    for n in range(1, 513):
        ids = [rng.randrange(256) for _ in range(n)]
        out = llm.generate(ids, one)[0].token_ids
        if n in (1, 2, 3, 17, 64, 255, 256, 511, 512):  # spot-check the compiled result against eager
            assert out == tiny_eager.generate(ids, one)[0].token_ids, n
    for sizes in ([5, 300], [1, 2, 3], [512, 7, 64, 100, 1, 33, 2, 9]):  # padded batches of every size up to 8
        batch = [[rng.randrange(256) for _ in range(n)] for n in sizes]
        got = [o.token_ids for o in llm.generate(batch, GREEDY)]
        assert got == [o.token_ids for o in tiny_eager.generate(batch, GREEDY)]
    assert llm.compiles == warmed, f"{llm.compiles - warmed} recompiles after warm-up"


@pytest.mark.parametrize("kv_cache,fusion", list(itertools.product([False, True], repeat=2)))
def test_compiled_tiny_model_matches_all_off(tiny_eager, kv_cache, fusion):
    llm = LLM(TINY, device="cpu", compile=True, kv_cache=kv_cache, fusion=fusion, max_model_len=1024, progress=False)
    prompts = ["hello there", "a much longer prompt than the first one, to pad the batch", "x"]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    assert [o.token_ids for o in llm.generate(prompts, params)] == \
        [o.token_ids for o in tiny_eager.generate(prompts, params)]


def test_compiled_smollm2_gives_the_same_greedy_tokens_as_all_off(smollm):
    off = LLM("smollm2-135m-instruct", device="cpu", kv_cache=False, fusion=False, progress=False)
    llm = LLM("smollm2-135m-instruct", device="cpu", compile=True, progress=False)
    prompts = ["The three laws of robotics are", "北京是中国的首都，", "def add(a, b):"]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in off.generate(prompts, params)]


@pytest.mark.parametrize("scheme", ["int8", "int4-w8a8"])
def test_compile_composes_with_quantization(scheme):
    """The quantized kernels trace into the compiled layer graph and give the eager quantized model's tokens."""
    compiled = LLM(TINY, device="cpu", compile=True, quantization=scheme, progress=False)
    eager = LLM(TINY, device="cpu", quantization=scheme, progress=False)
    prompts = ["hello world", "a b c d e f g h i j k"]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    assert [o.token_ids for o in compiled.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
