"""Iteration-level (continuous) batching: which sequences run in the next step, and how many tokens of each.

Every step mixes decodes (one token per running sequence) with prefills, under a token budget: a long prompt is
cut into chunks across steps (chunked prefill), so it never stalls the decodes of everyone else. Running sequences
go first, then waiting ones first-come-first-served while the budget, the sequence cap and the KV blocks last.
When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
freed and it goes back to the head of the queue to be recomputed (prompt and the tokens it already produced), so
its output continues exactly where it stopped.

Plain Python, no torch. A sequence is any object with `request_id`, `num_tokens` (prompt + output so far),
`num_computed_tokens` and `block_table` (a list of ints).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from ..errors import InferRecipesError
from .block_pool import BlockPool


class QueueFullError(InferRecipesError):
    """The waiting queue is at its bound: the caller should retry later."""


class Seq(Protocol):
    request_id: str
    num_computed_tokens: int
    block_table: list[int]
    # prefix caching only (BlockPool.caching): its chain of block names, how many of its blocks are named
    block_names: list[bytes]
    named_blocks: int
    # speculative decoding only: tokens proposed to follow the sequence, verified in its next decode step
    draft: list[int]

    @property
    def num_tokens(self) -> int: ...

    def tokens(self, start: int, count: int) -> list[int]: ...


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Seq
    start: int  # position of the first token computed this step
    num_tokens: int  # tokens computed this step
    sample: bool  # this chunk reaches the sequence's end: a new token is sampled from its last position
    draft: tuple[int, ...] = ()  # proposed tokens computed after the chunk (counted in num_tokens), verified


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...]  # request ids sent back to the queue this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens computed per step at most (the chunked-prefill budget)
    max_waiting: int = 1024  # queued requests at most; beyond it add() raises QueueFullError
    recompute: bool = False  # no KV cache: every step recomputes each sequence's whole prefix, no blocks

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InferRecipesError(f"{name}: must be a positive integer, got {value!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Seq) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests): retry later")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self.config.recompute:
                n = seq.num_tokens
                if n > budget and scheduled:
                    break  # a whole prefix per step: it waits for a step of its own
                scheduled.append(ScheduledSeq(seq, 0, n, True))
                budget -= n
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            draft = self._draft(seq, n, budget)
            if draft:
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n + len(draft), True, draft))
                budget -= n + len(draft)
                i += 1
                continue
            while not self.pool.grow(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n,
                                              seq.num_computed_tokens + n == seq.num_tokens))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is left to run
        filling: set[bytes] = set()  # names of blocks this step's admitted prefills fill (prefix caching)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if self.config.recompute:
                n = seq.num_tokens
                if n > budget and scheduled:
                    break
            else:
                hit = self._take_cached_prefix(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if self._waits_for(seq, filling) or not self.pool.grow(seq.block_table, seq.num_computed_tokens + n):
                    self._release(seq)  # first come, first served: nobody overtakes the head of the queue
                    break
                if hit is not None:
                    self.pool.count_lookup(seq.num_tokens, hit)
                    bs = self.pool.block_size  # the blocks this chunk fills, named by the lookup already
                    filling.update(seq.block_names[hit // bs:(seq.num_computed_tokens + n) // bs])
            self.waiting.popleft()
            self.running.append(seq)
            start = 0 if self.config.recompute else seq.num_computed_tokens
            scheduled.append(ScheduledSeq(seq, start, n, start + n == seq.num_tokens))
            budget -= n
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _draft(self, seq: Seq, n: int, budget: int) -> tuple[int, ...]:
        """The draft tokens a decoding sequence verifies this step: as many of its proposals as the budget leaves
        room for, when the pool has the blocks for them without preempting anyone (else it decodes plainly)."""
        proposed = seq.draft
        if not proposed or n != 1 or seq.num_tokens - seq.num_computed_tokens != 1:
            return ()
        draft = tuple(proposed[:budget - 1])
        if draft and self.pool.grow(seq.block_table, seq.num_computed_tokens + 1 + len(draft)):
            return draft
        return ()

    def _take_cached_prefix(self, seq: Seq) -> int | None:
        """A sequence starting from nothing takes the longest cached prefix of its tokens (it then starts from
        there); returns the tokens found, or None when there is no lookup (no caching, or a partial start)."""
        if not self.pool.caching or seq.num_computed_tokens or seq.block_table:
            return None
        blocks = self.pool.match(seq.tokens(0, seq.num_tokens), seq.block_names)
        self.pool.hold(blocks)
        seq.block_table.extend(blocks)
        seq.named_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.pool.block_size
        return seq.num_computed_tokens

    def _waits_for(self, seq: Seq, filling: set[bytes]) -> bool:
        """Whether the next block `seq` needs is being filled by a prefill admitted this step (an `n > 1` choice,
        a shared system prompt): it then starts next step, from that block."""
        if not filling or not self.pool.caching:
            return False
        at = len(seq.block_table)
        return at < len(seq.block_names) and seq.block_names[at] in filling

    def _release(self, seq: Seq) -> None:
        """Gives a sequence's blocks back (cached ones stay cached) and sends it back to the start."""
        self.pool.release(seq.block_table)
        seq.num_computed_tokens = 0
        if self.pool.caching:
            seq.named_blocks = 0

    def update(self, output: SchedulerOutput, failed: frozenset[str] = frozenset(),
               accepted: dict[str, int] | None = None) -> None:
        """Marks the scheduled tokens computed (call after the step ran and its tokens were appended) and, with
        prefix caching, names the blocks they filled. A `failed` sequence's tokens are not trusted: its blocks
        stay unnamed. `accepted`: how many of its draft tokens each drafted sequence kept (appended as its own);
        the keys and values of the rejected ones are overwritten by the tokens that follow."""
        if self.config.recompute:
            return
        bs = self.pool.block_size
        for s in output.scheduled:
            seq = s.seq
            kept = (accepted or {}).get(seq.request_id, 0) if s.draft else 0
            seq.num_computed_tokens = s.start + s.num_tokens - len(s.draft) + kept
            if self.pool.caching and seq.request_id not in failed and \
                    seq.num_computed_tokens // bs > seq.named_blocks:
                seq.named_blocks = self.pool.name_full_blocks(seq.block_table,
                                                              seq.tokens(0, seq.num_computed_tokens),
                                                              seq.block_names, seq.named_blocks,
                                                              seq.num_computed_tokens)

    def finish(self, seq: Seq) -> None:
        """Removes a finished or aborted sequence, wherever it is, and frees its blocks (cached ones stay
        cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)
