"""One Llama-family model: Llama 2, Llama 3/3.1/3.2, SmolLM2 (tied embeddings), Qwen2 (q/k/v biases).

Parameter names follow Hugging Face's `LlamaForCausalLM`, so a safetensors checkpoint loads without renaming.
The model only computes: it is handed token ids, positions, the step's `PagedMetadata` and the KV pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers.activation import silu_and_mul
from ..layers.attention import PagedMetadata, paged_attention
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def fuse(self) -> None:
        """One GEMM for q, k and v instead of three; attention through the fused kernels."""
        self.qkv_proj = _merged_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: PagedMetadata,
                kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x [1, N, hidden]: the step's tokens of every sequence end to end; cos, sin [N, 1, D]."""
        N = x.shape[1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rotary(q.view(N, H, D), cos, sin)
        k = apply_rotary(k.view(N, Hkv, D), cos, sin)
        out = paged_attention(q, k, v.view(N, Hkv, D), kv, meta, self.scale, fused=hasattr(self, "qkv_proj"))
        return self.o_proj(out.view(1, N, H * D))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def fuse(self) -> None:
        self.gate_up_proj = _merged_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fused = False
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def fuse(self) -> None:
        """Operator fusion: merged QKV and gate-up GEMMs, add+RMSNorm, fused attention kernels."""
        self.self_attn.fuse()
        self.mlp.fuse()
        self.fused = True

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: PagedMetadata, kv: tuple[torch.Tensor, torch.Tensor] | None):
        """One block -> (h, residual); the block's output is h + residual (residual None: h is the output).

        Textbook (unfused): x + attn(norm(x)), then + mlp(norm(.)). Fused: each residual add folded into the next
        norm, so the sum is left for the next layer's norm to make."""
        if not self.fused:
            x = h if residual is None else h + residual
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.forward_with_residual(h, residual)
        h = self.self_attn(h, cos, sin, meta, kv)
        h, residual = self.post_attention_layernorm.forward_with_residual(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the cos/sin table covers the positions the engine will use, not necessarily the whole 128k context
        self.rotary = RotaryEmbedding(config.head_dim, max_positions or config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)
        self.tie_weights()

    def tie_weights(self) -> None:
        """A tied lm_head uses the embedding table (once quantized, each holds its own form, or shares it)."""
        if self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear \
                and type(self.model.embed_tokens) is nn.Embedding:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: PagedMetadata,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """tokens, positions [1, N] (every sequence's tokens of this step end to end) -> final hidden states
        [1, N, hidden]. kv_cache: each layer's (keys, values) pool, or None."""
        h, residual = self.model.embed_tokens(tokens), None
        cos, sin = self.rotary(positions[0], h.dtype)
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, cos, sin, meta, kv_cache[i] if kv_cache is not None else None)
        if residual is None:
            return self.model.norm(h)
        return self.model.norm.forward_with_residual(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        return self.lm_head(hidden).float()


def _merged_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the concatenation of `parts`' outputs."""
    out = sum(p.out_features for p in parts)
    has_bias = parts[0].bias is not None
    with torch.device(parts[0].weight.device):
        merged = nn.Linear(parts[0].in_features, out, bias=has_bias, dtype=parts[0].weight.dtype)
    merged.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if has_bias:
        merged.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return merged
