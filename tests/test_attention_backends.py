"""Protects the attention backends behind the one interface: each must equal the torch reference on
the paged cache — fresh prefills, prefills after a cached prefix, and batched decodes through
shuffled block tables — and give the reference's greedy tokens inside the engine."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention import AttentionMetadata, get_attention_backend
from engine.attention.torch import TorchAttention
from engine.errors import EngineError


def _step(query_lens, context_lens, block_size=4, heads=3, dim=8, num_blocks=40, seed=0):
    """Random q/k/v for one packed step and a cache whose earlier positions are already filled."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, heads, dim, generator=g)
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
    q, k, v = (torch.randn(tokens, heads, dim, generator=g) for _ in range(3))
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("name", ["sdpa"])
def test_backend_equals_the_torch_reference(name):
    # a fresh prefill, a decode, a prefill after a 9-token cached prefix, another decode
    q, k, v, kc, vc, meta = _step([7, 1, 5, 1], [7, 12, 14, 3])
    ref = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta)
    kc2, vc2 = kc.clone(), vc.clone()
    out = get_attention_backend("cpu", name).forward(q, k, v, kc2, vc2, meta)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    ref_kc = kc.clone()
    TorchAttention().forward(q, k, v, ref_kc, vc.clone(), meta)
    assert torch.equal(kc2, ref_kc)  # new K/V written to the same slots


def test_default_backend_per_device_and_unknown_names():
    assert get_attention_backend("cpu").name == "torch"
    assert get_attention_backend("cuda:0").name == "sdpa"
    with pytest.raises(EngineError, match="available: torch, sdpa"):
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
