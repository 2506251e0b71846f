"""Block pool and scheduler on fake sequences: no model, no torch, milliseconds."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from infer_recipes.engine.block_pool import BlockPool
from infer_recipes.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig


@dataclass(eq=False)
class Seq:
    request_id: str
    prompt: int
    output: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    ids: list[int] | None = None  # token ids (prefix caching); default: the request's own, unlike any other's
    block_names: list = field(default_factory=list)
    named_blocks: int = 0
    draft: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.output

    def tokens(self, start: int, count: int) -> list[int]:
        ids = self.ids or [hash(self.request_id) % 1000 + i for i in range(self.prompt)]
        ids = ids + [7] * self.output  # what it generated
        return ids[start:start + count]


def run_step(s: Scheduler):
    """One step as the engine does it: schedule, mark computed, append a token to every sampled sequence."""
    out = s.schedule()
    s.update(out)
    for x in out.scheduled:
        if x.sample:
            x.seq.output += 1
    return out


def test_block_pool_grows_releases_and_refuses_without_change():
    pool = BlockPool(4, 16)
    table: list[int] = []
    assert pool.grow(table, 17) and len(table) == 2 and pool.num_free == 2
    assert pool.grow(table, 32) and len(table) == 2  # still fits
    assert not pool.grow(table, 16 * 5) and len(table) == 2 and pool.num_free == 2
    pool.release(table)
    assert table == [] and pool.num_free == 4 and pool.usage == 0.0


def test_long_prompt_is_chunked_under_the_token_budget_while_decodes_continue():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockPool(100, 16))
    short = Seq("short", 10)
    s.add(short)
    run_step(s)  # short prefilled, sampled its first token
    long = Seq("long", 150)
    s.add(long)
    chunks = []
    while long.output == 0:
        out = run_step(s)
        by_id = {x.seq.request_id: x for x in out.scheduled}
        assert by_id["short"].num_tokens == 1 and by_id["short"].sample  # a decode every step
        assert out.num_tokens <= 64
        chunks.append((by_id["long"].start, by_id["long"].num_tokens, by_id["long"].sample))
    assert chunks == [(0, 63, False), (63, 63, False), (126, 24, True)]


def test_first_come_first_served_and_the_sequence_cap():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1000), BlockPool(100, 16))
    for i in range(4):
        s.add(Seq(str(i), 5))
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["0", "1"]
    s.finish(s.running[0])
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["1", "2"]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences of 8 tokens fill 4 blocks, then growing needs more than are free
    pool = BlockPool(6, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100), pool)
    a, b = Seq("a", 8), Seq("b", 8)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 9 tokens each now, 2 blocks each computed (+1 block each for the next token)
    preempted = []
    for _ in range(8):
        out = run_step(s)
        preempted += out.preempted
        held = a.block_table + b.block_table
        assert len(set(held)) == len(held) and pool.num_free + len(held) == 6  # no block lost or shared
    assert preempted == ["b"]
    assert s.num_preemptions == 1
    # b was recomputed from scratch once a finished: prompt + the tokens it had produced
    s.finish(a)
    produced = b.output
    assert produced >= 1 and b.num_computed_tokens == 0 and b.block_table == []
    (x,) = s.schedule().scheduled
    assert x.seq is b and x.start == 0 and x.num_tokens == 8 + produced and x.sample
    s.finish(b)
    assert pool.num_free == 6


def test_the_waiting_queue_is_bounded():
    s = Scheduler(SchedulerConfig(max_waiting=2), BlockPool(10, 16))
    s.add(Seq("0", 3))
    s.add(Seq("1", 3))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        s.add(Seq("2", 3))


def test_abort_from_the_queue_or_the_batch_returns_every_block():
    pool = BlockPool(10, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=1), pool)
    a, b = Seq("a", 9), Seq("b", 3)
    s.add(a)
    s.add(b)
    run_step(s)
    assert pool.num_free == 7 and b in s.waiting
    s.finish(b)
    s.finish(a)
    assert pool.num_free == 10 and not s.has_unfinished()


def test_without_a_kv_cache_every_step_recomputes_whole_sequences():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, recompute=True), BlockPool(1, 16))
    a, b = Seq("a", 10), Seq("b", 10)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(x.seq.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 0, 10)]
    out = run_step(s)  # a now 11 tokens: with b's 10 over the budget of 16, b waits its turn (FCFS)
    assert [(x.seq.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 0, 11)]
    assert a.block_table == [] and b.block_table == []


# ---- automatic prefix caching ----------------------------------------------------------------------------------------
def _cached_scheduler(num_blocks: int = 32, block_size: int = 4, budget: int = 100):
    pool = BlockPool(num_blocks, block_size, caching=True)
    return pool, Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), pool)


def test_a_later_sequence_starts_from_the_cached_prefix_and_computes_the_rest():
    pool, s = _cached_scheduler()
    shared = list(range(100, 130))  # 30 tokens: 7 full blocks of 4
    a = Seq("a", 34, ids=shared + [1, 2, 3, 4])
    s.add(a)
    run_step(s)
    b = Seq("b", 33, ids=shared + [9, 9, 9])
    s.add(b)
    (x,) = [x for x in s.schedule().scheduled if x.seq is b]
    assert x.start == 28 and x.num_tokens == 5  # 7 blocks (28 tokens) taken, the 5 others computed
    assert b.block_table[:7] == a.block_table[:7] and b.block_table[7] != a.block_table[7]
    assert (pool.queries, pool.hits) == (34 + 33, 28)


def test_a_prompt_of_whole_blocks_still_computes_its_last_token():
    pool, s = _cached_scheduler()
    ids = list(range(16))  # exactly 4 blocks
    a = Seq("a", 16, ids=ids)
    s.add(a)
    run_step(s)
    s.finish(a)
    b = Seq("b", 16, ids=ids)
    s.add(b)
    (x,) = s.schedule().scheduled
    assert (x.start, x.num_tokens, x.sample) == (12, 4, True)


def test_choices_admitted_together_wait_a_step_and_share_the_prompt():
    pool, s = _cached_scheduler()
    ids = list(range(40))
    a, b = Seq("a", 40, ids=ids), Seq("b", 40, ids=ids)
    s.add(a)
    s.add(b)
    first = run_step(s)
    assert [x.seq.request_id for x in first.scheduled] == ["a"]  # b waits for a's blocks
    second = s.schedule()
    (xb,) = [x for x in second.scheduled if x.seq is b]
    assert xb.start == 36 and b.block_table[:9] == a.block_table[:9]


def test_held_blocks_are_never_evicted_and_idle_ones_go_least_recently_used_first():
    pool = BlockPool(6, 4, caching=True)
    ids = list(range(12))
    first: list[int] = []
    assert pool.grow(first, 12)
    assert pool.name_full_blocks(first, ids, [], 0, 12) == 3 and pool.num_cached == 3
    other: list[int] = []
    assert pool.grow(other, 8)  # held, never named
    blocks = list(first)
    pool.release(first)  # its named blocks stay cached and idle: free to take, not lost
    assert pool.num_free == 4 and pool.num_cached == 3
    third: list[int] = []
    assert pool.grow(third, 8)  # the never-named block, then the least recently used idle one: first's last
    assert blocks[2] in third and not set(other) & set(third) and pool.num_cached == 2
    again = pool.match(ids, [])  # its prefix is still there (a sequence's last blocks go first)
    assert again == blocks[:2]
    pool.hold(again)
    assert not pool.grow([], 4)  # held blocks are never taken
    pool.release(again), pool.release(other), pool.release(third)
    assert pool.num_free == 6


def test_a_failed_sequence_names_no_blocks():
    pool, s = _cached_scheduler()
    a = Seq("a", 20, ids=list(range(20)))
    s.add(a)
    out = s.schedule()
    s.update(out, failed=frozenset({"a"}))
    assert pool.num_cached == 0
    s.finish(a)
    b = Seq("b", 20, ids=list(range(20)))
    s.add(b)
    (x,) = s.schedule().scheduled
    assert x.start == 0
