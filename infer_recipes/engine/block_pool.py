"""The KV cache's block accounting: which fixed-size blocks of the pool are free, which a sequence holds, and
(automatic prefix caching) which full blocks hold which tokens, so a new sequence can start from them.

Plain Python, no torch: the runner owns the tensors, this owns the numbers. A sequence's block table lists the
blocks that hold its tokens in order; token p lives in block `table[p // block_size]` at offset `p % block_size`.

Prefix caching: a full block is named by a hash of (the previous block's hash, its token ids) - the chain makes
the name stand for the whole prefix, not just the block's own tokens. Blocks carry reference counts; a block
nobody holds any more keeps its contents and its name and waits, least recently used first, until a new block is
needed and no never-named one is left. A new sequence takes the longest named prefix of its tokens (never all of
them: its last token is always computed, for its logits).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        # a stack: the most recently freed block is reused first, so the pages it touched stay warm
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._name_of: dict[int, bytes] = {}  # block -> the hash of the prefix it completes
        self._by_name: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recently used first
        self.queries = self.hits = 0  # prompt tokens looked up in the prefix cache, and found there

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take now: never named, or named but held by nobody (evicted when taken)."""
        return len(self._free) + len(self._idle)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences."""
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Named blocks (held or idle): what the prefix cache holds."""
        return len(self._name_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks a sequence holding `table` must add to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Appends blocks to `table` until it holds num_tokens tokens; False (and no change) if too few are free."""
        need = self.missing(table, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently used idle named block: its name goes with its contents
            block, _ = self._idle.popitem(last=False)
            del self._by_name[self._name_of.pop(block)]
        self._refs[block] = 1
        return block

    def release(self, table: list[int]) -> None:
        """Drops a sequence's hold on its blocks and empties its table. A named block nobody holds any more stays
        cached (idle), the sequence's last blocks first in line for eviction; the others are free."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._name_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        table.clear()

    # ---- the prefix cache --------------------------------------------------------------------------------------------
    def names(self, token_ids, names: list[bytes], count: int) -> list[bytes]:
        """`names` (the chain so far) extended to the first `count` full blocks of `token_ids`."""
        bs = self.block_size
        for i in range(len(names), count):
            digest = hashlib.blake2b(names[-1] if names else b"", digest_size=16)
            digest.update(array("q", token_ids[i * bs:(i + 1) * bs]).tobytes())
            names.append(digest.digest())
        return names

    def match(self, token_ids, names: list[bytes]) -> list[int]:
        """The cached blocks of the longest named prefix of `token_ids`, leaving at least its last token to compute.
        Extends `names` (the sequence's chain) as far as it looks."""
        if not self.caching:
            return []
        count = (len(token_ids) - 1) // self.block_size
        found = []
        for name in self.names(token_ids, names, count)[:count]:
            block = self._by_name.get(name)
            if block is None:
                break
            found.append(block)
        return found

    def hold(self, blocks: list[int]) -> None:
        """Takes a hold on cached blocks (`match`'s answer): they cannot be evicted while held."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1

    def forget_idle(self) -> int:
        """Empties the prefix cache of every block nobody holds (their names go, the blocks are free): a cold
        cache, as after a restart, for a measurement that must not find an earlier one's prompts. Blocks that
        sequences hold keep their names. Returns how many blocks were forgotten."""
        for block in self._idle:
            del self._by_name[self._name_of.pop(block)]
            self._free.append(block)
        count = len(self._idle)
        self._idle.clear()
        return count

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.queries += prompt_tokens
        self.hits += hit_tokens

    def name_full_blocks(self, table: list[int], token_ids, names: list[bytes], first: int,
                         num_computed: int) -> int:
        """Names the blocks `table[first:]` that computed tokens have filled, so later sequences can take them;
        returns how many blocks of the table are now full (the next call's `first`). A block whose content
        another block already holds stays unnamed (freed when released)."""
        full = min(num_computed // self.block_size, len(table))
        if not self.caching or full <= first:
            return max(first, full)
        self.names(token_ids, names, full)
        for i in range(first, full):
            block, name = table[i], names[i]
            if name not in self._by_name and block not in self._name_of:
                self._by_name[name] = block
                self._name_of[block] = name
        return full
