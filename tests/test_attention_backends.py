"""Protects the attention backends behind the one interface: the torch reference must be each
sequence's own attention however the step batches them, with as many K/V heads as query heads or
fewer (grouped-query and multi-query attention), and each backend must equal it on
the paged cache — fresh prefills, prefills after a cached prefix, and batched decodes through
shuffled block tables — and give the reference's greedy tokens inside the engine."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention import AttentionMetadata, default_backend, get_attention_backend
from engine.attention.torch import TorchAttention
from engine.errors import EngineError


def _step(query_lens, context_lens, block_size=4, heads=3, dim=8, num_blocks=40, seed=0, kv_heads=None):
    """Random q/k/v for one packed step and a cache whose earlier positions are already filled (K/V with
    kv_heads heads: grouped-query attention when fewer than heads)."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    blocks = list(range(num_blocks))
    random.Random(seed).shuffle(blocks)
    tables, slots = [], []
    for qlen, ctx in zip(query_lens, context_lens, strict=True):
        n = (ctx + block_size - 1) // block_size
        table, blocks = blocks[:n], blocks[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - qlen, ctx)]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor(context_lens),
        query_lens=list(query_lens),
        context_lens_list=list(context_lens),
        block_size=block_size,
    )
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, dim, generator=g)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=g) for _ in range(2))
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize(("heads", "kv_heads"), [(3, 3), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_the_torch_reference_is_each_sequences_own_attention(heads, kv_heads):
    # prefills batched by (query len, context len): two fresh 5-token ones together, one after a
    # cached prefix, one alone; decodes of different contexts padded to the longest
    query_lens, context_lens = [5, 1, 5, 7, 1, 5, 1], [5, 12, 9, 7, 3, 5, 6]
    q, k, v, kc, vc, meta = _step(query_lens, context_lens, heads=heads, kv_heads=kv_heads)
    of_head = torch.arange(heads) // (heads // kv_heads)  # the K/V head each query head reads
    out = TorchAttention().forward(q, k, v, kc, vc, meta)  # the caches now hold the new K/V too
    start = 0
    for i, (qlen, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        slots = torch.tensor([int(meta.block_tables[i, p // 4]) * 4 + p % 4 for p in range(ctx)])
        keys, values = kc.flatten(0, 1)[slots][:, of_head], vc.flatten(0, 1)[slots][:, of_head]  # [ctx, heads, dim]
        for j in range(qlen):  # query j sits at position ctx - qlen + j
            seen = ctx - qlen + j + 1
            scores = torch.einsum("hd,khd->hk", q[start + j], keys[:seen]) / 8**0.5
            want = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:seen])
            assert torch.allclose(out[start + j], want, atol=1e-6), (i, j)
        start += qlen


@pytest.mark.parametrize("kv_heads", [3, 1])
@pytest.mark.parametrize("name", ["sdpa"])
def test_backend_equals_the_torch_reference(name, kv_heads):
    # a fresh prefill, a decode, a prefill after a 9-token cached prefix, another decode
    q, k, v, kc, vc, meta = _step([7, 1, 5, 1], [7, 12, 14, 3], kv_heads=kv_heads)
    ref = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta)
    kc2, vc2 = kc.clone(), vc.clone()
    out = get_attention_backend("cpu", name).forward(q, k, v, kc2, vc2, meta)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    ref_kc = kc.clone()
    TorchAttention().forward(q, k, v, ref_kc, vc.clone(), meta)
    assert torch.equal(kc2, ref_kc)  # new K/V written to the same slots


def test_default_backend_per_device_and_unknown_names():
    assert get_attention_backend("cpu").name == "torch"
    assert default_backend("cuda:0") == "cuda"  # triton imports here (a torch dependency on Linux)
    assert default_backend("npu:1") == "npu"
    with pytest.raises(EngineError, match="available: torch, sdpa, cuda, npu"):
        get_attention_backend("cpu", "flash")


def test_sdpa_engine_gives_the_reference_tokens(qwen_vl_ckpt, qwen_vl_llm, photo_dir):
    photo = sorted(photo_dir.iterdir())[0]
    prompts = ["Hello there, how are you", f"Picture 1: <img>{photo}</img>\nWhat is this? Answer:",
               " ".join(["a longer text-only prompt"] * 30)]  # fmt: skip
    params = SamplingParams(max_tokens=12)
    want = [o.token_ids for o in qwen_vl_llm.generate(prompts, params, use_tqdm=False)]
    llm = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=128, max_model_len=1024,
              attention_backend="sdpa", progress=False)  # fmt: skip
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want  # from the prefix cache
    assert llm.block_manager.hit_tokens > 0


# ---- device backends: their argument building, checked on CPU against the kernels' documented meaning ----


def _bottom_right_causal(q, k, v):
    """Attention of q [tq, h, d] over k/v [tk, kv_h, d], query j at position tk - tq + j (flash-attn's
    causal alignment, torch_npu's sparse_mode 3 rightDownCausal); with fewer K/V heads, query heads
    0..g-1 read K/V head 0, and so on (flash-attn's documented GQA)."""
    group = q.shape[1] // k.shape[1]
    k, v = (torch.stack([t[:, h // group] for h in range(q.shape[1])], dim=1) for t in (k, v))
    tq, tk = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    future = torch.arange(tk)[None, :] > torch.arange(tk - tq, tk)[:, None]
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _flash_attn_varlen_emulation(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """flash_attn_varlen_func's documented semantics (causal aligned bottom right), in plain torch."""
    assert causal and cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.empty_like(q)
    for s in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        out[qs] = _bottom_right_causal(q[qs], k[ks], v[ks])
    return out


class _TorchNPUEmulation:
    """torch_npu.npu_fused_infer_attention_score as documented, for the two forms the npu backend uses."""

    def __init__(self):
        self.calls = []

    def npu_fused_infer_attention_score(self, query, key, value, **kw):
        self.calls.append(kw["input_layout"])
        heads, kv_heads, scale = kw["num_heads"], kw["num_key_value_heads"], kw["scale"]
        if kw["input_layout"] == "BSH":  # paged decode: key/value (blocknum, blocksize, H), block_table int32
            assert kw["block_table"].dtype == torch.int32 and query.shape[1] == 1
            n, _, hidden = query.shape
            dim = hidden // heads
            assert abs(scale - dim**-0.5) < 1e-12
            out = torch.empty_like(query)
            for b in range(n):
                length = kw["actual_seq_lengths_kv"][b]
                blocks = kw["block_table"][b, : -(-length // kw["block_size"])].long()
                k = key[blocks].reshape(-1, kv_heads, dim)[:length]
                v = value[blocks].reshape(-1, kv_heads, dim)[:length]
                out[b, 0] = _bottom_right_causal(query[b].view(1, heads, dim), k, v).reshape(hidden)
            return out, torch.zeros(1)
        assert kw["input_layout"] == "TND" and kw["sparse_mode"] == 3  # rightDownCausal
        mask = kw["atten_mask"]
        assert mask.shape == (2048, 2048) and mask.dtype == torch.bool and torch.equal(mask, mask.triu(1))
        out = torch.empty_like(query)
        q0 = k0 = 0
        for q1, k1 in zip(kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"], strict=True):  # cumulative
            out[q0:q1] = _bottom_right_causal(query[q0:q1], key[k0:k1], value[k0:k1])
            q0, k0 = q1, k1
        return out, torch.zeros(1)


def _check_against_reference(backend, kv_heads=None):
    # fresh prefills, decodes, a prefill after a 9-token cached prefix, contexts across many blocks
    q, k, v, kc, vc, meta = _step([7, 1, 5, 1, 1], [7, 12, 14, 3, 37], num_blocks=60, heads=4, kv_heads=kv_heads)
    ref = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta)
    out = backend.forward(q, k, v, kc.clone(), vc.clone(), meta)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_npu_backend_builds_the_documented_operator_calls(kv_heads):
    from engine.attention.npu import NPUAttention

    ops = _TorchNPUEmulation()
    _check_against_reference(NPUAttention(ops=ops), kv_heads)
    assert ops.calls == ["TND", "BSH"]  # one call for all prefills, one for all decodes


def test_npu_backend_is_importable_but_inactive_without_torch_npu():
    import importlib.util

    from engine.attention.npu import NPUAttention  # imports on any machine

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("an Ascend machine: torch_npu is installed")
    with pytest.raises(ImportError, match="torch_npu"):
        NPUAttention()


def _paged_decode_emulation(q, k_cache, v_cache, block_tables, context_lens):
    """The Triton kernel's contract: one query per sequence over its first context_lens[i] cached
    positions, read through block_tables[i]."""
    block_size, kv_heads, dim = k_cache.shape[1:]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(context_lens[b])
        blocks = block_tables[b, : -(-length // block_size)]
        k = k_cache[blocks].reshape(-1, kv_heads, dim)[:length]
        v = v_cache[blocks].reshape(-1, kv_heads, dim)[:length]
        out[b] = _bottom_right_causal(q[b : b + 1], k, v)[0]
    return out


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_cuda_backend_packs_varlen_prefill_and_paged_decode_inputs(kv_heads):
    from engine.attention.cuda import CudaAttention

    backend = CudaAttention(flash_attn_varlen=_flash_attn_varlen_emulation, paged_decode=_paged_decode_emulation)
    q, k, v, kc, vc, meta = _step([7, 1, 5, 1, 1], [7, 12, 14, 3, 37], num_blocks=60, kv_heads=kv_heads)
    ref = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta)
    for dtype in (torch.float16, torch.float32):  # fp32 prefill goes through SDPA (flash-attn is fp16/bf16)
        out = backend.forward(q.to(dtype), k.to(dtype), v.to(dtype), kc.to(dtype), vc.to(dtype), meta)
        assert torch.allclose(out.float(), ref, atol=1e-2 if dtype == torch.float16 else 1e-5)


TRITON_CHECK = """
import sys, torch
from engine.attention.cuda import CudaAttention
from engine.attention.torch import TorchAttention
sys.path.insert(0, {tests!r})
from test_attention_backends import _step
for dim, block_size, heads, kv_heads in ((8, 4, 3, 3), (24, 16, 3, 3), (128, 16, 3, 3), (16, 8, 4, 2), (8, 4, 6, 1)):
    q, k, v, kc, vc, meta = _step([1, 1, 6, 1], [1, 9, 6, 70], block_size=block_size, dim=dim, num_blocks=40,
                                  heads=heads, kv_heads=kv_heads)
    ref = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta)
    out = CudaAttention(flash_attn_varlen=None).forward(q, k, v, kc.clone(), vc.clone(), meta)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, (dim, block_size, err)
print("triton paged decode OK")
"""


def test_triton_paged_decode_kernel_in_the_interpreter():
    """The CUDA backend's Triton decode kernel, run by Triton's interpreter on CPU tensors."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = TRITON_CHECK.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton paged decode OK" in proc.stdout


def test_cuda_backend_falls_back_to_sdpa_decode_when_the_kernel_fails(caplog):
    from engine.attention.cuda import CudaAttention

    def broken(*args):
        raise RuntimeError("no kernel image for this GPU")

    backend = CudaAttention(flash_attn_varlen=None, paged_decode=broken)
    with caplog.at_level("WARNING", logger="engine"):
        _check_against_reference(backend)
    assert backend.paged_decode is None and "Triton paged decode failed (RuntimeError" in caplog.text
