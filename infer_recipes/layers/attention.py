"""Attention over a preallocated KV cache, and the metadata that describes one step.

The model never decides where keys go: the runner passes `AttentionMetadata` saying which cache columns this
step writes and which keys each query may see.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """What one forward step needs to know about the sequence layout.

    cache_positions: [T] cache columns the step's T tokens are written to (shared by every row of the batch);
        None means no KV cache: attend over this step's keys only.
    kv_len: how many leading cache columns hold keys after the write; None means every column of the cache (the
        mask then says which hold real keys): the shape-stable form a compiled graph needs.
    mask: [B, 1, T, kv_len] bool, True where a query may attend; None means causal, bottom-right aligned
        (query t sees keys up to kv_len - T + t), which is right whenever no row is padded.
    """

    cache_positions: torch.Tensor | None
    kv_len: int | None
    mask: torch.Tensor | None = None


class KVCache:
    """Per-layer key and value tensors [B, H_kv, S, D], allocated once for a batch."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (keys, values): what that layer is handed, so every layer runs the same code."""
        return self.keys[i], self.values[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def write_kv(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes k, v [B, H_kv, T, D] into one layer's cache at meta.cache_positions; returns the first kv_len
    columns (every column if kv_len is None)."""
    kc, vc = cache
    kc.index_copy_(2, meta.cache_positions, k)
    vc.index_copy_(2, meta.cache_positions, v)
    if meta.kv_len is None:
        return kc, vc
    return kc[:, :, : meta.kv_len], vc[:, :, : meta.kv_len]


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
