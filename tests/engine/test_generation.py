"""Generation behaviour: batching, stop conditions, context limits, sampling controls."""
from __future__ import annotations

import pytest
import torch

from infer_recipes import LLM, InferRecipesError, SamplingParams
from infer_recipes.errors import ContextLengthError


@pytest.fixture(scope="module")
def tiny():
    return LLM("synthetic:smollm2-135m", device="cpu", dtype="float32", progress=False, max_model_len=96)


def test_batched_prompts_of_different_lengths_equal_single_runs(smollm):
    prompts = ["Hi", "The three primary colours are", "Once upon a time, in a land far away, there lived a"]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    batched = smollm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = smollm.generate(prompt, params)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_batched_rows_keep_the_logprobs_of_single_runs(tiny):
    # sequences of different lengths in one flat batch against each run alone, via logprobs
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5)
    prompts = [[5, 6, 7], list(range(10, 40))]
    batched = tiny.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = tiny.generate(prompt, params)[0]
        assert out.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), atol=1e-4)


def test_output_order_follows_prompts(tiny):
    prompts = [list(range(1, n)) for n in (30, 3, 12)]
    outs = tiny.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0))
    assert [o.prompt_token_ids for o in outs] == prompts


def test_max_tokens_and_length_finish(tiny):
    out = tiny.generate([1, 2, 3], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_ids(smollm):
    free = smollm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
    stop_at = free.token_ids[2]
    out = smollm.generate("The capital of France is",
                          SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"


def test_chat_stops_at_end_of_turn(smollm):
    out = smollm.chat([{"role": "user", "content": "Say OK."}], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in smollm.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_stop_strings_cut_the_text(smollm):
    free = smollm.generate("List three fruits: apple,", SamplingParams(max_tokens=16, temperature=0.0))[0]
    word = free.text.strip().split()[0][:3]
    out = smollm.generate("List three fruits: apple,", SamplingParams(max_tokens=16, temperature=0.0, stop=[word]))[0]
    assert out.finish_reason == "stop" and word not in out.text
    assert free.text.startswith(out.text)
    kept = smollm.generate("List three fruits: apple,", SamplingParams(max_tokens=16, temperature=0.0, stop=[word],
                                                                       include_stop_str_in_output=True))[0]
    assert kept.text.endswith(word)


def test_stream_equals_generate(smollm):
    params = SamplingParams(max_tokens=20, temperature=0.0)
    deltas = list(smollm.stream("Describe Paris in one sentence.", params))
    assert "".join(deltas) == smollm.generate("Describe Paris in one sentence.", params)[0].text


def test_seeded_sampling_is_reproducible_and_varies(smollm):
    p = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = smollm.generate("Tell me a joke", SamplingParams(seed=7, **p))[0].token_ids
    b = smollm.generate("Tell me a joke", SamplingParams(seed=7, **p))[0].token_ids
    c = [smollm.generate("Tell me a joke", SamplingParams(seed=s, **p))[0].token_ids for s in (1, 2, 3)]
    assert a == b
    assert any(x != a for x in c)


def test_prompt_longer_than_context_is_refused(tiny):
    with pytest.raises(ContextLengthError, match="96"):
        tiny.generate(list(range(1, 200)), SamplingParams(max_tokens=4))


def test_generation_stops_at_the_context_window(tiny):
    out = tiny.generate(list(range(1, 90)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 96 and out.finish_reason == "length"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-1.0),
                                 dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=2.0), dict(stop=[""]), dict(top_k=-1)])
def test_bad_sampling_params_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(InferRecipesError, match=field):
        SamplingParams(**bad)


def test_bad_prompts(tiny):
    with pytest.raises(InferRecipesError, match="empty"):
        tiny.generate([[]], SamplingParams())
    with pytest.raises(InferRecipesError, match="outside the vocabulary"):
        tiny.generate([[10 ** 9]], SamplingParams())


def test_synthetic_presets_have_published_shapes():
    from infer_recipes.models.registry import PRESETS

    assert 1.2e9 < PRESETS["llama-3.2-1b"].num_parameters < 1.3e9
    assert 3.1e9 < PRESETS["llama-3.2-3b"].num_parameters < 3.3e9
    assert 6.6e9 < PRESETS["llama-2-7b"].num_parameters < 6.8e9
    assert 134e6 < PRESETS["smollm2-135m"].num_parameters < 135e6
