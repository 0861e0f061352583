"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences on demand, and a prefix cache.

A sequence's block table lists its blocks in order; token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. A sequence holds the blocks for the
tokens it has in the cache plus the ones the next step writes (with chunked prefill, only up to the
end of the prompt chunk it computes next: `seq.step_end`); `allocate` grows its table to that,
`free` gives them back (finished or preempted).

Prefix caching: a block that is full is registered under a key of its content and of everything
before it (a chain of hashes over the token ids; image slots hash as the image's content key, since
their ids are only placeholders; plus the sequence's cache salt, which its model family derives from
whatever else changes the cached K/V for the same tokens: Qwen-VL's dynamic-NTK factor). Each block
is registered once, when it fills. A new (or recomputed) sequence starts with the registered blocks
that match its tokens, so a shared prompt head or an image asked about again is not computed twice. Shared blocks are only
read: a sequence always computes at least its last token, from a block boundary on (the model
runner places the image features of a span's remaining slots when a match ends inside a span).
Free blocks keep their content until they are handed out again, least recently freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return (tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.ref_count = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # content key -> block
        self.block_key: dict[int, bytes] = {}  # block -> its content key
        self.hit_tokens = 0  # tokens served from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    # ---- content keys ----------------------------------------------------------------------

    def _keys(self, seq: Sequence, full_blocks: int) -> list[bytes]:
        """Content keys of the first `full_blocks` blocks of `seq` (extends seq.block_keys)."""
        keys = seq.block_keys
        bs = self.block_size
        while len(keys) < full_blocks:
            j = len(keys)
            h = hashlib.blake2b(keys[-1] if keys else b"salt:" + seq.cache_salt, digest_size=16)
            block = seq.token_ids(j * bs, (j + 1) * bs)
            for image in seq.images:
                lo, hi = max(image.start, j * bs), min(image.start + image.length, (j + 1) * bs)
                if lo < hi:  # image slots in this block: their content is the image
                    block[lo - j * bs : hi - j * bs] = [-1] * (hi - lo)
                    h.update(image.key.encode())
            h.update(repr(block).encode())
            keys.append(h.digest())
        return keys[:full_blocks]

    def _match(self, seq: Sequence) -> list[int]:
        """Registered blocks that hold the start of `seq`'s tokens (never its last token: a step
        computes at least one)."""
        if not self.prefix_caching or seq.block_table:
            return []
        blocks = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.block_size):  # the last token is computed
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def prefix_plan(self, seq: Sequence) -> tuple[int, list[bytes]]:
        """(tokens `seq` would take from the prefix cache, keys of the full blocks it would compute
        and register). The scheduler defers a request whose next block another one admitted in the
        same step is computing: one step later that block is cached and it starts from there."""
        if not self.prefix_caching or seq.block_table:
            return 0, []
        matched = len(self._match(seq))
        return matched * self.block_size, self._keys(seq, seq.num_tokens // self.block_size)[matched:]

    # ---- allocation ------------------------------------------------------------------------

    def _plan(self, seq: Sequence) -> tuple[list[int], int]:
        """(cached blocks `seq` would start from, free blocks it would take) so that all its tokens
        up to the next step's end (`seq.step_end`: all of them, or a prompt chunk's) have a slot."""
        matched = self._match(seq)
        reused_free = sum(1 for b in matched if self.ref_count[b] == 0)
        need = blocks_for(seq.step_end, self.block_size) - len(seq.block_table) - len(matched)
        return matched, max(0, need) + reused_free

    def missing(self, seq: Sequence) -> int:
        return self._plan(seq)[1]

    def can_allocate(self, seq: Sequence) -> bool:
        return self.missing(seq) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        matched, need = self._plan(seq)
        if need > self.num_free:
            raise RuntimeError(f"allocate: {need} blocks needed, {self.num_free} free")
        for block in matched:
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
        if matched:
            seq.block_table = list(matched)
            seq.num_cached = len(matched) * self.block_size
            seq.num_registered = len(matched)  # found by their keys: registered already
            self.hit_tokens += seq.num_cached
        while len(seq.block_table) < blocks_for(seq.step_end, self.block_size):
            block, _ = self.free_blocks.popitem(last=False)
            old = self.block_key.pop(block, None)
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def register(self, seq: Sequence) -> None:
        """After a step: make the sequence's newly filled blocks findable by content."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.block_size
        if full <= seq.num_registered:
            return
        keys = self._keys(seq, full)
        for j in range(seq.num_registered, full):
            block = seq.block_table[j]
            if keys[j] not in self.cached:
                self.cached[keys[j]] = block
                self.block_key[block] = keys[j]
        seq.num_registered = full

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the tail is evicted before the shared head
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_cached = seq.num_registered = 0
