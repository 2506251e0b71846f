"""The int8 KV cache (`kv_cache_dtype: int8`): close to the float cache on the real SmolLM2 (bounds from measured
values), our kernels and torch's reading it alike, prefix caching still exact on it, aborts leaving every block
free, the pool's real bytes counted everywhere, torch.compile running it, and refused without a KV cache. Its key
scaling: exact in float, taming an outlier channel, and on the real Qwen2.5-Coder-0.5B (whose keys have them) the
difference between an int8 pool that agrees with the float one and one that does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infer_recipes import LLM, EngineConfig, InferRecipesError, SamplingParams, plan
from infer_recipes.layers.attention import dequantize_kv, key_scales, quantize_kv
from tests.conftest import abort_midway, qwen_gguf
from tests.engine.test_prefix_caching import GREEDY, _prompts
from tests.runner.test_switches import PROMPTS, TEXT

SMOL = "smollm2-135m-instruct"
DECODE = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def float_kv(smollm):
    ids = smollm.tokenizer.encode(TEXT)
    return ids, smollm.logits(ids), [o.token_ids for o in smollm.generate(PROMPTS, DECODE)]


@pytest.fixture(scope="module", params=["native", "torch"])
def int8_kv(request, smollm):
    return LLM(SMOL, device="cpu", dtype="float32", kv_cache_dtype="int8", kernels=request.param, progress=False,
               max_model_len=512)


def test_int8_kv_scores_and_decodes_close_to_the_float_cache(float_kv, int8_kv):
    """Measured (70 tokens scored; 3 prompts x 24 greedy tokens): top-1 0.971 (our kernels) / 0.986 (torch's),
    KL 0.0006; all 72 greedy tokens equal on both (2 of 90 KV heads' keys scaled; unscaled, 87.5 % were)."""
    ids, ref, want = float_kv
    logits = int8_kv.logits(ids)  # scored as the pool would hold the keys and values: not the float cache
    assert not torch.equal(logits, ref)
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean").item()
    assert top1 >= 0.94 and kl <= 0.003, (top1, kl)
    got = [o.token_ids for o in int8_kv.generate(PROMPTS, DECODE)]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / sum(map(len, want))
    assert same >= 0.75 and all(g[:8] == w[:8] for g, w in zip(got, want)), got


def test_prefix_caching_stays_exact_on_an_int8_pool(smollm):
    """Each token's int8 row and scale depend on that token alone and every attention reads what the pool
    holds, so cached prefixes give the tokens an uncached run gives; aborted requests free every block."""
    cached, uncached = (LLM(SMOL, device="cpu", dtype="float32", kv_cache_dtype="int8", prefix_caching=caching,
                            progress=False, max_model_len=512) for caching in (True, False))
    prompts = _prompts(smollm.tokenizer)
    want = [o.token_ids for o in uncached.generate(prompts, GREEDY)]
    for batch in (prompts, prompts[::-1]):  # the second pass finds the first pass's blocks
        assert [o.token_ids for o in cached.generate(batch, GREEDY)][::1 if batch is prompts else -1] == want
    abort_midway(cached.engine, prompts, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), steps=3)
    stats = cached.engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_every_pool_tensor_starts_on_a_huge_page_boundary(dtype):
    """So every block's rows start on a cache line (numpy's own arrays start 16 bytes past a page, which put each
    64-byte int8 row across two lines), and the pool is zeros of exactly its shape."""
    from infer_recipes.runner.kv_cache import ALIGN, KVCache

    cache = KVCache(num_layers=2, num_blocks=37, block_size=16, num_kv_heads=3, head_dim=64, dtype=dtype,
                    device=torch.device("cpu"))
    tensors = [t for layer in cache.layers for t in layer]
    assert len(tensors) == (8 if dtype == torch.int8 else 4)
    for t in tensors:
        assert t.data_ptr() % ALIGN == 0 and t.is_contiguous() and t.shape[:3] == (37, 3, 16)
        assert not t.any()
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in tensors)


def test_the_int8_pool_counts_its_real_bytes_everywhere():
    """A byte per element and a float32 scale per token and head: (D + 4) / 4D of float32's pool, in the pool
    itself, per token, in the planner and in the engine's sizing of the pool from a memory fraction."""
    kw = dict(device="cpu", dtype="float32", progress=False, max_model_len=256, num_blocks=64)
    f32, i8 = LLM("synthetic:tiny-llama3", **kw), LLM("synthetic:tiny-llama3", kv_cache_dtype="int8", **kw)
    c = f32.model_config
    assert i8.kv_cache_bytes() * 4 * c.head_dim == f32.kv_cache_bytes() * (c.head_dim + 4)
    assert i8.kv_bytes_per_token() == c.num_layers * 2 * c.num_kv_heads * (c.head_dim + 4)
    assert plan.kv_bytes_per_token(c, "int8") == i8.kv_bytes_per_token()
    assert plan.kv_bytes_per_token(c, "float32") == f32.kv_bytes_per_token()
    from infer_recipes.runner import kv_pool_blocks


    sized = {d: kv_pool_blocks(c, EngineConfig(kv_cache_dtype=d, kv_cache_memory=0.001, max_batch_size=10**6),
                               256, torch.float32, torch.device("cpu")) for d in ("auto", "int8")}
    # the same memory holds 4 D / (D + 4) times the blocks
    assert sized["int8"] / sized["auto"] == pytest.approx(4 * c.head_dim / (c.head_dim + 4), rel=1e-3)


def test_compiled_layers_run_the_int8_pool():
    kw = dict(device="cpu", kv_cache_dtype="int8", max_model_len=256, max_batch_size=4, progress=False)
    compiled, eager = LLM("synthetic:tiny-llama3", compile=True, **kw), LLM("synthetic:tiny-llama3", **kw)
    prompts = [[5, 9, 200, 31] * 5, [7] * 40, [1, 2, 3]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in compiled.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]


@pytest.mark.parametrize("bad,match", [({"kv_cache_dtype": "fp8"}, "unknown KV cache dtype"),
                                       ({"kv_cache_dtype": "int8", "kv_cache": False}, "needs the KV cache")])
def test_bad_kv_cache_dtypes_are_named(bad, match):
    with pytest.raises(InferRecipesError, match=match):
        LLM("synthetic:tiny-llama3", device="cpu", progress=False, **bad)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_scaled_keys_leave_every_score_as_it_was(kernels):
    """Queries times s and keys over s, s equal on the channels RoPE pairs: through the float cache, prefill and
    decode, the outputs are the unscaled model's (to float32 rounding), on our kernels (scaled before their RoPE)
    and torch's."""
    kw = dict(device="cpu", dtype="float32", max_model_len=256, progress=False, kernels=kernels)
    plain, scaled = LLM("synthetic:tiny-llama3", **kw), LLM("synthetic:tiny-llama3", **kw)
    g = torch.Generator().manual_seed(1)
    for layer in scaled.model.model.layers:
        attention = layer.self_attn
        half = torch.exp(torch.randn(attention.num_kv_heads, attention.head_dim // 2, generator=g) * 2)
        attention.scale_keys(torch.cat([half, half], -1), torch.float32)
    ids = [5, 9, 200, 31] * 6 + [7, 3]
    assert torch.allclose(scaled.logits(ids), plain.logits(ids), atol=1e-4, rtol=1e-4)
    qk_scale = scaled.model.model.layers[0].self_attn.qk_scale
    assert qk_scale.max() > 10 * qk_scale.min()  # a real scaling, from 1/s to s
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [ids, [1, 2, 3], [7] * 30]
    assert [o.token_ids for o in scaled.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]


def test_key_scales_tame_an_outlier_channel():
    """One key channel pair 100x the others (as Qwen2.5's): unscaled, one scale per token leaves the others a few
    int8 levels; the chosen scaling cuts the error of the attention weights it was judged by at least 10-fold,
    and is equal on the channels RoPE rotates together."""
    g = torch.Generator().manual_seed(0)
    N, H, Hkv, D = 256, 4, 2, 64
    q, k = torch.randn(N, H, D, generator=g), torch.randn(N, Hkv, D, generator=g)
    k[:, :, 3] += 100
    k[:, :, 3 + D // 2] -= 100
    s, a = key_scales(q, k, D ** -0.5)
    assert torch.equal(s[:, :D // 2], s[:, D // 2:]) and (a > 0).all()

    def weight_error(scale: torch.Tensor) -> float:
        exact = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k.repeat_interleave(2, 1)) * D ** -0.5, -1)
        k8 = dequantize_kv(*quantize_kv(k / scale), torch.float32) * scale
        got = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k8.repeat_interleave(2, 1)) * D ** -0.5, -1)
        return (got - exact).square().sum().item()

    assert weight_error(s) * 10 < weight_error(torch.ones(Hkv, D))


def test_the_int8_pool_holds_qwen_keys_only_once_scaled():
    """Qwen2.5-Coder-0.5B, int8 pool against the float one on the same GGUF weights, 69 tokens scored. Measured,
    our kernels / torch's: scaled top-1 0.957 / 0.986, KL 0.0017 / 0.0012; the same pool with the scaling taken
    off: top-1 0.928 / 0.899, KL 0.0127 / 0.0119. Greedy tokens are not asserted: on 3 prompts x 24 tokens they
    split on near-ties and measured no ordering (equal until the first difference, scaled vs unscaled: 24, 0, 24
    vs 11, 0, 2 on our kernels; 10, 0, 24 vs 24, 0, 0 on torch's), where the scored tokens above did on both."""
    qwen_gguf("qwen2.5-coder-0.5b-instruct")
    kw = dict(device="cpu", quantization="gguf", progress=False, max_model_len=512)
    ref = LLM("qwen2.5-coder-0.5b-instruct", **kw)
    int8 = LLM("qwen2.5-coder-0.5b-instruct", kv_cache_dtype="int8", **kw)
    ids = ref.tokenizer.encode(TEXT)
    want = ref.logits(ids)

    def agreement(llm: LLM) -> tuple[float, float]:
        logits = llm.logits(ids)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(want, -1), log_target=True,
                      reduction="batchmean").item()
        return (logits.argmax(-1) == want.argmax(-1)).float().mean().item(), kl

    top1, kl = agreement(int8)
    assert top1 >= 0.94 and kl <= 0.004, (top1, kl)
    for layer in int8.model.model.layers:
        layer.self_attn.scale_keys(None, torch.float32)
    top1_unscaled, kl_unscaled = agreement(int8)
    assert kl_unscaled >= 4 * kl and top1_unscaled < top1, (top1_unscaled, kl_unscaled)
