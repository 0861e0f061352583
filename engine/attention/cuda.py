"""The CUDA attention backend: flash-attn's varlen kernel for prefill when flash-attn is installed
(fp16/bf16; otherwise torch's SDPA, as in the sdpa backend), and a Triton paged-decode kernel that
reads each sequence's K/V in place through its block table.

Prefill with flash-attn: every prefilling sequence's new queries are packed as they come ([tokens,
heads, dim]) and its cached K/V (a reused prefix included) gathered into one packed [keys, heads,
dim] tensor; cu_seqlens mark the sequences. flash-attn (>= 2.1) aligns its causal mask to the
bottom right, so a query at position ctx - qlen + j sees keys 0..ctx - qlen + j: exactly the
prefix-cache case. It takes K/V with fewer heads than the queries as they are (grouped-query
attention), as does the Triton kernel.
"""

from __future__ import annotations

import logging

import torch

from . import AttentionMetadata
from .sdpa import SDPAAttention
from .torch import gather_kv


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch / GPU
        return None
    return flash_attn_varlen_func


def varlen_inputs(q, k_cache, v_cache, meta: AttentionMetadata, prefills):
    """Packed inputs of a varlen attention call for the prefilling sequences `prefills` = [(sequence,
    first packed row, query len, context len)]: (q [tq, h, d], k [tk, h, d], v, cu_seqlens_q,
    cu_seqlens_k (int32, [n + 1]), max_seqlen_q, max_seqlen_k, rows of q and out)."""
    rows, cu_q, cu_k = meta.memo("varlen", lambda: _varlen_layout(prefills, q.device))
    keys = torch.cat([gather_kv(k_cache, meta.block_tables[i], ctx) for i, _, _, ctx in prefills])
    values = torch.cat([gather_kv(v_cache, meta.block_tables[i], ctx) for i, _, _, ctx in prefills])
    qlens = [qlen for _, _, qlen, _ in prefills]
    ctxs = [ctx for _, _, _, ctx in prefills]
    return q[rows], keys, values, cu_q, cu_k, max(qlens), max(ctxs), rows


def _varlen_layout(prefills, device):
    """Packed rows of the prefilling queries and the cu_seqlens of queries and keys (once per step)."""
    rows = torch.cat([torch.arange(start, start + qlen, device=device) for _, start, qlen, _ in prefills])
    qlens = [qlen for _, _, qlen, _ in prefills]
    ctxs = [ctx for _, _, _, ctx in prefills]
    cu_q = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(ctxs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return rows, cu_q, cu_k


class CudaAttention(SDPAAttention):
    name = "cuda"

    def __init__(self, flash_attn_varlen=None, paged_decode=None):
        self.flash = flash_attn_varlen if flash_attn_varlen is not None else _flash_attn_varlen()
        if paged_decode is None:
            from .kernels.paged_decode import paged_decode
        self.paged_decode = paged_decode

    @property
    def graph_safe(self) -> bool:
        return self.paged_decode is not None

    def _prefill(self, q, out, k_cache, v_cache, meta: AttentionMetadata, prefills) -> None:
        if self.flash is None or q.dtype not in (torch.float16, torch.bfloat16):
            return super()._prefill(q, out, k_cache, v_cache, meta, prefills)
        query, keys, values, cu_q, cu_k, max_q, max_k, rows = varlen_inputs(q, k_cache, v_cache, meta, prefills)
        out[rows] = self.flash(query, keys, values, cu_q, cu_k, max_q, max_k, causal=True)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, seqs: list[int]) -> torch.Tensor:
        if self.paged_decode is not None:
            tables, lens = meta.memo("paged_decode", lambda: _decode_tables(meta, seqs, q.device))
            try:
                return self.paged_decode(q.contiguous(), k_cache, v_cache, tables, lens)
            except Exception as e:  # a Triton that cannot compile for this GPU: say so, keep running
                logging.getLogger("engine").warning(
                    "Triton paged decode failed (%s: %s); decoding with SDPA from now on", type(e).__name__, e
                )
                self.paged_decode = None
        return super()._decode(q, k_cache, v_cache, meta, seqs)


def _decode_tables(meta: AttentionMetadata, seqs: list[int], device):
    if len(seqs) == meta.block_tables.shape[0]:  # every sequence decodes: the step's own tensors
        return meta.block_tables, meta.context_lens
    index = torch.tensor(seqs, device=device)
    return meta.block_tables[index], meta.context_lens[index]
