"""The reference attention over the paged cache, in plain torch: gather each sequence's K/V through
its block table, then the original Qwen-VL math — scores = q @ k^T / sqrt(head_dim) in the model
dtype, causal positions filled with the dtype's minimum, softmax in the model dtype, @ v.
Slow (a Python loop over sequences) but exact and device-agnostic: the yardstick for kernels."""

from __future__ import annotations

import torch

from . import AttentionBackend, AttentionMetadata


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    heads, dim = k.shape[1:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [length, heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size]
    return cache[blocks].flatten(0, 1)[:length]


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        scale = torch.full([], q.shape[-1] ** 0.5, dtype=q.dtype, device=q.device)
        start = 0
        for i, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
            keys = gather_kv(k_cache, meta.block_tables[i], ctx).transpose(0, 1)  # [heads, ctx, dim]
            values = gather_kv(v_cache, meta.block_tables[i], ctx).transpose(0, 1)
            query = q[start : start + qlen].transpose(0, 1)  # [heads, qlen, dim]
            scores = torch.matmul(query, keys.transpose(1, 2)) / scale  # [heads, qlen, ctx]
            if qlen > 1:
                # query j sits at position ctx - qlen + j and sees keys up to it
                qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
                future = torch.arange(ctx, device=q.device)[None, :] > qpos
                scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            out[start : start + qlen] = torch.matmul(probs, values).transpose(0, 1)
            start += qlen
        return out
