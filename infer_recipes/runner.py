"""Turning a batch of token lists into tensors, running the model on them, and keeping the KV cache.

A batch is left-padded: every row's newest token sits in the same cache column, so one decode step writes one
column for all rows. Pad columns are masked out of attention, and positions count real tokens only, so a padded
row computes exactly what it would alone.

With `compile` on, every decoder layer of every step (prefill or decode) goes through one `torch.compile`d
function whose batch, query length and cache length are dynamic dimensions: any prompt length reuses the same
graph. Sizes of 1 are specialised by the compiler, so four shape classes (batch 1 or more, one query or more),
each for the first layer (no residual yet) and the others, make 8 graphs; `warm_up` compiles them all, and
`compiles` counts every compilation so a recompile cannot hide.
"""
from __future__ import annotations

import functools
import itertools
import types
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


_RUNNER_IDS = itertools.count()


class CompiledLayers:
    """Regional compilation: every decoder layer runs one `torch.compile`d function with dynamic dimensions.

    The layers share their code, so the compiled graphs are shared too: compile time is one layer's, not the whole
    model's (seconds rather than minutes for 30 layers). Embedding, final norm and lm_head stay eager: one op each.
    The backend is Inductor, wrapped to count compilations; after `ModelRunner.warm_up` a count that moves is a
    recompile. fullgraph=True makes a graph break an error instead of a silent slow path.
    """

    def __init__(self, model: LlamaForCausalLM):
        import torch._dynamo

        self.compiles = 0
        # the compiler keeps graphs per code object, and what it learnt about sizes per code name: a private,
        # uniquely named copy of the layer function gives this runner graphs of its own, so another model in the
        # process (other head counts) can neither evict them nor turn their static sizes dynamic
        name = f"run_layer_{next(_RUNNER_IDS)}"
        code = _run_layer.__code__
        names = {"co_name": name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {})}
        run_layer = types.FunctionType(code.replace(**names), _run_layer.__globals__, name)
        # 4 graph classes x (first layer, other layers): above the default limit of 8 once quantized layers differ
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(run_layer, backend=self._backend, fullgraph=True)
        for layer in model.model.layers:
            layer.forward = functools.partial(self, layer)  # the instance's forward; the class's stays eager

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)

    @staticmethod
    def _mark(t: torch.Tensor | None, dims: tuple[int, ...]) -> None:
        import torch._dynamo

        if t is None:
            return
        for dim in dims:
            # the compiler specialises sizes 0 and 1 (those get their own graph). "maybe": no range is declared,
            # since Inductor bounds some sizes for its own kernel choices (cache length <= 4096 on CPU): a step
            # beyond such a bound recompiles once, and the counter shows it
            if t.shape[dim] >= 2:
                torch._dynamo.maybe_mark_dynamic(t, dim)

    def __call__(self, layer, h, residual, cos, sin, meta: AttentionMetadata, kv):
        for t in (h, residual):
            self._mark(t, (0, 1))  # batch, query length
        for t in (cos, sin):
            self._mark(t, (0, 2))
        self._mark(meta.mask, (0, 2, 3))  # batch, query length, key length
        self._mark(meta.cache_positions, (0,))
        for t in kv or ():
            self._mark(t, (0, 2))  # batch, cache length
        return self._compiled(layer, h, residual, cos, sin, meta, kv)


def _run_layer(layer, h, residual, cos, sin, meta, kv):
    return type(layer).forward(layer, h, residual, cos, sin, meta, kv)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, kv_cache: bool = True,
                 compile: bool = False):
        self.model, self.device, self.dtype, self.kv_cache = model, device, dtype, kv_cache
        self.config = model.config
        self.compiled = CompiledLayers(model) if compile else None

    @property
    def compiles(self) -> int:
        """How many graphs torch.compile has built for this runner (0 when compile is off)."""
        return self.compiled.compiles if self.compiled else 0

    def _meta(self, state: BatchState, start: int, q_len: int) -> AttentionMetadata:
        end = start + q_len
        cache_positions = torch.arange(start, end, device=self.device)
        if self.compiled is not None:
            # one shape-stable form for every step: attend over the whole cache (or, without a cache, the whole
            # recomputed sequence) with an explicit mask, so no step length becomes a constant in the graph
            columns = state.cache.max_len if state.cache is not None else end
            return AttentionMetadata(cache_positions, None, self._mask(state, start, q_len, columns))
        if not state.padded:
            return AttentionMetadata(cache_positions, end, None)
        return AttentionMetadata(cache_positions, end, self._mask(state, start, q_len, end))

    def _mask(self, state: BatchState, start: int, q_len: int, columns: int) -> torch.Tensor:
        """[B, 1, T, columns] bool: causal, pad keys hidden."""
        causal = torch.ones(q_len, columns, dtype=torch.bool, device=self.device).tril(diagonal=start)  # [T, S]
        mask = causal.unsqueeze(0) & state.key_valid[:, None, :columns]  # [B, T, S]
        # a pad query sees only itself: its output is discarded, but an all-masked row would give NaN
        mask[:, torch.arange(q_len), torch.arange(start, start + q_len)] |= ~state.key_valid[:, start:start + q_len]
        return mask.unsqueeze(1)

    def _forward(self, tokens, positions, meta, cache) -> torch.Tensor:
        """Last-position logits [B, V] of one step."""
        return self.model.compute_logits(self.model(tokens, positions, meta, cache)[:, -1])

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Compiles every graph class once (batch 1 and more, one query and more); returns the compile count."""
        if self.compiled is None:
            return 0
        # distinct sizes everywhere: the compiler assumes dimensions of equal size are the same symbol
        for batch in ([3], [3, 5]):
            prompts = [[1] * n for n in batch]
            state, _ = self.prefill(prompts, 4)
            self.decode(state, [1] * len(prompts))
        return self.compiles

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
        logits = self._forward(state.tokens[:, :P], state.positions[:, :P], self._meta(state, 0, P), cache)
        state.column = P
        return state, logits

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: list[int]) -> torch.Tensor:
        """One new token per row -> next-token logits [B, V]."""
        c = state.column
        state.tokens[:, c] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        state.positions[:, c] = state.lengths
        if state.cache is not None:
            logits = self._forward(state.tokens[:, c:c + 1], state.positions[:, c:c + 1], self._meta(state, c, 1),
                                   state.cache)
        else:  # no cache: run the whole sequence again, as the unoptimized original does
            logits = self._forward(state.tokens[:, :c + 1], state.positions[:, :c + 1], self._meta(state, 0, c + 1),
                                   None)
        state.column = c + 1
        state.lengths += 1
        return logits

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of one sequence (for evaluation and tests)."""
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device).unsqueeze(0)
        meta = AttentionMetadata(None, len(token_ids), None)
        return self.model.compute_logits(self.model(tokens, positions, meta, None))[0]
