"""CUDA graphs for decode steps, vLLM's way: at start-up the model's forward for a step in which
every sequence decodes one token is captured once per batch-size bucket (1, 2, 4, then multiples of
8 up to the first at or above max_num_seqs), and each such step afterwards replays the graph of the
smallest bucket that holds it instead of launching every kernel from Python. `enforce_eager=True`
(vLLM's name) turns them off. Prefills and any step with a prompt chunk or an image run eagerly.

What a graph needs, and how it is given:
- fixed addresses: the step's inputs are copied into static buffers sized for the largest bucket
  (token ids, KV slots, block tables as wide as max_model_len needs, context lengths) and
  the family's step context (Qwen-VL: rotary cos/sin with each sequence's NTK factor, log-n factors)
  is computed eagerly, outside the graph, and copied into static buffers too;
- no host work inside: the attention backend must decode from device tensors only
  (`AttentionBackend.graph_safe`: the cuda backend's Triton paged-decode kernel);
- padding: the rows between the step's sequences and its bucket write their K/V into a scratch block
  kept outside the block manager's pool and attend to that one position, so they never touch a
  sequence's cache; their logits are dropped.

All buckets share one memory pool, captured from the largest down. `capture` is how a forward
becomes replayable: `cuda_capture` on a GPU; the tests hand in an eager stand-in that runs the same
static-buffer forward on CPU, so everything but the capture itself is exercised without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from copy import copy

import torch

from .attention import AttentionMetadata

logger = logging.getLogger("engine")

Forward = Callable[[], torch.Tensor]


def capture_sizes(max_batch_size: int) -> list[int]:
    """The batch-size buckets: 1, 2, 4, then multiples of 8, up to the first at or above max_batch_size."""
    sizes = []
    for size in [1, 2, 4, *range(8, max_batch_size + 8, 8)]:
        sizes.append(size)
        if size >= max_batch_size:
            break
    return sizes


def cuda_capture(forward: Forward, pool) -> tuple[Forward, object]:
    """A CUDA graph of `forward` (after one warm-up run on a side stream: Triton compiles, cuBLAS
    picks its workspaces), in `pool`: (replay -> the graph's output tensor, the pool)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay, graph.pool()


def capture_for(device: str):
    """How this device captures a decode graph: cuda_capture on CUDA; None (eager) elsewhere."""
    return cuda_capture if device.startswith("cuda") else None


class DecodeGraphs:
    """The static buffers and the captured forward of each bucket; `run` replays one step."""

    def __init__(self, model, kv_caches, attention, *, max_batch_size: int, max_blocks: int, block_size: int,
                 scratch_block: int, device: str, capture=cuda_capture):  # fmt: skip
        self.model, self.kv_caches, self.attention, self.block_size = model, kv_caches, attention, block_size
        self.sizes = capture_sizes(max_batch_size)
        self.capture = capture
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        big = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(big, **i64)
        self.slot_mapping = torch.full((big,), self.scratch_slot, **i64)
        self.block_tables = torch.full((big, max_blocks), scratch_block, **i64)
        self.context_lens = torch.ones(big, **i64)
        self.context = None  # the family's step context, static: filled at capture
        self.graphs: dict[int, Forward] = {}
        self.replays = 0  # steps that ran through a graph (the tests count them)

    def bucket(self, n: int) -> int | None:
        return next((size for size in self.sizes if size >= n), None)

    def capture_all(self, context) -> None:
        """Capture every bucket, the largest first; `context` is a step context of the largest bucket's
        rows (any valid values), whose tensors become the static ones."""
        t0 = time.perf_counter()
        self.context = copy(context)
        for name, value in vars(context).items():
            if isinstance(value, torch.Tensor):
                setattr(self.context, name, value.clone())
        pool = None
        for size in reversed(self.sizes):
            replay, pool = self.capture(self._forward(size), pool)
            self.graphs[size] = replay
        logger.info("captured decode graphs for %d batch sizes (%s) in %.1f s",
                    len(self.sizes), ", ".join(map(str, self.sizes)), time.perf_counter() - t0)  # fmt: skip

    def _forward(self, size: int) -> Forward:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_lens=[1] * size,
            context_lens_list=[1] * size,  # on the host: never read by a graph-safe decode
            block_size=self.block_size,
        )
        context = copy(self.context)
        for name, value in vars(self.context).items():
            if isinstance(value, torch.Tensor):
                setattr(context, name, value[:size])

        def forward() -> torch.Tensor:
            meta._memo.clear()
            hidden = self.model(self.input_ids[:size], self.kv_caches, meta, context, self.attention)
            return self.model.compute_logits(hidden)  # [size, vocab]

        return forward

    def run(self, step, context) -> torch.Tensor | None:
        """The logits [n, vocab] of a decode-only step through its bucket's graph; None when the step
        is not one (a prompt chunk, an image, more sequences than the largest bucket)."""
        n = step.input_ids.shape[0]
        size = self.bucket(n) if self.graphs and not step.images and n == len(step.attn.query_lens) else None
        if size is None:
            return None
        self.input_ids[:n].copy_(step.input_ids)
        self.slot_mapping[:n].copy_(step.attn.slot_mapping)
        width = step.attn.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(step.attn.block_tables)
        self.context_lens[:n].copy_(step.attn.context_lens)
        if size > n:  # padding rows: the scratch block, one position
            self.slot_mapping[n:size] = self.scratch_slot
            self.block_tables[n:size, 0] = self.scratch_block
            self.context_lens[n:size] = 1
        for name, value in vars(context).items():
            if isinstance(value, torch.Tensor):
                getattr(self.context, name)[:n].copy_(value)
        self.replays += 1
        return self.graphs[size]()[:n].clone()  # the graph's output is overwritten by its next replay
