"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences from a free list, on demand.

A sequence's block table lists its blocks in order; token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. A sequence holds the blocks for the
tokens it has in the cache plus the ones the next step writes; `allocate` grows its table to that,
`free` returns every block at once (finished or preempted).
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return (tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def missing(self, seq: Sequence) -> int:
        """Blocks `seq` still needs so that all its tokens (the next step's included) have a slot."""
        return max(0, blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        return self.missing(seq) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        need = self.missing(seq)
        if need > self.num_free:
            raise RuntimeError(f"allocate: {need} blocks needed, {self.num_free} free")
        seq.block_table.extend(self.free_blocks.popleft() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
