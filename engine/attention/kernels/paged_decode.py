"""A Triton paged-attention decode kernel: one query token per sequence attends over its cached K/V,
read in place through its block table (no gather, no padding to the longest context).

One program per (sequence, head) walks the sequence's context in tiles of BLOCK_N positions with an
online softmax (running max and sum in fp32), the flash-decoding recurrence. Works for any
head_dim (padded to a power of two inside the kernel) and any block_size; with grouped-query
attention query head h reads cache head h // GROUP. Runs on CUDA; under
TRITON_INTERPRET=1 it also runs on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
    stride_q_tok, stride_q_head,
    stride_k_block, stride_k_pos, stride_k_head,
    stride_table,
    stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    ctx = tl.load(lens_ptr + seq)
    d = tl.arange(0, DIM_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_tok + head * stride_q_head + d, mask=d_ok, other=0.0).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([DIM_P2], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < ctx
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=ok, other=0)
        row = block.to(tl.int64) * stride_k_block + (pos % BLOCK_SIZE) * stride_k_pos + kv_head * stride_k_head
        both = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)  # [BLOCK_N, DIM]
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / total
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode(
    q: torch.Tensor,  # [seqs, heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] (kv_heads divides heads)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [seqs, max_blocks] int
    context_lens: torch.Tensor,  # [seqs] int: cached tokens, the new one included
    block_n: int = 64,
) -> torch.Tensor:  # [seqs, heads, head_dim]
    seqs, heads, dim = q.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty_like(q)
    _paged_decode[(seqs, heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, dim**-0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=dim, DIM_P2=triton.next_power_of_2(dim), BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        GROUP=heads // k_cache.shape[2],
    )  # fmt: skip
    return out
