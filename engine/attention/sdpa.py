"""Attention through torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA,
a fused kernel on CPU): the default on CUDA when flash-attn is not installed.

Prefill: one SDPA call per sequence over its K/V gathered from the paged cache (causal; with an
offset mask when a cached prefix precedes the new tokens). Decode: one SDPA call for all decoding
sequences at once, their K/V gathered into a padded [seqs, heads, max_ctx, dim] batch with a key
padding mask. Same math as the torch reference up to rounding (SDPA multiplies by 1/sqrt(d) and
may accumulate in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import AttentionBackend, AttentionMetadata, repeat_kv, split_step
from .torch import gather_kv, write_kv


class SDPAAttention(AttentionBackend):
    name = "sdpa"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        prefills, decode_rows, decode_seqs = split_step(meta)
        if not prefills:  # every row decodes, in order: no indexing (a CUDA graph's step)
            return self._decode(q, k_cache, v_cache, meta, decode_seqs)
        self._prefill(q, out, k_cache, v_cache, meta, prefills)
        if decode_seqs:
            out[decode_rows] = self._decode(q[decode_rows], k_cache, v_cache, meta, decode_seqs)
        return out

    def _prefill(self, q, out, k_cache, v_cache, meta: AttentionMetadata, prefills) -> None:
        """One SDPA call per prefilling sequence over its K/V gathered from the cache."""
        heads = q.shape[1]
        for i, start, qlen, ctx in prefills:
            keys = repeat_kv(gather_kv(k_cache, meta.block_tables[i], ctx).transpose(0, 1), heads, 0)  # [heads, ctx, dim]
            values = repeat_kv(gather_kv(v_cache, meta.block_tables[i], ctx).transpose(0, 1), heads, 0)
            query = q[start : start + qlen].transpose(0, 1)  # [heads, qlen, dim]
            if qlen == ctx:
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
            else:  # new tokens after a cached prefix: query j sits at position ctx - qlen + j
                qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
            out[start : start + qlen] = o.transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, seqs: list[int]) -> torch.Tensor:
        """q: [n, heads, dim], one query per sequence -> [n, heads, dim]."""
        tables, mask = meta.memo("sdpa_decode", lambda: _decode_inputs(meta, seqs, k_cache.shape[1], q.device))
        heads = q.shape[1]
        keys = repeat_kv(k_cache[tables].flatten(1, 2).transpose(1, 2), heads, 1)  # [n, heads, blocks * block_size, dim]
        values = repeat_kv(v_cache[tables].flatten(1, 2).transpose(1, 2), heads, 1)
        o = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask)
        return o[:, :, 0, :]


def _decode_inputs(meta: AttentionMetadata, seqs: list[int], block_size: int, device):
    """The decoding sequences' block tables [n, blocks] and key padding mask [n, 1, 1, keys]."""
    ctxs = [meta.context_lens_list[i] for i in seqs]
    max_blocks = (max(ctxs) + block_size - 1) // block_size
    tables = meta.block_tables[seqs][:, :max_blocks]
    lens = torch.tensor(ctxs, device=device)
    mask = torch.arange(max_blocks * block_size, device=device)[None, :] < lens[:, None]
    return tables, mask[:, None, None, :]
