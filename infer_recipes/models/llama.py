"""One Llama-family model: Llama 2, Llama 3/3.1/3.2, SmolLM2 (tied embeddings), Qwen2 (q/k/v biases).

Parameter names follow Hugging Face's `LlamaForCausalLM`, so a safetensors checkpoint loads without renaming.
The model only computes: it is handed token ids, positions, the step's `PagedMetadata` and the KV pool.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..layers.activation import silu_and_mul
from ..layers.attention import PagedMetadata, paged_attention
from ..layers.norm import RMSNorm
from ..layers.parallel import Shard
from ..layers.rotary import RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    """q/k/v column-parallel (this rank's heads), o_proj row-parallel: one all-reduce per block."""

    native = False  # rotary, the K/V write and decode attention on our own kernels (`use_native_kernels`)
    qk_scale: torch.Tensor | None = None  # [(H + H_kv) * D]: queries' channels times s, keys' over s (`scale_keys`)
    observe = None  # called with each forward's rotated (q, k) when set (the runner's key calibration)

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        kv_first, kv_end = shard.kv_heads(config.num_kv_heads)
        self.num_heads, self.num_kv_heads = config.num_heads // shard.tp_size, kv_end - kv_first
        self.head_dim = config.head_dim
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

    def scale_keys(self, s: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Key channel c divided by s[h, c] and the queries of KV head h multiplied by it (s [H_kv, D], equal on
        the channels RoPE pairs): every score is unchanged, while the keys an int8 pool stores lose the few
        outlier channels that would take its scale (`layers.attention.key_scales`). None or all ones: unscaled
        (no multiply at all)."""
        if s is None or bool((s == 1).all()):
            self.qk_scale = None
            return
        q_part = s.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0)  # query head i reads KV head i // G
        self.qk_scale = torch.cat([q_part.flatten(), s.reciprocal().flatten()]).to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: PagedMetadata,
                kv: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """x [1, N, hidden]: the step's tokens of every sequence end to end; cos, sin [N, 1, D]."""
        N = x.shape[1]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.native and kv is not None:  # fused, with a KV cache: rotary and the cache write in one call
            qkv = self.qkv_proj(x).view(N, (H + 2 * Hkv) * D)
            if self.qk_scale is not None:  # before RoPE: the scaling commutes with it
                qkv[:, :(H + Hkv) * D] *= self.qk_scale
            kernels.native().rope_cache(qkv, cos.reshape(N, D), sin.reshape(N, D), H, Hkv, *kv[:2],
                                        meta.slot_mapping, *kv[2:])
            q, k, v = (t.view(N, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
            out = paged_attention(q, k, v, kv, meta, self.scale, fused=True, native=True)
            return self.shard.all_reduce(self.o_proj(out.view(1, N, H * D)))
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_scale is not None:
            q, k = q * self.qk_scale[:H * D], k * self.qk_scale[H * D:]
        q = apply_rotary(q.view(N, H, D), cos, sin)
        k = apply_rotary(k.view(N, Hkv, D), cos, sin)
        if self.observe is not None:
            self.observe(q, k)
        out = paged_attention(q, k, v.view(N, Hkv, D), kv, meta, self.scale, fused=hasattr(self, "qkv_proj"))
        return self.shard.all_reduce(self.o_proj(out.view(1, N, H * D)))


class LlamaMLP(nn.Module):
    """gate/up column-parallel, down row-parallel: one all-reduce."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        h, i = config.hidden_size, config.intermediate_size // shard.tp_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def fuse(self) -> None:
        self.gate_up_proj = _merged_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    native = False  # silu-and-mul on our own kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return self.shard.all_reduce(self.down_proj(kernels.native().silu_mul(self.gate_up_proj(x))))
        if hasattr(self, "gate_up_proj"):
            return self.shard.all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))
        return self.shard.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    # with every part on our kernels: (the four linears' tensors, their kinds, the most rows of a step they take) for
    # a decode step in one call of `decode_layer` (`plan_native_step`)
    native_step: tuple[list[torch.Tensor], list[int], float] | None = None

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.fused = False
        self.self_attn = LlamaAttention(config, shard)
        self.mlp = LlamaMLP(config, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def fuse(self) -> None:
        """Operator fusion: merged QKV and gate-up GEMMs, add+RMSNorm, fused attention kernels."""
        self.self_attn.fuse()
        self.mlp.fuse()
        self.fused = True

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: PagedMetadata, kv: tuple[torch.Tensor, ...] | None):
        """One block -> (h, residual); the block's output is h + residual (residual None: h is the output).

        Textbook (unfused): x + attn(norm(x)), then + mlp(norm(.)). Fused: each residual add folded into the next
        norm, so the sum is left for the next layer's norm to make."""
        if self.native_step is not None and kv is not None and h.shape[1] <= self.native_step[2] \
                and not meta.parts.prefills and self._unobserved():
            return self._native_decode(h, residual, cos, sin, meta, kv)
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

    def plan_native_step(self, on: bool) -> None:
        """Whether decode steps run the whole layer in one call of our kernels (`decode_layer`): the same kernels
        in the same order as `forward` runs them (the same numbers), without ~10 Python calls and dispatches
        between them; only when every part runs on them and nothing is split over ranks."""
        attn, mlp = self.self_attn, self.mlp
        self.native_step = None
        if not (on and attn.native and mlp.native and self.input_layernorm.native and attn.shard.tp_size == 1):
            return
        forms = [_native_form(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if all(forms):
            self.native_step = ([t for f in forms for t in f[0]], [x for f in forms for x in f[1]],
                                min(f[2] for f in forms))

    def _unobserved(self) -> bool:
        """No one watches the parts' calls: no key calibration, no hooks on the linears."""
        parts = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return self.self_attn.observe is None and not any(m._forward_hooks or m._forward_pre_hooks for m in parts)

    def _native_decode(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                       meta: PagedMetadata, kv: tuple[torch.Tensor, ...]):
        attn, (_, N, hidden) = self.self_attn, h.shape
        layout, D = meta.parts, attn.head_dim
        k_scale, v_scale = kv[2:] if len(kv) > 2 else (None, None)
        out, residual = kernels.native().decode_layer(
            h.reshape(N, hidden), None if residual is None else residual.reshape(N, hidden), cos.reshape(N, D),
            sin.reshape(N, D), self.input_layernorm.weight32, self.post_attention_layernorm.weight32,
            self.input_layernorm.eps, *self.native_step[:2], attn.qk_scale, attn.num_heads, attn.num_kv_heads,
            kv[0], kv[1], meta.slot_mapping, k_scale, v_scale, layout.decode_blocks, layout.decode_lens, attn.scale)
        return out.view(1, N, hidden), residual.view(1, N, hidden)


def _native_form(linear: nn.Module) -> tuple[list[torch.Tensor], list[int], float] | None:
    """What `decode_layer` takes for one linear (see `QuantizedLinear.native_form`); a dense one runs as
    `F.linear` does."""
    if type(linear) is nn.Linear:
        bias = linear.bias if linear.bias is not None else linear.weight.new_empty(0)
        return [linear.weight, linear.weight.new_empty(0), bias], [0, 0, linear.out_features], math.inf
    form = getattr(linear, "native_form", None)
    return form() if form is not None else None


class Absent(nn.Module):
    """The place of a decoder layer another pipeline stage holds (layer indices, and so parameter names, stay
    the checkpoint's)."""


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        vocab = shard.vocab(config.vocab_size)
        if shard.first_stage or (shard.last_stage and config.tie_word_embeddings):  # a tied lm_head needs it
            # no random initialisation: a loader fills every weight (and normal_ on the meta device would import
            # torch._dynamo, 1.5 s of a cold start)
            rows = vocab[1] - vocab[0]
            self.embed_tokens = nn.Embedding(rows, config.hidden_size, _weight=torch.empty(rows, config.hidden_size))
        local = shard.layer_range(config.num_layers)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, shard) if i in local else Absent()
                                    for i in range(config.num_layers))
        if shard.last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole model, or what one rank holds of it (`shard`): the loader slices checkpoint tensors with
    `shard_tensor`, and forward runs this rank's part."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None, shard: Shard = Shard()):
        super().__init__()
        self.config, self.shard = config, shard
        self.layer_range = shard.layer_range(config.num_layers)
        self.vocab_range = shard.vocab(config.vocab_size)
        self.model = LlamaModel(config, shard)
        if shard.last_stage:
            self.lm_head = nn.Linear(config.hidden_size, self.vocab_range[1] - self.vocab_range[0], bias=False)
        # the cos/sin table covers the positions the engine will use, not necessarily the whole 128k context
        self.rotary = RotaryEmbedding(config.head_dim, max_positions or config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)
        self.tie_weights()

    def use_native_kernels(self, on: bool, dtype: torch.dtype) -> None:
        """The fused decoder layers' norms, rotary with the K/V write, decode attention and silu-and-mul on our
        own kernels (`infer_recipes.kernels`), or not; only for shapes the kernels take (widths multiples of 16,
        head_dim a multiple of 32 up to 256, at most 16 query heads per K/V head) in float32 or bfloat16."""
        on = on and dtype in (torch.float32, torch.bfloat16) and self.config.hidden_size % 16 == 0
        for layer in self.model.layers:
            if not isinstance(layer, LlamaDecoderLayer):
                continue
            attn, mlp, fused = layer.self_attn, layer.mlp, layer.fused
            attn.native = (on and fused and attn.head_dim % 32 == 0 and attn.head_dim <= 256
                           and attn.num_heads // max(attn.num_kv_heads, 1) <= 16)
            mlp.native = on and fused and mlp.down_proj.in_features % 16 == 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.use_native(on and fused)
            layer.plan_native_step(on)
        if hasattr(self.model, "norm"):
            self.model.norm.use_native(on)

    def tie_weights(self) -> None:
        """A tied lm_head uses the embedding table (once quantized, each holds its own form, or shares it)."""
        if self.config.tie_word_embeddings and type(getattr(self, "lm_head", None)) is nn.Linear \
                and type(getattr(self.model, "embed_tokens", None)) is nn.Embedding:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: rows of this rank's range, zeros elsewhere, summed over the ranks."""
        if self.shard.tp_size == 1:
            return self.model.embed_tokens(tokens)
        lo, hi = self.vocab_range
        inside = (tokens >= lo) & (tokens < hi)
        rows = self.model.embed_tokens(torch.where(inside, tokens - lo, 0))
        return self.shard.all_reduce(rows * inside.unsqueeze(-1).to(rows.dtype))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: PagedMetadata,
                kv_cache: list[tuple[torch.Tensor, ...]] | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions [1, N] (every sequence's tokens of this step end to end) -> final hidden states
        [1, N, hidden]. kv_cache: each of this rank's layers' (keys, values) pool, or None.

        Pipeline stages: a later stage is given the previous stage's output as `hidden` (tokens then only
        serve their shape); a stage before the last returns its layers' output, un-normalised."""
        h, residual = self.embed(tokens) if hidden is None else hidden, None
        cos, sin = self.rotary(positions[0], h.dtype)
        for j, i in enumerate(self.layer_range):
            h, residual = self.model.layers[i](h, residual, cos, sin, meta,
                                               kv_cache[j] if kv_cache is not None else None)
        if not self.shard.last_stage:
            return h if residual is None else h + residual  # what the next stage's first layer would sum
        if residual is None:
            return self.model.norm(h)
        return self.model.norm.forward_with_residual(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., vocab] (gathered over the tensor-parallel ranks)."""
        return self.shard.all_gather_last(self.lm_head(hidden).float())[..., :self.config.vocab_size]  # no padding


def _merged_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the concatenation of `parts`' outputs."""
    out = sum(p.out_features for p in parts)
    has_bias = parts[0].bias is not None
    with torch.device(parts[0].weight.device):
        merged = nn.Linear(parts[0].in_features, out, bias=has_bias, dtype=parts[0].weight.dtype)
    merged.weight = nn.Parameter(_rows_joined([p.weight.detach() for p in parts]), requires_grad=False)
    if has_bias:
        merged.bias = nn.Parameter(_rows_joined([p.bias.detach() for p in parts]), requires_grad=False)
    return merged


def _rows_joined(ts: list[torch.Tensor]) -> torch.Tensor:
    if ts[0].is_meta:  # weights kept in GGUF blocks, replaced later: only the shape counts, and cat on the meta
        # device runs through Python references that import torch._dynamo (1.5 s of a cold start)
        return torch.empty(sum(t.shape[0] for t in ts), *ts[0].shape[1:], dtype=ts[0].dtype, device="meta")
    return torch.cat(ts)


# how each checkpoint tensor splits: column-parallel (dim 0, by heads or columns), row-parallel (dim 1)
_COLUMN = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "gate_proj": "mlp", "up_proj": "mlp"}
_ROW = {"o_proj": "heads", "down_proj": "mlp"}
WHOLE = (0, 0, 0)  # shard_range's answer for a tensor every rank that holds it holds whole


def shard_range(name: str, config: ModelConfig, shard: Shard) -> tuple[int, int, int] | None:
    """How this rank slices checkpoint tensor `name`: (dim, start, end), WHOLE, or None when another pipeline
    stage holds it. Ranges are in elements (for a bias, along its only dim)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        if int(parts[2]) not in shard.layer_range(config.num_layers):
            return None
        leaf = parts[-2]
        kind = _COLUMN.get(leaf) or _ROW.get(leaf)
        if kind is None or shard.tp_size == 1:
            return WHOLE  # norms are replicated
        D = config.head_dim
        if kind == "heads":
            lo, hi = shard.split(config.num_heads)
            lo, hi = lo * D, hi * D
        elif kind == "kv_heads":
            lo, hi = shard.kv_heads(config.num_kv_heads)
            lo, hi = lo * D, hi * D
        else:
            lo, hi = shard.split(config.intermediate_size)
        return (1 if leaf in _ROW else 0), lo, hi
    if name == "model.embed_tokens.weight":
        held = shard.first_stage or (shard.last_stage and config.tie_word_embeddings)
    elif name == "lm_head.weight":
        held = shard.last_stage and not config.tie_word_embeddings
    else:  # model.norm
        return WHOLE if shard.last_stage else None
    if not held:
        return None
    return (0, *shard.vocab(config.vocab_size)) if shard.tp_size > 1 else WHOLE


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, shard: Shard) -> torch.Tensor | None:
    """This rank's slice of checkpoint tensor `name` (vocabulary rows past the end padded with zeros), or None."""
    where = shard_range(name, config, shard)
    if where is None or where == WHOLE:
        return tensor if where else None
    dim, lo, hi = where
    if dim == 0 and hi > tensor.shape[0]:  # the last vocabulary range
        pad = tensor.new_zeros((hi - tensor.shape[0], *tensor.shape[1:]))
        return torch.cat([tensor[lo:], pad]) if lo < tensor.shape[0] else pad
    return tensor.narrow(dim, lo, hi - lo).clone()
