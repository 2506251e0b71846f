"""Rotary position embeddings (the half-rotation convention of Hugging Face Llama) with a cached cos/sin table.

Llama 3.1+ `rope_scaling` of type `llama3` rescales the low frequencies; SmolLM2, Llama 2 and Qwen2 use plain RoPE.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    if kind == "freq_factors":  # GGUF stores Llama 3 scaling as one divisor per frequency (`rope_freqs`)
        return inv_freq / torch.tensor(rope_scaling["factors"], dtype=torch.float32, device="cpu")
    if kind != "llama3":
        return inv_freq
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are divided by `factor`; short ones kept; the band between is blended
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to `max_positions`; looks rows up by position id."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None = None):
        super().__init__()
        # built on the CPU in float32 even when the model is built on the meta device; the loader moves it
        inv_freq = inverse_frequencies(head_dim, theta, rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, 1, D] in `dtype`, ready to broadcast over heads."""
        cos = self.cos_cached[positions].unsqueeze(1).to(dtype)
        sin = self.sin_cached[positions].unsqueeze(1).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos, sin [N, 1, D]."""
    return x * cos + rotate_half(x) * sin
