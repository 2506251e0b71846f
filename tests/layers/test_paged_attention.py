"""Paged attention against PyTorch's scaled_dot_product_attention on the same keys and values laid out
contiguously: random block tables (blocks scattered over the pool, in any order), decodes and prefill chunks
mixed in one step, GQA ratios, the fused and textbook paths, float and int8 pools."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infer_recipes.layers.attention import PagedMetadata, dequantize_kv, paged_attention_impl, quantize_kv


def _reference(q, k, v, scale):
    """q [T, H, D] the last T positions of k, v [S, Hkv, D]: causal, bottom-right aligned."""
    T, S = q.shape[0], k.shape[0]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
                                         v.repeat_interleave(g, 1).transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _round_trip(x: torch.Tensor) -> torch.Tensor:
    return dequantize_kv(*quantize_kv(x), x.dtype)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3), (6, 1)])
def test_paged_attention_equals_sdpa_on_random_block_tables(fused, heads, kv_heads, kv_dtype):
    """An int8 pool: exactly (to float rounding) attention over the dequantized keys and values, and within a
    stated bound of attention over the float ones."""
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    D, bs, num_blocks = 16, 4, 64
    int8 = kv_dtype == torch.int8
    # (context already in the cache, tokens computed now): decodes (1 new token) and prefill chunks
    seqs = [(9, 1), (0, 1), (30, 1), (0, 7), (5, 11), (16, 3)]
    order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks handed out in a scattered order
    k_cache = torch.zeros(num_blocks, kv_heads, bs, D, dtype=kv_dtype)
    v_cache = torch.zeros(num_blocks, kv_heads, bs, D, dtype=kv_dtype)
    scales = (torch.zeros(num_blocks, kv_heads, bs), torch.zeros(num_blocks, kv_heads, bs)) if int8 else (None, None)
    full_k, full_v, tables = [], [], []
    for ctx, n in seqs:
        total = ctx + n
        table = [order.pop() for _ in range(-(-total // bs))]
        k = torch.randn(total, kv_heads, D, generator=gen)
        v = torch.randn(total, kv_heads, D, generator=gen)
        for p in range(ctx):  # what earlier steps wrote
            for cache, scale, x in ((k_cache, scales[0], k[p]), (v_cache, scales[1], v[p])):
                if int8:
                    cache[table[p // bs], :, p % bs], scale[table[p // bs], :, p % bs] = quantize_kv(x)
                else:
                    cache[table[p // bs], :, p % bs] = x
        full_k.append(k), full_v.append(v), tables.append(table)
    decodes = [i for i, (_, n) in enumerate(seqs) if n == 1 and seqs[i][0] > 0]
    prefills = [i for i in range(len(seqs)) if i not in decodes]
    step = decodes + prefills  # the runner's order: decodes first
    qs, ks, vs, slots, dec_meta, pre_meta, at = [], [], [], [], [], [], 0
    for i in step:
        ctx, n = seqs[i]
        qs.append(torch.randn(n, heads, D, generator=gen))
        ks.append(full_k[i][ctx:]), vs.append(full_v[i][ctx:])
        slots += [tables[i][p // bs] * bs + p % bs for p in range(ctx, ctx + n)]
        if i in decodes:
            dec_meta.append((tables[i], ctx + 1))
        else:
            pre_meta.append((at, n, ctx + n, tables[i]))
        at += n
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    meta = PagedMetadata.build(dec_meta, pre_meta, torch.tensor(slots), bs, torch.device("cpu"))
    scale = D ** -0.5
    out = paged_attention_impl(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.parts, scale, fused, False, *scales)
    at = 0
    for i, qi in zip(step, qs):
        got = out[at:at + len(qi)]
        if int8:
            want = _reference(qi, _round_trip(full_k[i]), _round_trip(full_v[i]), scale)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            # a step of 1/254 of each row's range per element: on unit-variance data the output moves < 0.03
            assert (got - _reference(qi, full_k[i], full_v[i], scale)).abs().max() < 0.03  # measured <= 0.019
        else:
            torch.testing.assert_close(got, _reference(qi, full_k[i], full_v[i], scale), atol=1e-5, rtol=1e-5)
        at += len(qi)
    # the step's keys and values were written into their slots
    for i in step:
        ctx, n = seqs[i]
        for p in range(ctx, ctx + n):
            slot = tables[i][p // bs], slice(None), p % bs
            if int8:
                assert torch.equal(k_cache[slot], quantize_kv(full_k[i][p])[0])
                torch.testing.assert_close(scales[1][slot], quantize_kv(full_v[i][p])[1])
            else:
                assert torch.equal(k_cache[slot], full_k[i][p])
