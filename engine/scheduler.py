"""Continuous batching: decides which sequences each engine step runs.

Every step runs all running sequences (one new token each) together with newly admitted ones (their
whole prompt, or prompt + output so far after a preemption) in one packed batch. Admission is
first-come first-served while the batch is under `max_batch_size`, the step's prefill tokens (those
not served by the prefix cache) stay within `max_prefill_tokens` (a lone prompt may exceed it) and
the block manager has the blocks. A request whose next uncached block is being computed by one
admitted in the same step (another question about the same image) waits one step and then starts
from the cached block; later requests go ahead of it meanwhile. A finished sequence frees its
blocks at once, so the next step admits a waiting one.

Blocks are taken on demand. When a running sequence needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed from its tokens later (prompt + what it generated), which gives the same
tokens as an uninterrupted run. A step that preempted admits nothing new, so the batch cannot thrash. An aborted request leaves the
queue or the batch at once and its blocks go back to the free list (blocks other requests share
stay theirs).

Chunked prefill (`chunked_prefill`, EngineArgs.enable_chunked_prefill, vLLM's scheme): the step's
`max_prefill_tokens` budget (vLLM's max_num_batched_tokens) then counts every token the step computes.
The running decodes are scheduled first, one token each, then the running sequences whose prompt is
partly computed, then waiting ones; each prefill takes what is left of the budget as one chunk
(`Sequence.chunk_end`), so a long prompt is computed over several steps while the decodes go on
getting a token every step, instead of all of them waiting for it. A chunk never ends inside an
image span (the vision features of a span are placed as a whole): it ends before the span, and the
step's first prompt chunk takes a whole span even beyond the budget, so a span larger than the budget
still goes through. A sequence samples its first token after its last chunk; the earlier chunks'
K/V stay in its blocks (registered in the prefix cache as they fill) and later chunks attend to them
as to a prefix-cache hit. A sequence preempted in the middle of its prefill starts it again.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int,
                 chunked_prefill: bool = False):  # fmt: skip
        self.block_manager = block_manager
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences the next step runs (each computes its tokens from `num_cached` to `step_end`)."""
        if self.chunked_prefill:
            return self._schedule_chunked()
        bm = self.block_manager
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if self._make_room(seq, preempted):
                bm.allocate(seq)
        for seq in preempted:  # preempted newest first: back to the front, the earliest admitted first
            self.waiting.appendleft(seq)

        prefill_tokens = 0  # tokens this step computes for new sequences (prefix-cache hits excluded)
        computing: set[bytes] = set()  # block keys the sequences admitted in this step will register
        deferred: list[Sequence] = []
        while not preempted and self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            cached, keys = bm.prefix_plan(seq)
            if keys and keys[0] in computing:  # same image / prompt head as one admitted now: wait a step
                deferred.append(seq)
                continue
            tokens = seq.num_tokens - cached
            if (prefill_tokens and prefill_tokens + tokens > self.max_prefill_tokens) or not bm.can_allocate(seq):
                self.waiting.appendleft(seq)
                break
            bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            prefill_tokens += tokens
            computing.update(keys)
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the front
        self._check_progress()
        return list(self.running)

    def _schedule_chunked(self) -> list[Sequence]:
        """Chunked prefill: the step's `max_prefill_tokens` budget is shared by every token it computes.
        Running decodes go first (one token each), then the running sequences in the middle of their
        prefill, then new ones while the batch has room, each taking a chunk of what is left."""
        bm, budget = self.block_manager, self.max_prefill_tokens
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        used = 0  # tokens the step computes so far
        prefilling = False  # whether a prompt chunk is in the step yet

        def refund(victim: Sequence) -> None:  # a victim scheduled earlier in this step: its tokens go back
            nonlocal used
            if victim in scheduled:
                scheduled.remove(victim)
                used -= victim.step_end - victim.num_cached

        decodes = [s for s in self.running if s.num_tokens - s.num_cached == 1]
        for seq in decodes + [s for s in self.running if s.num_tokens - s.num_cached > 1]:
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            seq.chunk_end = None
            if seq.num_tokens - seq.num_cached > 1:
                end = self._chunk_end(seq, seq.num_cached, budget - used, first=not prefilling)
                if end == seq.num_cached:
                    continue  # no room left in this step: it goes on in the next one
                seq.chunk_end = end if end < seq.num_tokens else None
            if self._make_room(seq, preempted, before=refund):
                bm.allocate(seq)
                scheduled.append(seq)
                used += seq.step_end - seq.num_cached
                prefilling |= seq.step_end - seq.num_cached > 1
        for seq in preempted:  # preempted newest first: back to the front, the earliest admitted first
            self.waiting.appendleft(seq)

        computing: set[bytes] = set()  # block keys the sequences admitted in this step will register
        deferred: list[Sequence] = []
        while not preempted and self.waiting and len(self.running) < self.max_batch_size and used < budget:
            seq = self.waiting.popleft()
            cached, keys = bm.prefix_plan(seq)
            if keys and keys[0] in computing:  # same image / prompt head as one admitted now: wait a step
                deferred.append(seq)
                continue
            end = self._chunk_end(seq, cached, budget - used, first=not prefilling)
            seq.chunk_end = end if end < seq.num_tokens else None
            if end == cached or not bm.can_allocate(seq):
                seq.chunk_end = None
                self.waiting.appendleft(seq)
                break
            bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            used += end - cached
            prefilling = True
            computing.update(keys)
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the front
        self._check_progress()
        return scheduled

    @staticmethod
    def _chunk_end(seq: Sequence, start: int, room: int, first: bool) -> int:
        """Where a prefill from token `start` ends in a step with `room` tokens left: at most `room`
        tokens, never inside an image span (the chunk ends before the span; the step's first prompt
        chunk takes the whole span when it would be empty otherwise, so a span larger than the budget
        still goes through). `start` itself: nothing fits in this step."""
        end = min(seq.num_tokens, start + max(room, 0))
        if end == seq.num_tokens:
            return end
        for image in seq.images:
            lo, hi = image.start, image.start + image.length
            if lo < end < hi:
                return lo if lo > start else hi if first else start
        return end

    def _make_room(self, seq: Sequence, preempted: list[Sequence], before=None) -> bool:
        """Preempt the most recently admitted running sequences (`before(victim)` first, while its blocks
        are still held) until `seq`'s next blocks fit; False when `seq` itself had to go."""
        while not self.block_manager.can_allocate(seq):
            victim = self.running[-1]
            if before is not None:
                before(victim)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _check_progress(self) -> None:
        """Nothing runs while requests wait: one of them can never fit (add_request should have refused it)."""
        if not self.running and self.waiting:
            seq, bm = self.waiting[0], self.block_manager
            raise RuntimeError(
                f"request {seq.request_id} needs {bm.missing(seq)} KV blocks but the cache has {bm.num_blocks}; "
                "the engine should have rejected it"
            )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.chunk_end = None
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Take a request out wherever it is; its blocks are free when this returns."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.FINISHED
