"""Sliding-window perplexity over a text file, and top-1 / KL agreement against a reference model.

Windows of `window` tokens advance by `stride`; each window scores only the tokens the previous one did not,
so every token after the first is scored once with at least `window - stride` tokens of context.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import InferRecipesError


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise InferRecipesError(f"data file {path} not found: pass a plain-text file (e.g. wiki.valid.tokens)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InferRecipesError(f"{path} is not UTF-8 text ({e}): pass a plain-text file") from e
    if not text.strip():
        raise InferRecipesError(f"{path} is empty")
    return text


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored position) for each window over n_tokens."""
    if stride < 1 or stride >= window:
        raise InferRecipesError(f"stride must be in [1, window={window}) so windows overlap by a token, got {stride}")
    start, scored_to = 0, 1  # position 0 has nothing to predict it
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        yield start, end, scored_to
        scored_to = end
        start = max(0, end - (window - stride))


def token_ids(llm, path: str, max_tokens: int | None) -> list[int]:
    ids = llm.tokenizer.encode(read_text(path))
    return ids[:max_tokens] if max_tokens else ids


def scored(llm, ids: list[int], window: int, stride: int, progress: bool = True,
           desc: str = "perplexity") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [n, V], targets [n]) for each window's newly scored tokens, in order: every token after the first
    exactly once. `window` and `stride` are already fitted to the model's context."""
    spans = list(windows(len(ids), window, stride))
    for start, end, first in tqdm(spans, desc=desc, unit="window", disable=not progress, file=sys.stderr):
        logits = llm.logits(ids[start:end])  # [T, V]
        yield logits[first - start - 1:end - start - 1], torch.tensor(ids[first:end])


def fitted(llm, window: int, stride: int) -> tuple[int, int]:
    """The window and stride a model's context allows."""
    window = min(window, llm.max_model_len)
    return window, min(stride, window - 1)


def perplexity(llm, path: str, max_tokens: int | None = None, window: int = 1024, stride: int = 512,
               progress: bool = True) -> dict:
    ids = token_ids(llm, path, max_tokens)
    window, stride = fitted(llm, window, stride)
    nll, count, start_time = 0.0, 0, time.perf_counter()
    for preds, targets in scored(llm, ids, window, stride, progress):
        nll += F.cross_entropy(preds, targets, reduction="sum").item()
        count += len(targets)
    return {"perplexity": math.exp(nll / count), "tokens": count, "seconds": time.perf_counter() - start_time,
            "window": window, "stride": stride, "data": path}


def agreement(llm, reference, path: str, max_tokens: int | None = 2048, window: int = 512,
              progress: bool = True) -> dict:
    """Top-1 agreement and mean KL(reference || llm) of next-token distributions, position by position."""
    ids = token_ids(reference, path, max_tokens)
    agree, kl, count, start_time = 0, 0.0, 0, time.perf_counter()
    window = min(window, llm.max_model_len)
    starts = range(0, len(ids), window)  # disjoint chunks: every position's distribution compared once
    for start in tqdm(starts, desc="agreement", unit="window", disable=not progress, file=sys.stderr):
        ours = llm.logits(ids[start:start + window])
        ref = reference.logits(ids[start:start + window])
        agree += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        kl += F.kl_div(F.log_softmax(ours, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum").item()
        count += ours.shape[0]
    return {"top1_agreement": agree / count, "mean_kl": kl / count, "tokens": count,
            "seconds": time.perf_counter() - start_time, "data": path}
