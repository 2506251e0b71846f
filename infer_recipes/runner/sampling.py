"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, penalties, logit bias,
structured output (a grammar's mask), per-request seeds, logprobs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import SamplingParams
from .grammar import allowed


@dataclass(frozen=True)
class SampleRequest:
    """What sampling needs of one sequence: its params, its own generator (seeded requests) and the tokens it
    generated so far (for penalties)."""

    params: SamplingParams
    generator: torch.Generator | None
    output_ids: Sequence[int]
    matcher: object = None  # structured output: the request's grammar state (runner/grammar.py)


@dataclass(frozen=True)
class Sampled:
    """The next token of one sequence, with its log-probability and top alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


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


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """logits [B, V] with each row's presence / frequency penalties (over the tokens that row generated so far)
    and logit bias applied, as OpenAI defines them; a new tensor when any row has one, else `logits` itself."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        p = params[i]
        if (p.presence_penalty or p.frequency_penalty) and outputs[i]:
            ids, counts = torch.tensor(outputs[i], device=logits.device).unique(return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
        bias = [(t, b) for t, b in p.logit_bias if t < vocab]  # ids past the vocabulary are refused earlier
        if bias:
            ids = torch.tensor([t for t, _ in bias], device=logits.device)
            logits[i, ids] += torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits


def apply_constraints(logits: torch.Tensor, matchers: Sequence[object]) -> torch.Tensor:
    """logits [B, V] with the tokens each row's grammar forbids set to -inf (a new tensor when any row has one)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        logits[i].masked_fill_(~allowed(matchers[i], logits.shape[-1], logits.device), float("-inf"))
    return logits


def _probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (non-greedy) row draws from: temperature, then top-k / min-p / top-p."""
    return torch.softmax(_filter(row / p.temperature, p), dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token drawn from `probs` (a 0-d tensor): the exponential race, argmax(p / E) with E ~ Exp(1), with the
    request's own generator."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           outputs: Sequence[Sequence[int]] | None = None, matchers: Sequence[object] | None = None) -> SampleResult:
    """logits [B, V] float32 -> one token per row. outputs: each row's generated tokens so far (for penalties);
    matchers: each row's grammar state (structured output) or None.

    One host synchronization: the final `.tolist()` (tokens, with the logprobs packed beside them when asked)."""
    processed = apply_penalties(logits, params, outputs or [()] * len(params))
    if matchers is not None:
        processed = apply_constraints(processed, matchers)
    if all(p.greedy for p in params):
        tokens = processed.argmax(dim=-1)
    else:
        rows = [processed[i].argmax() if p.greedy else _draw(_probs(processed[i], p), generators[i])
                for i, p in enumerate(params)]
        tokens = torch.stack(rows)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if not want:
        return SampleResult(tokens.tolist(), None, None)
    logp = torch.log_softmax(logits, dim=-1)  # the model's own distribution, before penalties and bias
    chosen = logp.gather(1, tokens.unsqueeze(1))  # [B, 1]
    k = max(want)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0])
    # one read back to the host: token ids are exact in float32 (< 2^24)
    rows = torch.cat([tokens[:, None].to(logp.dtype), chosen, top_ids.to(logp.dtype), top_vals], dim=1).tolist()
    top = [list(zip(map(int, r[2:2 + (p.logprobs or 0)]), r[2 + k:2 + k + (p.logprobs or 0)]))
           for r, p in zip(rows, params)]
    return SampleResult([int(r[0]) for r in rows], [r[1] for r in rows], top)


def sample_each(logits: torch.Tensor, requests: Sequence[SampleRequest]) -> list[Sampled | str]:
    """A Sampled token per request (row of `logits`), sampled as one batch; should the batch fail, row by row, so
    that a row that cannot be sampled fails alone (why, a string, in its place)."""
    def picks(rows: Sequence[SampleRequest], lg: torch.Tensor) -> list[Sampled]:
        r = sample(lg, [q.params for q in rows], [q.generator for q in rows], [q.output_ids for q in rows],
                   [q.matcher for q in rows])
        return [Sampled(r.tokens[i], r.logprobs[i] if r.logprobs else None, r.top_logprobs[i] if r.top_logprobs
                        else None) for i in range(len(rows))]

    if not requests:
        return []
    # the batch may fail after drawing from some rows' generators: they restart from here, so a row's draws are
    # the same whichever way it is sampled
    states = [(q.generator, q.generator.get_state()) for q in requests
              if isinstance(q.generator, torch.Generator) and not q.params.greedy]
    try:
        return picks(requests, logits)
    except Exception:
        for generator, state in states:
            generator.set_state(state)
    out: list[Sampled | str] = []
    for row, request in enumerate(requests):
        try:
            out += picks([request], logits[row:row + 1])
        except Exception as e:
            out.append(f"sampling failed: {type(e).__name__}: {e}")
    return out


def verify(logits: torch.Tensor, draft: Sequence[int], request: SampleRequest) -> list[Sampled]:
    """Speculative decoding's acceptance: logits [k + 1, V] of the positions that fed the last real token and the
    k draft tokens after it. Returns the tokens kept, 1 to k + 1: the longest prefix of the draft the model
    agrees with, then the model's own next token.

    Greedy: a draft token is kept while it is the argmax, so the output is the model's greedy output. Sampling
    (drafts are deterministic proposals, q = 1 on the draft token): a draft token d is kept with probability p(d);
    on rejection the token is drawn from p with d removed, renormalised. So P(x) = p(d)[x = d] + (1 - p(d)) p(x)
    [x != d] / (1 - p(d)) = p(x): the model's distribution exactly, with `p` its processed distribution (penalties
    over the tokens before that position, bias, temperature, top-k / top-p / min-p)."""
    p, k, matcher = request.params, len(draft), request.matcher
    outputs = list(request.output_ids)
    if p.greedy and not p.penalized and matcher is None:
        best = logits.argmax(dim=-1).tolist()  # one host synchronization for all k + 1 positions
        kept = next((j for j in range(k) if best[j] != draft[j]), k)
        tokens = draft[:kept] + [best[kept]]
    else:
        tokens, consumed = [], 0  # a grammar walks through the kept guesses, then goes back (the engine feeds it)
        for j in range(k + 1):
            processed = apply_constraints(apply_penalties(logits[j:j + 1], [p], [outputs]), [matcher])[0]
            if p.greedy:
                token = int(processed.argmax())
            else:
                probs = _probs(processed, p)
                if j < k:
                    u = torch.rand((), generator=request.generator, device=probs.device)
                    if float(u) < float(probs[draft[j]]):
                        tokens.append(draft[j])
                        outputs.append(draft[j])
                        consumed += _advance(matcher, draft[j])
                        continue
                    probs = probs.clone()
                    probs[draft[j]] = 0.0  # rejected: draw from what is left
                token = int(_draw(probs, request.generator))
            tokens.append(token)
            if j == k or token != draft[j]:
                break
            outputs.append(token)
            consumed += _advance(matcher, token)
        if consumed:
            matcher.rollback(consumed)
    if p.logprobs is None:
        return [Sampled(t) for t in tokens]
    logp = torch.log_softmax(logits[:len(tokens)], dim=-1)  # the model's own distribution, as `sample` reports
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top_vals, top_ids = logp.topk(p.logprobs, dim=-1) if p.logprobs else (logp[:, :0], logp[:, :0])
    return [Sampled(t, c, list(zip(map(int, ids), vals))) for t, c, ids, vals in
            zip(tokens, chosen, top_ids.tolist(), top_vals.tolist())]


def _advance(matcher, token: int) -> int:
    """Feeds a kept guess to the request's grammar (to mask the next position); how many tokens it took (0 or 1)."""
    if matcher is None or matcher.is_stopped():
        return 0
    return 1 if matcher.consume_token(token) else 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own generator; any integer seed (a server adds the choice index to it) wraps into the
    generator's 64-bit range, so distinct seeds below 2^64 apart stay distinct."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % 2**64)
