"""One attention interface over the paged KV cache; backends: torch (the reference, runs everywhere),
sdpa, cuda (flash-attn / Triton) and npu (torch_npu) behind the same interface.

A step's tokens from several sequences are packed into one [tokens, heads, head_dim] tensor. Each
sequence contributes `query_lens[i]` new tokens at the end of its `context_lens[i]` cached tokens
(prefill: query_len == context_len; decode: query_len == 1). The new K/V are written to the cache
at `slot_mapping` (slot = block * block_size + offset) and attention reads K/V through
`block_tables`.

Grouped-query attention: K/V (and the cache) may have fewer heads than the queries, a divisor of
them; query head h reads K/V head h // (heads / kv_heads), as transformers' repeat_kv arranges them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] int64: the cache slot of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [seqs] int64: tokens in the cache after this step (new ones included)
    query_lens: list[int]  # new tokens per sequence, in packing order
    context_lens_list: list[int]  # context_lens on the host
    block_size: int
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def is_prefill(self) -> bool:
        return any(q > 1 for q in self.query_lens)

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()` once per step: every layer's attention call reuses what the first one derived."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def _split(meta: AttentionMetadata) -> tuple[list[tuple[int, int, int, int]], list[int], list[int]]:
    prefills, decode_rows, decode_seqs = [], [], []
    start = 0
    for i, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
        if qlen == 1:
            decode_rows.append(start)
            decode_seqs.append(i)
        else:
            prefills.append((i, start, qlen, ctx))
        start += qlen
    return prefills, decode_rows, decode_seqs


def split_step(meta: AttentionMetadata) -> tuple[list[tuple[int, int, int, int]], list[int], list[int]]:
    """The step's prefilling sequences as (sequence, first packed row, query len, context len), and
    its decoding ones as (packed rows, sequences): kernels take the two kinds separately. Worked out
    once per step."""
    return meta.memo("split", lambda: _split(meta))


def repeat_kv(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """K or V with its heads (axis `dim`) repeated to the queries' `heads`: kv head j serves query heads
    j * group ... (j + 1) * group - 1 (transformers' repeat_kv). No copy when they are already equal."""
    kv_heads = t.shape[dim]
    return t if kv_heads == heads else t.repeat_interleave(heads // kv_heads, dim=dim)


class AttentionBackend(ABC):
    name = "attention"

    @property
    def graph_safe(self) -> bool:
        """Whether a step in which every sequence decodes runs on device tensors only (no host reads,
        no shapes from the host's context lengths): what a CUDA graph of the step needs."""
        return False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [tokens, heads, head_dim], already rotated and scaled
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,  # [tokens, kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [tokens, heads, head_dim]
        """Store k/v at their slots, then causal attention of q over each sequence's cached K/V."""


BACKENDS = ("torch", "sdpa", "cuda", "npu")


def default_backend(device: str) -> str:
    """npu on Ascend; on CUDA the Triton paged-decode backend when triton imports, else sdpa; the
    torch reference on cpu."""
    kind = device.split(":")[0]
    if kind == "npu":
        return "npu"
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except Exception:
            return "sdpa"
        return "cuda"
    return "torch"


def get_attention_backend(device: str, name: str | None = None) -> AttentionBackend:
    """The attention backend `name` (torch = the reference, sdpa = torch's fused
    scaled_dot_product_attention, cuda = flash-attn / SDPA prefill + Triton paged decode, npu =
    torch_npu's fused inference attention), or the device's default."""
    from ..errors import EngineError

    name = name or default_backend(device)
    if name == "torch":
        from .torch import TorchAttention

        return TorchAttention()
    if name == "sdpa":
        from .sdpa import SDPAAttention

        return SDPAAttention()
    if name == "cuda":
        from .cuda import CudaAttention

        return CudaAttention()
    if name == "npu":
        from .npu import NPUAttention

        return NPUAttention()
    raise EngineError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
