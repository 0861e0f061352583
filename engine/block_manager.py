"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences from a free list.

A sequence's block table lists its blocks in order; token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. In this version a sequence gets the
blocks for its whole budget (prompt + max_tokens) when it is admitted, so a running batch never
runs out mid-generation; on-demand growth with preemption replaces that in the scheduling issue.
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

    def blocks_needed(self, seq: Sequence) -> int:
        return blocks_for(seq.max_total_tokens, self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        need = self.blocks_needed(seq)
        if need > self.num_free:
            raise RuntimeError(f"allocate: {need} blocks needed, {self.num_free} free")
        seq.block_table = [self.free_blocks.popleft() for _ in range(need)]

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
