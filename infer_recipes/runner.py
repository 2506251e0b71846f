"""Turning a batch of token lists into tensors, running the model on them, and keeping the KV cache.

A batch is left-padded: every row's newest token sits in the same cache column, so one decode step writes one
column for all rows. Pad columns are masked out of attention, and positions count real tokens only, so a padded
row computes exactly what it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers.attention import AttentionMetadata, KVCache
from .models.llama import LlamaForCausalLM


@dataclass
class BatchState:
    """A static batch in flight: its KV cache, which columns hold real keys, and each row's length."""

    cache: KVCache | None  # None when the KV cache is switched off
    tokens: torch.Tensor  # [B, S] every token so far (what a cache-less step recomputes)
    positions: torch.Tensor  # [B, S]
    key_valid: torch.Tensor  # [B, S] bool: column holds a real (non-pad) token
    lengths: torch.Tensor  # [B] tokens so far (prompt + generated)
    column: int  # next cache column to write
    padded: bool  # any row shorter than the longest prompt


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, kv_cache: bool = True):
        self.model, self.device, self.dtype, self.kv_cache = model, device, dtype, kv_cache
        self.config = model.config

    def _meta(self, state: BatchState, start: int, q_len: int) -> AttentionMetadata:
        end = start + q_len
        cache_positions = torch.arange(start, end, device=self.device)
        if not state.padded:
            return AttentionMetadata(cache_positions, end, None)
        causal = torch.ones(q_len, end, dtype=torch.bool, device=self.device).tril(diagonal=start)  # [T, S]
        mask = causal.unsqueeze(0) & state.key_valid[:, None, :end]  # [B, T, S]
        # a pad query sees only itself: its output is discarded, but an all-masked row would give NaN
        mask[:, torch.arange(q_len), cache_positions] |= ~state.key_valid[:, start:end]
        return AttentionMetadata(cache_positions, end, mask.unsqueeze(1))  # [B, 1, T, S]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[BatchState, torch.Tensor]:
        """Left-pads the prompts, fills a fresh KV cache; returns the state and last-position logits [B, V]."""
        B, P = len(prompts), max(len(p) for p in prompts)
        S, cfg = P + max_new_tokens, self.config
        cache = (KVCache(cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim, self.dtype, self.device)
                 if self.kv_cache else None)
        tokens = torch.zeros(B, S, dtype=torch.long)
        key_valid = torch.zeros(B, S, dtype=torch.bool)
        positions = torch.zeros(B, S, dtype=torch.long)
        for i, p in enumerate(prompts):
            pad = P - len(p)
            tokens[i, pad:P] = torch.tensor(p, dtype=torch.long)
            positions[i, pad:P] = torch.arange(len(p))
            key_valid[i, pad:P] = True
        key_valid[:, P:] = True
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        state = BatchState(cache, tokens.to(self.device), positions.to(self.device), key_valid.to(self.device),
                           lengths.to(self.device), 0, any(len(p) != P for p in prompts))
        meta = self._meta(state, 0, P)
        hidden = self.model(state.tokens[:, :P], state.positions[:, :P], meta, cache)
        state.column = P
        return state, self.model.compute_logits(hidden[:, -1])

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: list[int]) -> torch.Tensor:
        """One new token per row -> next-token logits [B, V]."""
        c = state.column
        state.tokens[:, c] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        state.positions[:, c] = state.lengths
        if state.cache is not None:
            meta = self._meta(state, c, 1)
            hidden = self.model(state.tokens[:, c:c + 1], state.positions[:, c:c + 1], meta, state.cache)
        else:  # no cache: run the whole sequence again, as the unoptimized original does
            meta = self._meta(state, 0, c + 1)
            hidden = self.model(state.tokens[:, :c + 1], state.positions[:, :c + 1], meta, None)
        state.column = c + 1
        state.lengths += 1
        return self.model.compute_logits(hidden[:, -1])

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of one sequence (for evaluation and tests)."""
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device).unsqueeze(0)
        meta = AttentionMetadata(None, len(token_ids), None)
        return self.model.compute_logits(self.model(tokens, positions, meta, None))[0]
