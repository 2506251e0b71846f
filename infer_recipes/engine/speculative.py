"""Speculative decoding's proposers: before each step, guesses of the tokens that follow each decoding sequence.

The target model then computes the last real token and the k guesses in one step, keeps the longest prefix it
agrees with and adds its own next token (runner/sampling.verify): greedy outputs are exactly the target's, sampled
ones follow the target's distribution. A step costs about as much as a decode step while weights, not tokens,
bound it, so every kept guess is a token for free.

- `PromptLookup`: the longest recent n-gram (n = 3, 2, 1) that ends the sequence is looked up earlier in its prompt
  and output; the tokens that followed it there are the guess. No second model: strong where answers copy their
  context (QA, code edits, summaries).
- `DraftModel`: a smaller model with the same vocabulary drafts greedily, k single-token steps, on its own KV
  blocks (its own BlockPool); a sequence whose blocks it cannot get is simply not drafted.

A step verifies at most `rows` positions of decoding sequences (each its last token plus its guesses): where
computing more rows at once costs more than their expected yield (a batch of decodes on a CPU: see the README's
measurements), the spare rows are split evenly over the decoding sequences, and a full batch decodes plainly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..config import SamplingParams
from ..runner import ModelRunner, Sampled, SampleRequest, StepSeq
from .block_pool import BlockPool
from .request import Request


def ration(requests: Iterable[Request], k: int, rows: int, guess: Callable[[Request, int], int]) -> None:
    """Clears every request's draft, then offers each decoding request (one token left to compute) as many
    guesses as it can use, `guess(request, want)`, which returns how many it took: at most k, never a token past
    max_tokens or the context (a step keeps up to guesses + 1 tokens), and within the `rows` a step verifies
    (each decoding request's last token, then the guesses). The spare rows are split evenly over the requests
    still to be offered (what one leaves goes to the next): a first guess is kept more often than a later one,
    so two sequences with two guesses each keep more than one with four."""
    decodes = []
    for r in requests:
        r.draft = []
        if r.num_tokens - r.num_computed_tokens == 1:
            decodes.append(r)
    spare = rows - len(decodes)
    for i, r in enumerate(decodes):
        left = min(r.params.max_tokens - len(r.output_ids), r.max_len - r.num_tokens)
        want = min(k, left - 1, -(-spare // (len(decodes) - i)))
        if want > 0:
            spare -= guess(r, want)


class PromptLookup:
    """n-gram prompt lookup (min_n <= n <= max_n: a single token matches too often to guess well). Each request's
    index maps every n-gram (n <= max_n) that has a continuation to where its latest occurrence ends; it grows by
    the new tokens only, so a proposal costs O(new tokens), not O(length)."""

    def __init__(self, k: int, rows: int, min_n: int = 2, max_n: int = 3):
        self.k, self.rows, self.min_n, self.max_n = k, rows, min_n, max_n
        self._index: dict[str, tuple[dict[tuple[int, ...], int], list[int]]] = {}

    def propose(self, requests: Iterable[Request]) -> None:
        ration(requests, self.k, self.rows, self._lookup)

    def _lookup(self, r: Request, want: int) -> int:
        """Sets `r.draft` to what followed the latest earlier occurrence of its last n-gram; how many it took."""
        index, ids = self._index.setdefault(r.request_id, ({}, []))
        done = len(ids)
        ids += r.tokens(done, r.num_tokens - done)
        for end in range(max(done, 1), len(ids)):  # n-grams ending before `end` gain a continuation
            for n in range(1, min(self.max_n, end) + 1):
                index[tuple(ids[end - n:end])] = end
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            at = index.get(tuple(ids[-n:]))
            if at is not None:
                r.draft = ids[at:at + want]
                break
        return len(r.draft)

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)


@dataclass
class _Drafting:
    table: list[int] = field(default_factory=list)  # the draft's KV blocks for this request
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values those blocks hold
    real: int = 0  # how many of `ids` are the request's own tokens (the rest were guesses)
    names: list[bytes] = field(default_factory=list)  # prefix caching: the chain of its blocks' names
    named: int = 0  # how many of its blocks are named


class DraftModel:
    """A smaller model guessing greedily for a bigger one (same tokenizer). Its KV cache follows each request:
    guesses the target rejected are dropped from it, the tokens the target added are computed in the next
    proposal's first step (with the request's last token), then k - 1 single-token steps. Its pool caches
    prefixes as the target's does (full blocks of a request's own tokens, named by their tokens), so a prompt
    that repeats an earlier one's beginning (the instruction and demonstrations of QA requests, a conversation
    so far) is not prefilled again by the draft either; exactness is not at stake, the target verifies."""

    _GREEDY = SamplingParams(temperature=0.0)

    def __init__(self, runner: ModelRunner, k: int, rows: int):
        self.runner, self.k, self.rows = runner, k, rows
        num_blocks = runner.cache.num_blocks if runner.cache is not None else 1
        self.pool = BlockPool(num_blocks, runner.block_size, caching=True)
        self._state: dict[str, _Drafting] = {}

    def propose(self, requests: Iterable[Request]) -> None:
        work: list[tuple[Request, _Drafting, int]] = []

        def take(r: Request, want: int) -> int:
            state = self._catch_up(r, want)
            if state is None:
                return 0
            work.append((r, state, want))
            return want

        ration(requests, self.k, self.rows, take)
        if not work:
            return
        # first step: each request's uncomputed tokens (at least its last), one guess each; a short run as decode
        # rows (a prompt's uncached part as a prefill)
        steps = []
        for r, s, _ in work:
            tokens = r.tokens(len(s.ids), r.num_tokens - len(s.ids))
            steps.append(StepSeq(tokens, len(s.ids), s.table, True, decode=len(tokens) <= self.k + 1))
            s.ids += tokens
            s.real = len(s.ids)
        for i in range(max(w for _, _, w in work)):
            picks = self.runner.execute(steps, [SampleRequest(self._GREEDY, None, ())] * len(steps))
            going, steps = [], []
            for (r, s, want), pick in zip(work, picks):
                if not isinstance(pick, Sampled):  # its draft step failed: the target decodes it plainly
                    r.draft = []
                    self.forget(r.request_id)
                    continue
                if i == 0:  # the request's own tokens are computed now: their full blocks can serve later prompts
                    s.named = self.pool.name_full_blocks(s.table, s.ids, s.names, s.named, s.real)
                r.draft.append(pick.token)
                if len(r.draft) < want:
                    steps.append(StepSeq([pick.token], len(s.ids), s.table, True))
                    s.ids.append(pick.token)
                    going.append((r, s, want))
            work = going
            if not work:
                break

    def _catch_up(self, r: Request, want: int) -> _Drafting | None:
        """The request's drafting state with guesses the target rejected dropped and blocks for this proposal;
        None (and its blocks freed) when the draft pool has too few."""
        s = self._state.get(r.request_id)
        if s is None:  # a new request: its longest cached prefix first
            s = self._state[r.request_id] = _Drafting()
            s.table = self.pool.match(r.tokens(0, r.num_tokens), s.names)
            self.pool.hold(s.table)
            s.ids = r.tokens(0, len(s.table) * self.pool.block_size)
            s.real, s.named = len(s.ids), len(s.table)
            self.pool.count_lookup(r.num_tokens, s.real)
        keep = s.real
        for a, b in zip(s.ids[s.real:], r.tokens(s.real, min(len(s.ids), r.num_tokens - 1) - s.real)):
            if a != b:
                break
            keep += 1
        del s.ids[min(keep, r.num_tokens - 1):]
        if self.pool.grow(s.table, r.num_tokens + want - 1):
            return s
        self.forget(r.request_id)
        return None

    def forget(self, request_id: str) -> None:
        s = self._state.pop(request_id, None)
        if s is not None:
            self.pool.release(s.table)
