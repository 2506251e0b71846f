"""The KV cache's block accounting: which fixed-size blocks of the pool are free, and which a sequence holds.

Plain Python, no torch: the runner owns the tensors, this owns the numbers. A sequence's block table lists the
blocks that hold its tokens in order; token p lives in block `table[p // block_size]` at offset `p % block_size`.
"""
from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        # a stack: the most recently freed block is reused first, so the pages it touched stay warm
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks a sequence holding `table` must add to hold num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Appends blocks to `table` until it holds num_tokens tokens; False (and no change) if too few are free."""
        need = self.missing(table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def release(self, table: list[int]) -> None:
        """Returns a sequence's blocks to the pool and empties its table."""
        self._free.extend(reversed(table))
        table.clear()
