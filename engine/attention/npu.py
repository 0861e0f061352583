"""The Ascend attention backend: torch_npu's fused inference attention operator,
`torch_npu.npu_fused_infer_attention_score` (documented in Ascend/op-plugin,
docs/context/torch_npu-npu_fused_infer_attention_score.md), in its two documented forms:

- decode (one query token per sequence): page attention. query in "BSH" layout [seqs, 1, heads *
  dim]; key / value are the paged caches viewed as (blocknum, blocksize, kv_heads * dim), with
  num_key_value_heads for grouped-query attention; block_table int32
  [seqs, max blocks]; actual_seq_lengths_kv = each sequence's cached length; block_size.
- prefill: "TND" layout over packed tokens; queries [tq, heads, dim], each sequence's cached K/V (a
  reused prefix included) gathered into [tk, heads, dim]; actual_seq_lengths /
  actual_seq_lengths_kv are cumulative ends; sparse_mode 3 (rightDownCausal, the optimized 2048 x
  2048 upper-triangular mask), so a query at position ctx - qlen + j sees keys up to it.

New K/V go into the cache by index_copy_ as on every device. torch_npu is imported only when this
backend is built, so CPU machines import this module without it; the argument building is pure
torch and is tested on CPU against an emulation of the operator's documented semantics.
"""

from __future__ import annotations

import torch

from . import AttentionBackend, AttentionMetadata, split_step
from .torch import gather_kv, write_kv

CAUSAL_MASK_SIZE = 2048  # sparse_mode 2/3/4 take this optimized mask


def decode_args(q, k_cache, v_cache, meta: AttentionMetadata, seqs: list[int]) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of the paged decode call for sequences `seqs`; q: [n, heads, dim]."""
    n, heads, dim = q.shape
    blocks, block_size, kv_heads = k_cache.shape[:3]
    table = meta.memo("npu_decode", lambda: meta.block_tables[torch.tensor(seqs, device=q.device)].to(torch.int32))
    kwargs = dict(
        num_heads=heads,
        num_key_value_heads=kv_heads,
        scale=dim**-0.5,
        input_layout="BSH",
        block_table=table,
        actual_seq_lengths_kv=[meta.context_lens_list[i] for i in seqs],
        block_size=block_size,
    )
    query = q.reshape(n, 1, heads * dim)
    return (query, k_cache.view(blocks, block_size, kv_heads * dim), v_cache.view(blocks, block_size, kv_heads * dim)), kwargs


def causal_mask(device) -> torch.Tensor:
    return torch.triu(torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)


def prefill_args(q, k_cache, v_cache, meta: AttentionMetadata, prefills, mask) -> tuple[tuple, dict, torch.Tensor]:
    """(positional, keyword, packed rows of q) of the TND prefill call for `prefills` = [(sequence,
    first packed row, query len, context len)]."""
    heads, dim = q.shape[1:]
    rows = meta.memo("npu_rows", lambda: torch.cat([torch.arange(start, start + qlen, device=q.device)
                                                    for _, start, qlen, _ in prefills]))  # fmt: skip
    keys = torch.cat([gather_kv(k_cache, meta.block_tables[i], ctx) for i, _, _, ctx in prefills])
    values = torch.cat([gather_kv(v_cache, meta.block_tables[i], ctx) for i, _, _, ctx in prefills])
    ends_q, ends_k, tq, tk = [], [], 0, 0
    for _, _, qlen, ctx in prefills:
        tq, tk = tq + qlen, tk + ctx
        ends_q.append(tq)
        ends_k.append(tk)
    kwargs = dict(
        num_heads=heads,
        num_key_value_heads=k_cache.shape[2],
        scale=dim**-0.5,
        input_layout="TND",
        atten_mask=mask,
        sparse_mode=3,
        actual_seq_lengths=ends_q,
        actual_seq_lengths_kv=ends_k,
    )
    return (q[rows].contiguous(), keys, values), kwargs, rows


class NPUAttention(AttentionBackend):
    name = "npu"

    def __init__(self, ops=None):
        if ops is None:
            import torch_npu as ops  # only on Ascend machines
        self.ops = ops
        self._mask: torch.Tensor | None = None

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        prefills, decode_rows, decode_seqs = split_step(meta)
        if prefills:
            if self._mask is None or self._mask.device != q.device:
                self._mask = causal_mask(q.device)
            args, kwargs, rows = prefill_args(q, k_cache, v_cache, meta, prefills, self._mask)
            out[rows] = self.ops.npu_fused_infer_attention_score(*args, **kwargs)[0]
        if decode_seqs:
            args, kwargs = decode_args(q[decode_rows], k_cache, v_cache, meta, decode_seqs)
            o = self.ops.npu_fused_infer_attention_score(*args, **kwargs)[0]  # [n, 1, heads * dim]
            out[decode_rows] = o.view(len(decode_seqs), *q.shape[1:])
        return out
