"""Optimization switches: exact ones change nothing, quantized ones stay close to the float model."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from infer_recipes import LLM, InferRecipesError, SamplingParams

PROMPTS = ["The three laws of robotics are", "北京是中国的首都，", "def add(a, b):"]
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world.")


@pytest.fixture(scope="module")
def reference(smollm):
    off = LLM("smollm2-135m-instruct", device="cpu", kv_cache=False, fusion=False, progress=False)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    return off, [o.token_ids for o in off.generate(PROMPTS, params)], params


@pytest.mark.parametrize("kv_cache,fusion", list(itertools.product([False, True], repeat=2)))
def test_exact_switches_give_the_same_greedy_tokens(reference, kv_cache, fusion):
    off, expected, params = reference
    # all off too: one sequence at a time against the reference's batch of three
    llm = LLM("smollm2-135m-instruct", device="cpu", kv_cache=kv_cache, fusion=fusion, progress=False,
              max_batch_size=1 if not (kv_cache or fusion) else 16)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected


def agreement(llm: LLM, ref_logits: torch.Tensor, ids: list[int]) -> tuple[float, float]:
    logits = llm.logits(ids)
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                  reduction="batchmean").item()
    return top1, kl


# bounds from measured values (70 tokens; top-1 / KL): int8 0.957 / 0.0052, int8-minmax 0.971 / 0.0036,
# w8a8 0.871 / 0.049, int4 g32 0.857 / 0.054, gguf 0.971 / 0.0052 (the reference is the GGUF dequantized; the
# error is our kernels' int8 activations: on torch's kernels 0.971 / 0.0019);
# int4-w8a8 scores the whole text in one forward, so through its w8a8 (prefill) form
@pytest.mark.parametrize("scheme,min_top1,max_kl", [("int8", 0.92, 0.02), ("int8-minmax", 0.92, 0.02),
                                                      ("w8a8", 0.80, 0.10), ("int4", 0.80, 0.12),
                                                      ("int4-w8a8", 0.80, 0.10), ("gguf", 0.95, 0.01)])
def test_quantized_schemes_agree_with_fp32(reference, scheme, min_top1, max_kl):
    off, _, _ = reference
    ids = off.tokenizer.encode(TEXT)
    ref = off.logits(ids)
    llm = LLM("smollm2-135m-instruct", device="cpu", quantization=scheme, progress=False)
    top1, kl = agreement(llm, ref, ids)
    assert top1 >= min_top1 and kl <= max_kl, (top1, kl)
    assert llm.weight_bytes() < off.weight_bytes() * 0.5


def test_quantization_skip_keeps_named_layers_in_float():
    llm = LLM("smollm2-135m-instruct", device="cpu", quantization="int8",
              quantization_skip=("lm_head", "model.layers.0.*"), progress=False)
    assert type(llm.model.lm_head) is torch.nn.Linear
    assert type(llm.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(llm.model.model.layers[1].mlp.down_proj).__name__ == "Int8Linear"


@pytest.mark.parametrize("bad,match", [(dict(quantization="int3"), "quantization"), (dict(group_size=48), "group_size"),
                                       (dict(fusion="yes"), "fusion"), (dict(speed="max"), "unknown LLM option")])
def test_bad_switches_are_named(bad, match):
    with pytest.raises(InferRecipesError, match=match):
        LLM("synthetic:smollm2-135m", device="cpu", progress=False, **bad)


def test_gguf_scheme_needs_a_gguf_source():
    with pytest.raises(InferRecipesError, match="GGUF"):
        LLM("synthetic:smollm2-135m", device="cpu", quantization="gguf", progress=False)


def test_perplexity_windows_score_every_token_once():
    from infer_recipes.eval.perplexity import windows

    for n, w, s in [(10, 4, 2), (1000, 128, 64), (5, 8, 4), (33, 8, 7)]:
        scored = [p for _, end, first in windows(n, w, s) for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= w and first > start for start, end, first in windows(n, w, s))


def test_eval_perplexity_and_agreement_cli():
    import json
    import subprocess
    import sys

    from conftest import data_path, smollm2_gguf

    smollm2_gguf()
    data = str(data_path("wikitext2", "wiki.valid.tokens"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "infer_recipes", "eval", *a], capture_output=True,
                                    text=True, timeout=600)
    fp32 = run("perplexity", "--data", data, "--max-tokens", "600", "--window", "256", "--stride", "128", "--json")
    assert fp32.returncode == 0, fp32.stderr
    fp32 = json.loads(fp32.stdout)
    assert fp32["tokens"] == 599 and 5 < fp32["perplexity"] < 40 and fp32["seconds"] > 0
    int8 = json.loads(run("perplexity", "--data", data, "--max-tokens", "600", "--window", "256", "--stride", "128",
                          "--quantization", "int8", "--json").stdout)
    assert int8["perplexity"] <= fp32["perplexity"] * 1.02
    agree = json.loads(run("agreement", "--data", data, "--max-tokens", "300", "--quantization", "int8",
                           "--json").stdout)
    assert agree["tokens"] == 300 and agree["top1_agreement"] > 0.9 and agree["mean_kl"] < 0.02
