"""Decides what each engine step runs: a prefill of newly admitted sequences, or one decode token
for every running sequence.

Waiting sequences are admitted first-come first-served while the batch has room
(`max_batch_size`), the step's prompt tokens stay within `max_prefill_tokens` (a single prompt may
exceed it alone) and the block manager can reserve their blocks. Prefill steps take priority; a
finished sequence frees its blocks at once, so the next step can admit a waiting one.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences to run, is_prefill)."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            prompt = len(seq.prompt_token_ids)
            if admitted and tokens + prompt > self.max_prefill_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += prompt
        if admitted:
            self.running.extend(admitted)
            return admitted, True
        if not self.running and self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {self.block_manager.blocks_needed(seq)} KV blocks but the cache "
                f"has {self.block_manager.num_blocks}; the engine should have rejected it"
            )
        return list(self.running), False

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)
