"""Protects tensor parallelism, on CPU with torchrun, gloo and 2 processes (bounded: a collective
timeout of 60 s and a 300 s limit on the run):

- tp 2 gives tp 1's greedy tokens for text, one image and two images with preemption, with every
  step's logits within 1e-5 (fp32), and the same seeded samples and logprobs; both ranks agree;
- each rank holds its slice of every language-model weight (q, k and v split by head, row-parallel
  layers by input, the vocabulary by rows), about half the language model's bytes, its half of the
  KV heads; the vision tower whole;
- tensor_parallel_size that does not divide the model, or > 1 without torchrun, is one clear error;
- `linear`, what every language-model layer computes with: F.linear's result (within float32
  rounding) for every row count, both kernels of one float32 row on CPU, with and without bias,
  contiguous; other dtypes are F.linear's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineError
from engine.distributed import GEMV_MIN_IN_FEATURES, SMALL_WEIGHT, linear

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
from dist_worker import REPO, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def runs(qwen_vl_ckpt, photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "result"
    done = torchrun(2, str(REPO / "tests" / "dist_worker.py"), str(qwen_vl_ckpt), str(photo_dir), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    for r in range(2):  # 0.2 GB each (every step's logits and the rank's weights), now in memory
        Path(f"{out}.rank{r}.pt").unlink()
    return dist_worker.run(str(qwen_vl_ckpt), str(photo_dir), 1), ranks


def test_tp2_gives_tp1_tokens_and_logits(runs):
    one, ranks = runs
    assert one["preemptions"] > 0 and all(r["preemptions"] > 0 for r in ranks)
    for r in ranks:
        assert r["greedy"] == one["greedy"] and r["texts"] == one["texts"]
        for got, want in zip(r["logits"], one["logits"], strict=True):
            assert got.shape == want.shape
            assert (got - want).abs().max().item() < 1e-5
        assert r["sampled"] == one["sampled"]
        for got, want in zip(r["logprobs"], one["logprobs"], strict=True):
            for g, w in zip(got, want, strict=True):
                assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-4 for t in g)
    assert ranks[0]["logits"][1].equal(ranks[1]["logits"][1])  # gathered logits: the same bits on both ranks


def test_each_rank_holds_its_slice(runs, qwen_vl_ckpt):
    one, ranks = runs
    full = one["params"]
    heads, head_dim = 4, 32  # tiny_config: hidden 128, 4 heads
    proj = heads * head_dim
    for rank, r in enumerate(ranks):
        p = r["params"]
        c_attn = full["transformer.h.0.attn.c_attn.weight"]
        mine = torch.cat([c_attn[part * proj + rank * proj // 2 :][: proj // 2] for part in range(3)])
        assert torch.equal(p["transformer.h.0.attn.c_attn.weight"], mine)  # q, k and v: heads 2r, 2r+1
        bias = full["transformer.h.1.attn.c_attn.bias"]
        assert torch.equal(p["transformer.h.1.attn.c_attn.bias"],
                           torch.cat([bias[part * proj + rank * proj // 2 :][: proj // 2] for part in range(3)]))
        half = full["transformer.h.0.mlp.c_proj.weight"].shape[1] // 2
        assert torch.equal(p["transformer.h.0.mlp.c_proj.weight"],
                           full["transformer.h.0.mlp.c_proj.weight"][:, rank * half : (rank + 1) * half])
        assert torch.equal(p["transformer.h.1.mlp.w2.weight"], full["transformer.h.1.mlp.w2.weight"].chunk(2)[rank])
        assert torch.equal(p["transformer.wte.weight"], full["transformer.wte.weight"].chunk(2)[rank])
        assert torch.equal(p["lm_head.weight"], full["lm_head.weight"].chunk(2)[rank])
        assert torch.equal(p["transformer.ln_f.weight"], full["transformer.ln_f.weight"])  # norms whole
        assert all(torch.equal(v, full[k]) for k, v in p.items() if ".visual." in k)  # vision replicated
        assert r["lm_bytes"] == pytest.approx(one["lm_bytes"] / 2, rel=0.01)
        assert r["kv_shape"][2] == one["kv_shape"][2] // 2  # its KV heads only
        assert r["num_blocks"] == one["num_blocks"]


def test_sizes_that_do_not_divide_the_model_are_refused(qwen_vl_ckpt):
    with pytest.raises(EngineError, match=r"tensor_parallel_size=3 does not divide num_attention_heads 4, vocab_size "
                                          r"151936, the MLP width \(intermediate_size / 2\) 256; use one of 1, 2, 4"):
        LLM(qwen_vl_ckpt, device="cpu", tensor_parallel_size=3, progress=False)


def test_more_than_one_device_without_torchrun_says_how_to_launch(qwen_vl_ckpt):
    with pytest.raises(EngineError, match=r"tensor_parallel_size=2 runs one process per device: launch with "
                                          r"`torchrun --nproc_per_node 2"):
        LLM(qwen_vl_ckpt, device="cpu", tensor_parallel_size=2, progress=False)


@pytest.mark.parametrize("env, device, message", [
    ({"WORLD_SIZE": "two", "RANK": "0"}, "cpu", r"WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "cpu", r"LOCAL_RANK='x' is not a whole number"),
    # more processes on a node than devices: one line, not CUDA's "invalid device ordinal"
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "cuda", r"LOCAL_RANK=1 has no cuda device: 1 visible"),
])  # fmt: skip
def test_a_broken_torchrun_environment_is_one_line(monkeypatch, env, device, message):
    import torch

    from engine.distributed import init_tensor_parallel

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(EngineError, match=message):
        init_tensor_parallel(2, device)


@pytest.mark.parametrize("in_features", [256, GEMV_MIN_IN_FEATURES])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_f_linear(in_features, rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    out = SMALL_WEIGHT // in_features + 300  # a weight the W x^T path takes
    x, w, b = (torch.randn(*s, generator=g) for s in ((rows, in_features), (out, in_features), (out,)))
    bias = b if with_bias else None
    y = linear(x, w, bias)
    assert y.shape == (rows, out) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    x16, w16 = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(x16, w16), torch.nn.functional.linear(x16, w16))
