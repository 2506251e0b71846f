"""Attention: the textbook and fused kernels, and paged attention over a block pool of keys and values.

The model never decides where keys go: the runner passes `PagedMetadata` saying which pool slots this step writes
and which blocks each sequence reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .. import kernels


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool, bottom-right aligned."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= q_pos


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Textbook attention: repeat K/V heads for GQA, QK^T, mask, softmax in float32, times V.

    q [B, H, T, D]; k, v [B, H_kv, S, D]; mask [B, 1, T, S] bool or None (causal) -> [B, H, T, D].
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, H, S, D]
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if mask is None and q.shape[2] > 1:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """The same result as `eager_attention`, through faster paths.

    Prefill: `scaled_dot_product_attention` (flash / memory-efficient kernels where the device has them).
    Decode (one query): the query heads of a group are stacked against their shared K/V head, so GQA needs no
    repeated K/V copy, in two batched GEMMs; on CPU this beats SDPA's per-call overhead for a single query.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if T == 1:
        qg = q.view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]: the G query heads sharing one K/V head
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, S] broadcasts over heads
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).view(B, H, 1, D)
    if mask is None and S != T:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=Hkv != H)


# ---- paged attention: one flat batch of tokens from many sequences, K/V in a pool of fixed-size blocks --------

@dataclass(frozen=True)
class PagedMetadata:
    """One continuous-batching step: the tokens of every scheduled sequence laid end to end ([1, N] for the
    model), decodes (one token each) first, then prefill chunks.

    slot_mapping: [N] pool slot (block * block_size + offset) each new token's K/V is written to; None without a
        KV cache (every sequence then attends over its own tokens of this step only).
    layout: int64 [L] how the tokens split into sequences, packed into one tensor so a compiled graph sees one
        dynamic size whatever the mix:
        [num_decodes, decode_blocks_per_row, num_prefills, prefill_blocks_per_row,
         decode block tables (num_decodes x blocks), decode context lengths (num_decodes),
         prefill (query start, query length, context length) (num_prefills x 3),
         prefill block tables (num_prefills x blocks)]
    """

    slot_mapping: torch.Tensor | None
    layout: torch.Tensor
    block_size: int
    int8_kv: bool = False  # without a cache (scoring a whole text): attend to the keys and values an int8 pool holds

    @staticmethod
    def build(decodes: list[tuple[list[int], int]], prefills: list[tuple[int, int, int, list[int]]],
              slot_mapping: torch.Tensor | None, block_size: int, device: torch.device,
              int8_kv: bool = False) -> "PagedMetadata":
        """decodes: (block table, context length) per decode row; prefills: (query start, query length, context
        length, block table)."""
        nd = max((len(t) for t, _ in decodes), default=0)
        npf = max((len(p[3]) for p in prefills), default=0)
        layout = [len(decodes), nd, len(prefills), npf]
        for table, _ in decodes:
            layout += table + [0] * (nd - len(table))  # padding points at block 0: finite values, masked out
        layout += [ctx for _, ctx in decodes]
        for start, q_len, ctx, _ in prefills:
            layout += [start, q_len, ctx]
        for *_, table in prefills:
            layout += table + [0] * (npf - len(table))
        return PagedMetadata(slot_mapping, torch.tensor(layout, dtype=torch.long, device=device), block_size, int8_kv)

    @cached_property
    def parts(self) -> "_Layout":
        """The layout unpacked into tensors, once per step (every layer reuses it)."""
        return _Layout.unpack(self.layout, self.block_size)


@dataclass(frozen=True)
class _Layout:
    num_decodes: int
    decode_blocks: torch.Tensor  # [Bd * blocks]
    decode_lens: torch.Tensor  # [Bd] keys per decode row
    decode_mask: torch.Tensor  # [Bd, 1, 1, blocks * block_size] True where a key is real
    prefills: list[tuple[int, int, int]]  # (query start, query length, context length)
    prefill_blocks: torch.Tensor  # [Bp, blocks]

    @staticmethod
    def unpack(layout: torch.Tensor, block_size: int) -> "_Layout":
        head = layout[:4].tolist()
        nd, bd, npf, bp = head
        at = 4
        decode_blocks = layout[at:at + nd * bd]
        at += nd * bd
        ctx = layout[at:at + nd]
        at += nd
        prefills = [tuple(x) for x in layout[at:at + npf * 3].view(npf, 3).tolist()]
        at += npf * 3
        prefill_blocks = layout[at:at + npf * bp].view(npf, bp)
        columns = torch.arange(bd * block_size, device=layout.device)
        mask = (columns.unsqueeze(0) < ctx.unsqueeze(1)).view(nd, 1, 1, bd * block_size)
        return _Layout(nd, decode_blocks, ctx, mask, prefills, prefill_blocks)


# ---- an int8 pool: symmetric per token and KV head, the scale beside the block ------------------------------------

def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scales [...]): each row over its absolute maximum / 127."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(1e-12) / 127
    return torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_kv` up to rounding, in `dtype`: every reader of an int8 pool goes through it."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


# Key channels before an int8 pool: a few channels of some models' keys are 100x the others (Qwen2.5-1.5B's
# first layer: 459 against a median of 4), so one scale per token leaves the rest a handful of levels. Dividing
# key channel c by s_c and multiplying the queries' channel c by it leaves every score q.k as it was, and
# equal s for the two channels RoPE rotates together (c and c + D/2) commutes with RoPE: the scaling can go
# before or after it. s = m^a, m the largest |pair| seen per channel, a per KV head by the error it leaves in the
# attention weights (squared score error as the criterion, or a = 0.75 everywhere, did worse on the 1.5B).
# WikiText-2, the int8 pool against the float one (gguf weights): Qwen2.5-Coder-1.5B +0.89 % perplexity unscaled,
# 0.5B +4.26 %; scaled, +0.13 % and +0.04 %.
KEY_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Each a in turn is taken only if it cuts the error of the best so far 4-fold: the gentlest scaling that tames a
# head's outliers (Qwen2.5's: 0.01-0.1 of the unscaled error), none for the rest. Most heads of any model gain
# 1.5-2x on the random tokens of the pass but not on text. WikiText-2 perplexity of the int8 pool against the float
# one, SmolLM2 / Qwen 0.5B / 1.5B: every gain taken +0.13 / +0.35 / -0.04 %; 4-fold against the unscaled error
# +0.09 / +0.40 % (1.5B not run); 4-fold against the best so far (this) +0.05 / +0.04 / +0.13 %.
KEY_GAIN = 0.25
QUERY_STRIDE = 4  # every 4th query judges (all of them: 4x the time; both Qwens' perplexity within 0.01 of it)


def key_scales(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, H_kv, D] (rotated; N tokens of one sequence) -> (s [H_kv, D], the chosen a per KV
    head [H_kv]).

    Each KV head takes the a of `KEY_ALPHAS` whose int8 keys leave the smallest squared error in the causal
    attention weights of its query heads on these tokens, each a > 0 only if it is under `KEY_GAIN` of the best
    error before it (a = 0, no scaling, comes first: most heads keep it)."""
    N, hkv, D = k.shape
    kf = k.float().transpose(0, 1)  # [H_kv, N, D]
    rows = torch.arange(min(N - 1, QUERY_STRIDE - 1), N, QUERY_STRIDE, device=k.device)  # the judging queries
    qf = q[rows].float().transpose(0, 1).reshape(hkv, -1, D)  # [H_kv, G * n, D]: the query heads of a K/V head
    pair = torch.hypot(kf[..., :D // 2], kf[..., D // 2:]).amax(1)  # [H_kv, D/2], the same after any rotation
    pair = pair.clamp_min(pair.amax(-1, keepdim=True).clamp_min(1e-6) * 1e-3)  # a channel never seen stays finite
    hidden = ~causal_mask(N, N, k.device)[rows].repeat(q.shape[1] // hkv, 1)  # [G * n, N]

    def weights(keys: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.matmul(qf, keys.transpose(-1, -2)).masked_fill_(hidden, float("-inf")) * scale,
                             dim=-1)

    exact = weights(kf)
    dev = kf.device
    best, best_err, best_a = (torch.ones(hkv, D, device=dev), torch.full((hkv,), float("inf"), device=dev),
                              torch.zeros(hkv, device=dev))
    for a in KEY_ALPHAS:
        s = pair ** a
        s = torch.cat([s, s], -1) / s.log().mean(-1, keepdim=True).exp()  # geometric mean 1: magnitudes kept
        s = s.unsqueeze(1)
        k_int8 = dequantize_kv(*quantize_kv(kf / s), torch.float32) * s
        err = (weights(k_int8) - exact).square().sum((1, 2))
        better = err < best_err * (KEY_GAIN if a else 1)  # a stronger scaling must beat the best so far 4-fold
        best[better], best_err[better], best_a[better] = s[better, 0], err[better], a
    return best, best_a


def _gather(cache: torch.Tensor, blocks: torch.Tensor, rows: int, scales: torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """cache [num_blocks, H_kv, block_size, D], blocks [rows * n] -> [rows, H_kv, n * block_size, D] (a copy, in
    `dtype` when the pool is int8)."""
    _, hkv, bs, d = cache.shape
    g = _read_blocks(cache, scales, blocks, dtype).view(rows, -1, hkv, bs, d)
    return g.transpose(1, 2).reshape(rows, hkv, -1, d)


def _select_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] through a 2-D view: index_select copies whole rows then (about twice as fast on CPU)."""
    return cache.view(cache.shape[0], -1).index_select(0, blocks).view(-1, *cache.shape[1:])


def _read_blocks(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor,
                 dtype: torch.dtype | None) -> torch.Tensor:
    """cache[blocks], dequantized to `dtype` when the pool is int8 (`scales` given)."""
    picked = _select_blocks(cache, blocks)
    return picked if scales is None else dequantize_kv(picked, _select_blocks(scales, blocks), dtype)


def _blockwise_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                      mask: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row against its blocks, without assembling contiguous K/V: q [B, H, D] -> [B, H, D].

    Gathered blocks [B, n, H_kv, bs, D] are already a batch of [bs, D] matrices, so QK^T and PV run as batched
    GEMMs per block straight on them (only the small score tensor is reshaped for the softmax over all n * bs
    keys); the query heads sharing a K/V head are stacked, so GQA needs no repeated K/V either. An int8 pool's
    blocks are dequantized as they are gathered."""
    B, H, D = q.shape
    _, hkv, bs, _ = k_cache.shape
    g = H // hkv
    kb = _read_blocks(k_cache, k_scale, blocks, q.dtype).view(B, -1, hkv, bs, D)
    vb = _read_blocks(v_cache, v_scale, blocks, q.dtype).view(B, -1, hkv, bs, D)
    n = kb.shape[1]
    scores = torch.matmul(q.view(B, 1, hkv, g, D), kb.transpose(-1, -2))  # [B, n, H_kv, G, bs]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(B, hkv, g, n * bs) * scale
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, n * bs]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = probs.view(B, hkv, g, n, bs).permute(0, 3, 1, 2, 4)  # [B, n, H_kv, G, bs]
    return torch.matmul(probs, vb).sum(1).reshape(B, H, D)


def paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                         v_cache: torch.Tensor | None, slot_mapping: torch.Tensor | None, layout: "_Layout",
                         scale: float, fused: bool, native: bool = False, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, H, D], k, v [N, H_kv, D] (this step's tokens) -> [N, H, D]; writes k, v into the pool first.

    The pool is [num_blocks, H_kv, block_size, D] per layer. Decodes are batched: with `native`, our kernel reads
    the blocks in place in one pass (`infer_recipes.kernels`; k and v are then in the pool already, written by
    the rotary kernel); fused, block by block (`_blockwise_decode`);
    unfused (the textbook baseline), by gathering contiguous K/V and `eager_attention`.
    Each prefill chunk attends causally (bottom-right aligned) over its context: straight from this step's k, v
    when it is the whole context (a first chunk, or no cache), else gathered from its blocks.

    An int8 pool (`k_scale`, `v_scale` given: see `quantize_kv`) stores each token quantized, and every attention
    reads what the pool holds, this step's own tokens included: a prompt attends to the same numbers whether it
    was prefilled at once, in chunks, or from cached prefix blocks.
    """
    attend = fused_attention if fused else eager_attention
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the native kernel writes rows of it
    int8 = k_scale is not None
    whole = any(ctx == q_len for _, q_len, ctx in layout.prefills)  # prefills attending to this step's k, v
    if int8 and (whole or not native):  # quantized once: the pool write and what a whole prefill attends to
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    if k_cache is not None and not native:
        bs = k_cache.shape[2]
        block, offset = slot_mapping // bs, slot_mapping % bs
        if int8:
            k_cache[block, :, offset], k_scale[block, :, offset] = kq, ks
            v_cache[block, :, offset], v_scale[block, :, offset] = vq, vs
        else:
            k_cache[block, :, offset] = k
            v_cache[block, :, offset] = v
    if int8 and whole:  # they attend to what the pool holds
        k, v = dequantize_kv(kq, ks, q.dtype), dequantize_kv(vq, vs, q.dtype)
    nd = layout.num_decodes
    if nd:
        if native and k_cache is not None:
            kernels.native().decode_attention(q[:nd], k_cache, v_cache, layout.decode_blocks, layout.decode_lens,
                                              scale, out[:nd], k_scale, v_scale)
        elif fused:
            out[:nd] = _blockwise_decode(q[:nd], k_cache, v_cache, layout.decode_blocks, layout.decode_mask, scale,
                                         k_scale, v_scale)
        else:
            kd = _gather(k_cache, layout.decode_blocks, nd, k_scale, q.dtype)
            vd = _gather(v_cache, layout.decode_blocks, nd, v_scale, q.dtype)
            out[:nd] = attend(q[:nd].unsqueeze(2), kd, vd, layout.decode_mask, scale).squeeze(2)
    for i, (start, q_len, ctx) in enumerate(layout.prefills):
        qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        if ctx == q_len:
            ki = k[start:start + q_len].transpose(0, 1).unsqueeze(0)
            vi = v[start:start + q_len].transpose(0, 1).unsqueeze(0)
        else:
            blocks = layout.prefill_blocks[i]
            ki = _gather(k_cache, blocks, 1, k_scale, q.dtype)[:, :, :ctx]
            vi = _gather(v_cache, blocks, 1, v_scale, q.dtype)[:, :, :ctx]
        out[start:start + q_len] = attend(qi, ki, vi, None, scale)[0].transpose(0, 1)
    return out


@torch.library.custom_op("infer_recipes::paged_attention", mutates_args=("k_cache", "v_cache"))
def _paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: torch.Tensor,
                        block_size: int, scale: float, fused: bool, native: bool) -> torch.Tensor:
    return paged_attention_impl(q, k, v, k_cache, v_cache, slot_mapping, _Layout.unpack(layout, block_size), scale,
                                fused, native)


@_paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, layout, block_size, scale, fused, native):
    return torch.empty_like(q)


@torch.library.custom_op("infer_recipes::paged_attention_int8", mutates_args=("k_cache", "v_cache", "k_scale",
                                                                               "v_scale"))
def _paged_attention_int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                             slot_mapping: torch.Tensor, layout: torch.Tensor, block_size: int, scale: float,
                             fused: bool) -> torch.Tensor:
    return paged_attention_impl(q, k, v, k_cache, v_cache, slot_mapping, _Layout.unpack(layout, block_size), scale,
                                fused, False, k_scale, v_scale)


@_paged_attention_int8_op.register_fake
def _(q, k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, layout, block_size, scale, fused):
    return torch.empty_like(q)


@torch.library.custom_op("infer_recipes::uncached_attention", mutates_args=())
def _uncached_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int,
                         scale: float, fused: bool) -> torch.Tensor:
    """Without a KV cache (the "original" behaviour): each sequence attends over its own tokens of this step."""
    return paged_attention_impl(q, k, v, None, None, None, _Layout.unpack(layout, block_size), scale, fused)


@_uncached_attention_op.register_fake
def _(q, k, v, layout, block_size, scale, fused):
    return torch.empty_like(q)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, ...] | None,
                    meta: PagedMetadata, scale: float, fused: bool, native: bool = False) -> torch.Tensor:
    """Attention for a continuous-batching step (see `paged_attention_impl`). kv: this layer's (keys, values)
    pool, or (keys, values, key scales, value scales) for an int8 pool.

    Inside a compiled graph it is one opaque custom op (as vLLM splits attention out of its graphs): the graph
    then depends only on the number of tokens, never on how they split into sequences. Eagerly the layout is
    unpacked once per step and shared by all layers."""
    k_cache, v_cache, *scales = kv if kv is not None else (None, None)
    k_scale, v_scale = scales if scales else (None, None)
    if kv is None and meta.int8_kv:  # what a model with an int8 pool computes, scored without the pool
        k, v = dequantize_kv(*quantize_kv(k), q.dtype), dequantize_kv(*quantize_kv(v), q.dtype)
    if torch.compiler.is_compiling():
        if k_cache is None:
            return _uncached_attention_op(q, k, v, meta.layout, meta.block_size, scale, fused)
        if k_scale is not None:
            return _paged_attention_int8_op(q, k, v, k_cache, v_cache, k_scale, v_scale, meta.slot_mapping,
                                            meta.layout, meta.block_size, scale, fused)
        return _paged_attention_op(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.layout, meta.block_size,
                                   scale, fused, native)
    return paged_attention_impl(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.parts, scale, fused, native,
                                k_scale, v_scale)
