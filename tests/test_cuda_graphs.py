"""Protects the decode graphs (engine/cuda_graphs.py) everywhere but the capture itself, which needs a
GPU: the engine is built with an eager stand-in for `cuda_capture` (it runs the same static-buffer
forward on CPU) and a graph-safe attention backend, the cuda backend with its Triton paged-decode
kernel emulated in torch (in-process) or run by Triton's interpreter (a subprocess):

- every decode-only step replays its bucket's forward (1, 2, 4, then multiples of 8), prefills and
  image steps run eagerly, and the greedy tokens and logprobs equal the eager engine's, with sequences
  whose NTK factors and log-n scaling differ (seq_length 32) and batches padded to their bucket;
- the padding rows write only the scratch block: every block the sequences used holds the eager
  engine's K/V;
- on CPU, or with enforce_eager, nothing is captured; enforce_eager must be a bool; benchmarks/cuda_graphs.py
  says it needs a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.cuda_graphs as cuda_graphs
import engine.model_runner as model_runner
from engine import LLM, EngineError, SamplingParams
from engine.attention.cuda import CudaAttention
from engine.cuda_graphs import capture_sizes

sys.path.insert(0, str(Path(__file__).parent))
from test_attention_backends import _paged_decode_emulation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a short one",
    " ".join(["a prompt longer than the thirty two token seq_length of this checkpoint"] * 4),
    "a middle length prompt that passes thirty two tokens once it is long enough to do so here",
]


def eager_capture(forward, pool):
    """The stand-in for cuda_capture: one warm-up run, then every replay runs the same forward."""
    forward()
    return forward, pool


def _emulated_cuda_backend(device, name=None):
    return CudaAttention(flash_attn_varlen=None, paged_decode=_paged_decode_emulation)


def _llm(ckpt, **kwargs):
    return LLM(ckpt, dtype="float32", device="cpu", max_batch_size=5, max_model_len=512, num_blocks=64,
               block_size=8, progress=False, **kwargs)  # fmt: skip


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture_for", lambda device: eager_capture)
    monkeypatch.setattr(model_runner, "get_attention_backend", _emulated_cuda_backend)


def _run(llm, prompts):
    params = SamplingParams(max_tokens=6, min_tokens=6, logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.token_ids), o.outputs[0].cumulative_logprob) for o in outs]


def test_capture_sizes_are_vllms_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]


def test_decode_steps_replay_graphs_and_give_the_eager_tokens(graphs_on_cpu, qwen_vl_ckpt_short, photo_dir):
    prompts = [*PROMPTS, [{"image": str(photo_dir / "chelsea.jpg")}, {"text": "What is it?"}]]
    eager = _llm(qwen_vl_ckpt_short, enforce_eager=True)
    assert eager.llm_engine.runner.graphs is None
    graphed = _llm(qwen_vl_ckpt_short)
    graphs = graphed.llm_engine.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8]

    kinds = []  # per step: did every sequence decode one token (and no image)?
    execute = graphed.llm_engine.runner.execute

    def spy(step, seqs):
        kinds.append(step.input_ids.shape[0] == len(seqs) and not step.images)
        return execute(step, seqs)

    graphed.llm_engine.runner.execute = spy
    for subset in (prompts[:3], prompts, prompts[1:2]):  # 3 rows padded to 4; 4; 1
        before = graphs.replays
        kinds.clear()
        got, want = _run(graphed, subset), _run(eager, subset)
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        assert graphs.replays - before == sum(kinds) > 0 and not all(kinds)  # decodes replayed, prefills not


def test_padding_rows_write_only_the_scratch_block(graphs_on_cpu, qwen_vl_ckpt_short):
    eager, graphed = _llm(qwen_vl_ckpt_short, enforce_eager=True), _llm(qwen_vl_ckpt_short)
    assert [t for t, _ in _run(graphed, PROMPTS)] == [t for t, _ in _run(eager, PROMPTS)]  # 3 sequences: bucket 4
    used = graphed.llm_engine.block_manager.num_blocks  # the scratch block comes after these
    for (k1, v1), (k2, v2) in zip(graphed.llm_engine.runner.kv_caches, eager.llm_engine.runner.kv_caches, strict=True):
        assert k1.shape[0] == used + 1 and k2.shape[0] == used
        assert torch.allclose(k1[:used], k2, atol=1e-5) and torch.allclose(v1[:used], v2, atol=1e-5)
        assert k1[used].abs().sum() > 0  # the padding rows wrote there


def test_nothing_is_captured_on_cpu_or_with_enforce_eager(monkeypatch, qwen_vl_ckpt_short):
    assert cuda_graphs.capture_for("cpu") is None and cuda_graphs.capture_for("cuda:0") is cuda_graphs.cuda_capture
    llm = _llm(qwen_vl_ckpt_short)
    assert llm.llm_engine.runner.graphs is None and llm.llm_engine.runner.kv_caches[0][0].shape[0] == 64
    monkeypatch.setattr(cuda_graphs, "capture_for", lambda device: eager_capture)
    assert _llm(qwen_vl_ckpt_short, enforce_eager=True).llm_engine.runner.graphs is None
    # a backend that decodes with host work (torch, the CPU default) is not captured either
    assert _llm(qwen_vl_ckpt_short).llm_engine.runner.graphs is None
    with pytest.raises(EngineError, match="enforce_eager must be true or false"):
        _llm(qwen_vl_ckpt_short, enforce_eager="no")


TRITON_GRAPHS = """
import sys, torch
sys.path.insert(0, {tests!r})
import engine.cuda_graphs as cuda_graphs
from engine import LLM, SamplingParams
from test_cuda_graphs import PROMPTS, eager_capture, _run
cuda_graphs.capture_for = lambda device: eager_capture
kw = dict(dtype="float32", device="cpu", max_batch_size=3, max_model_len=256, num_blocks=32, block_size=16,
          progress=False)
graphed = LLM({ckpt!r}, attention_backend="cuda", **kw)
assert graphed.llm_engine.runner.graphs is not None
got = _run(graphed, PROMPTS[::2])
want = _run(LLM({ckpt!r}, attention_backend="torch", **kw), PROMPTS[::2])
assert [t for t, _ in got] == [t for t, _ in want], (got, want)
assert graphed.llm_engine.runner.graphs.replays > 0 and graphed.llm_engine.runner.attention.paged_decode is not None
print("triton decode graphs OK")
"""


def test_decode_graphs_with_the_triton_kernel_in_the_interpreter(qwen_vl_ckpt_short):
    """The real Triton paged-decode kernel inside the static-buffer forward, padding rows included (2
    sequences in bucket 2, then 1), against the torch reference."""
    pytest.importorskip("triton")
    code = TRITON_GRAPHS.format(tests=str(Path(__file__).parent), ckpt=str(qwen_vl_ckpt_short))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton decode graphs OK" in proc.stdout


def test_the_benchmark_says_it_needs_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py"), "--shape", "tiny"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().endswith("needs a CUDA GPU (decode graphs exist only there)")
