"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    tokens: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token under the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (already divided by temperature) with everything outside top-k / top-p / min-p set to -inf."""
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p; the most likely token always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> SampleResult:
    """logits [B, V] float32 -> one token per row. One host synchronization: the final `.tolist()`."""
    if all(p.greedy for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        rows = []
        for i, p in enumerate(params):
            if p.greedy:
                rows.append(logits[i].argmax())
                continue
            probs = torch.softmax(_filter(logits[i] / p.temperature, p), dim=-1)
            # exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with a per-request generator
            noise = torch.empty_like(probs).exponential_(generator=generators[i])
            rows.append((probs / noise).argmax())
        tokens = torch.stack(rows)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if not want:
        return SampleResult(tokens.tolist(), None, None)
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    k = max(want)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    top = [[(int(t), float(v)) for t, v in zip(ids[: p.logprobs or 0], vals[: p.logprobs or 0])]
           for ids, vals, p in zip(top_ids.tolist(), top_vals.tolist(), params)]
    return SampleResult(tokens.tolist(), chosen.tolist(), top)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
