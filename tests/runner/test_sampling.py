"""Sampling filters on hand-made distributions."""
from __future__ import annotations

import torch

from infer_recipes.config import SamplingParams
from infer_recipes.runner.sampling import _filter, make_generator, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(params: SamplingParams) -> list[int]:
    return torch.isfinite(_filter(LOGITS.clone(), params)).nonzero().flatten().tolist()


def test_top_k():
    assert kept(SamplingParams(top_k=2)) == [0, 1]


def test_top_p_keeps_the_smallest_set_covering_p():
    assert kept(SamplingParams(top_p=0.5)) == [0]
    assert kept(SamplingParams(top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(top_p=0.8)) == [0, 1, 2]


def test_min_p_relative_to_the_top_token():
    assert kept(SamplingParams(min_p=0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5
    assert kept(SamplingParams(min_p=0.6)) == [0]


def test_greedy_and_seeded_frequencies():
    logits = LOGITS.repeat(2, 1)
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert greedy.tokens == [0, 0]
    p = SamplingParams(temperature=1.0)
    g = make_generator(0, torch.device("cpu"))
    draws = [sample(LOGITS[None], [p], [g]).tokens[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert torch.allclose(freq, LOGITS.exp(), atol=0.03)


def test_logprobs_are_model_log_probabilities():
    res = sample(LOGITS[None], [SamplingParams(temperature=0.0, logprobs=3)], [None])
    assert abs(res.logprobs[0] - float(torch.log(torch.tensor(0.5)))) < 1e-5
    assert [t for t, _ in res.top_logprobs[0]] == [0, 1, 2]
