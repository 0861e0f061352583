"""Protects chunked prefill (enable_chunked_prefill, max_num_batched_tokens):

- the scheduler: a step's token budget is shared by the running decodes (first, one token each) and
  prompt chunks; a chunk never ends inside an image span, and a span larger than the budget goes in
  one chunk; enable_chunked_prefill=False keeps the one-step prefill;
- on the tiny random Qwen-VL (fp32, CPU): chunked prefill gives the greedy tokens and logprobs of an
  unchunked run (prompts with and without images, several at once, 3+ chunks, a budget smaller than
  an image span), with the prefix cache on and off, and with preemptions in the middle of a prefill;
- running decodes get a token in every step while a long prompt is prefilled over several steps;
- the config refuses a budget that running decodes alone could fill.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineArgs, EngineError, LLMEngine, RequestOutputKind, SamplingParams
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.models.base import ImageSpan
from engine.scheduler import Scheduler
from engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3)
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 10  # ~100 tokens


def _seq(i: int, n: int, images: list[ImageSpan] | None = None) -> Sequence:
    return Sequence(seq_id=i, request_id=f"s{i}", prompt="", prompt_token_ids=list(range(1, n + 1)),
                    params=SamplingParams(), end_ids=frozenset(), images=images or [])  # fmt: skip


def _run(sched: Scheduler) -> list[tuple[str, int, int]]:
    """One step as the engine runs it, without a model: (request, first, end) of every scheduled
    sequence; the K/V is then "computed", and a sequence that reached its last token gets one."""
    step = sched.schedule()
    chunks = [(s.request_id, s.num_cached, s.step_end) for s in step]
    for s in step:
        s.num_cached = s.step_end
        if s.chunk_end is None:
            s.output_token_ids.append(7)
    return chunks


def test_budget_is_shared_decodes_first_and_a_chunk_never_splits_an_image_span():
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4, prefix_caching=False), max_batch_size=4,
                      max_prefill_tokens=8, chunked_prefill=True)  # fmt: skip
    short = _seq(0, 3)
    sched.add(short)
    assert _run(sched) == [("s0", 0, 3)]
    long = _seq(1, 40, [ImageSpan(5, 20, key="img")])  # slots 5..24
    sched.add(long)
    assert _run(sched) == [("s0", 3, 4), ("s1", 0, 5)]  # 7 tokens left would cut into the span: it stops before
    assert _run(sched) == [("s0", 4, 5), ("s1", 5, 25)]  # the span (20 > the budget of 8) goes whole
    assert _run(sched) == [("s0", 5, 6), ("s1", 25, 32)]
    assert _run(sched) == [("s0", 6, 7), ("s1", 32, 39)]
    assert long.output_token_ids == []  # no token before the last chunk
    assert _run(sched) == [("s0", 7, 8), ("s1", 39, 40)]
    assert long.output_token_ids == [7]
    assert _run(sched) == [("s0", 8, 9), ("s1", 40, 41)]  # both decode


def test_a_span_that_does_not_fit_waits_when_another_prompt_chunk_is_in_the_step():
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4, prefix_caching=False), max_batch_size=4,
                      max_prefill_tokens=8, chunked_prefill=True)  # fmt: skip
    a, b = _seq(0, 6), _seq(1, 30, [ImageSpan(0, 20, key="img")])
    sched.add(a)
    sched.add(b)
    assert _run(sched) == [("s0", 0, 6)]  # b's span does not fit in the 2 tokens left: b waits
    assert _run(sched) == [("s0", 6, 7), ("s1", 0, 20)]  # b's chunk is the step's first: the whole span
    assert _run(sched) == [("s0", 7, 8), ("s1", 20, 27)]


def test_without_chunked_prefill_a_prompt_is_computed_in_one_step():
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4, prefix_caching=False), max_batch_size=4,
                      max_prefill_tokens=8)  # fmt: skip
    sched.add(_seq(0, 3))
    _run(sched)
    sched.add(_seq(1, 40, [ImageSpan(5, 20, key="img")]))
    assert _run(sched) == [("s0", 3, 4), ("s1", 0, 40)]


def test_the_budget_must_hold_a_decode_per_running_sequence():
    with pytest.raises(EngineError, match="max_num_batched_tokens.*max_num_seqs"):
        EngineConfig(model="m", dtype=torch.float32, device="cpu", max_batch_size=16, max_prefill_tokens=8)
    EngineConfig(model="m", dtype=torch.float32, device="cpu", max_batch_size=16, max_prefill_tokens=8,
                 enable_chunked_prefill=False)  # fmt: skip
    with pytest.raises(EngineError, match="enable_chunked_prefill"):
        EngineConfig(model="m", dtype=torch.float32, device="cpu", enable_chunked_prefill="yes")


# ---- on the tiny Qwen-VL ---------------------------------------------------------------------------


def _prompts(photo_dir) -> list[str]:
    photos = sorted(photo_dir.iterdir())
    return [
        f"Picture 1: <img>{photos[0]}</img>\nWhat is this? Answer:",
        LONG_TEXT,
        f"<img>{photos[1]}</img>{LONG_TEXT}Describe it:",
        "Hello there",
        f"Picture 1: <img>{photos[0]}</img>\nWhat colour is it? Answer:",  # the same image again
    ]


class ChunkLog:
    """Records, per step, each scheduled sequence's (request, first token, end) from the scheduler."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.steps = engine, []

    def __enter__(self):
        original = self.engine.scheduler.schedule

        def schedule():
            seqs = original()
            self.steps.append([(s.request_id, s.num_cached, s.step_end, s.images) for s in seqs])
            return seqs

        self.engine.scheduler.schedule = schedule
        return self

    def __exit__(self, *exc):
        del self.engine.scheduler.schedule

    def chunks_per_request(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            for rid, first, end, _ in step:
                counts[rid] = counts.get(rid, 0) + (end - first > 1)
        return counts


def _same(outs, ref) -> None:
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    for o, r in zip(outs, ref, strict=True):
        for lp, rp, token in zip(o.logprobs, r.logprobs, o.token_ids, strict=True):
            assert lp[token] == pytest.approx(rp[token], abs=1e-4)


@pytest.fixture(scope="module")
def unchunked(qwen_vl_ckpt, photo_dir):
    llm = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=200, max_batch_size=8,
              max_model_len=1024, enable_chunked_prefill=False, enable_prefix_caching=False, progress=False)  # fmt: skip
    return llm.generate(_prompts(photo_dir), GREEDY, use_tqdm=False)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_chunked_prefill_gives_the_tokens_of_an_unchunked_run(qwen_vl_ckpt, photo_dir, unchunked, prefix_caching):
    budget = 40  # an image span is 256 tokens
    llm = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=200, max_batch_size=8,
              max_model_len=1024, max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching,
              progress=False)  # fmt: skip
    prompts = _prompts(photo_dir)
    with ChunkLog(llm.llm_engine) as log:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _same(outs, unchunked)
    counts = log.chunks_per_request()
    assert max(counts.values()) >= 3, counts
    whole_spans = 0
    for step in log.steps:
        spans = 0  # chunks in this step that take a whole image span
        for _, first, end, images in step:
            for image in images:
                assert not image.start < end < image.start + image.length, "a chunk ended inside an image span"
                spans += first <= image.start and image.start + image.length <= end
        assert sum(end - first for _, first, end, _ in step) <= budget or spans == 1  # over only for a span
        whole_spans += spans
    assert whole_spans >= 2  # two distinct images (the third one may start from cached blocks)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)  # with the prefix cache: from the first run's blocks
    _same(outs, unchunked)
    assert (llm.block_manager.hit_tokens > 0) == prefix_caching


def test_preemption_in_the_middle_of_a_prefill_recomputes_the_same_tokens(qwen_vl_ckpt, photo_dir, unchunked):
    # 16-token blocks: an image request needs ~18 of the 24 blocks, so the batch runs out mid-prompt
    llm = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=24, max_batch_size=8,
              max_model_len=1024, max_num_batched_tokens=48, enable_prefix_caching=False, progress=False)  # fmt: skip
    sched = llm.scheduler
    mid_prefill = []
    original = sched._preempt

    def preempt(seq):
        mid_prefill.append(0 < seq.num_cached < len(seq.prompt_token_ids))
        original(seq)

    sched._preempt = preempt
    outs = llm.generate(_prompts(photo_dir), GREEDY, use_tqdm=False)
    assert any(mid_prefill), f"no preemption in the middle of a prefill: {mid_prefill}"
    _same(outs, unchunked)
    assert llm.block_manager.num_free == 24


@pytest.mark.parametrize("chunked", [True, False])
def test_running_decodes_get_a_token_every_step_while_a_long_prompt_is_prefilled(qwen_vl_ckpt, chunked):
    budget = 24
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=64, max_batch_size=4,
        max_model_len=1024, max_num_batched_tokens=budget, enable_chunked_prefill=chunked, progress=False))  # fmt: skip
    delta = SamplingParams(max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine.add_request("d0", "Hello there", delta)
    engine.add_request("d1", "1 2 3", delta)
    for _ in range(2):
        engine.step()  # both decoding now
    long = len(engine.prompt_token_ids(LONG_TEXT))
    engine.add_request("long", LONG_TEXT, SamplingParams(max_tokens=2, ignore_eos=True))
    steps = 0
    with ChunkLog(engine) as log:
        for steps in range(1, 21):
            outs = {o.request_id: o for o in engine.step()}
            assert len(outs["d0"].token_ids) == len(outs["d1"].token_ids) == 1, f"a decode stalled in step {steps}"
            if "long" in outs:
                break
    assert "long" in outs, "the long prompt never got its first token"
    if chunked:
        assert steps >= 3 and steps == -(-long // (budget - 2))  # 22 prompt tokens a step beside 2 decodes
        assert all(sum(end - first for _, first, end, _ in step) <= budget for step in log.steps)
    else:
        assert steps == 1  # the whole prompt in one step, beside the decodes


def test_a_chunked_prompt_keeps_the_ntk_factor_of_its_full_length(qwen_vl_ckpt_short):
    """seq_length 32: a ~60-token prompt gets dynamic-NTK alpha > 1 and log-n scaling, its 16-token
    chunks alone would get alpha 1; every chunk must rotate its keys with the whole prompt's factor."""
    from engine.models.qwen_vl.language import ntk_alpha

    prompt = "one two three four five six seven eight nine ten, and then eleven twelve thirteen fourteen " * 3
    kwargs = dict(dtype="float32", device="cpu", block_size=8, num_blocks=64, max_model_len=256, max_batch_size=4,
                  enable_prefix_caching=False, progress=False)  # fmt: skip
    plain = LLM(qwen_vl_ckpt_short, enable_chunked_prefill=False, **kwargs).generate(prompt, GREEDY, use_tqdm=False)
    chunked = LLM(qwen_vl_ckpt_short, max_num_batched_tokens=16, **kwargs)
    with ChunkLog(chunked.llm_engine) as log:
        out = chunked.generate(prompt, GREEDY, use_tqdm=False)
    n = len(plain[0].prompt_token_ids)
    assert ntk_alpha(n, 32) > 1 and ntk_alpha(16, 32) == 1, n
    assert log.chunks_per_request()["0"] >= 3
    _same(out, plain)
