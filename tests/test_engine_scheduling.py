"""Protects continuous batching and preemption: sequences join a running batch as others finish,
blocks are taken on demand, and when they run out the most recently admitted sequence is preempted
and later recomputed — never a crash, never different tokens (greedy, and seeded sampling)."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seq(i: int, prompt_len: int, max_tokens: int = 8, tokens: list[int] | None = None) -> Sequence:
    tokens = tokens if tokens is not None else list(range(1000 * i, 1000 * i + prompt_len))  # no shared prefix
    return Sequence(i, str(i), "", tokens, SamplingParams(max_tokens=max_tokens), frozenset())


def test_admission_is_fifo_and_bounded():
    sched = Scheduler(BlockManager(num_blocks=10, block_size=4), max_batch_size=2, max_prefill_tokens=100)
    seqs = [_seq(i, 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == seqs[:2]  # max_batch_size
    assert [len(s.block_table) for s in seqs] == [2, 2, 0]
    sched.finish(seqs[0])
    assert sched.schedule() == [seqs[1], seqs[2]]  # the freed place is taken at once


def test_prefill_token_budget_lets_a_lone_long_prompt_through():
    sched = Scheduler(BlockManager(num_blocks=100, block_size=4), max_batch_size=8, max_prefill_tokens=10)
    long, short = _seq(0, 30), _seq(1, 5)
    sched.add(long)
    sched.add(short)
    assert sched.schedule() == [long]  # alone over budget; the next one waits for the next step
    assert sched.schedule() == [long, short]


def test_a_request_sharing_a_block_being_computed_waits_one_step_and_reuses_it():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=15)
    head = [5, 6, 7, 8, 9, 10, 11, 12]  # two full blocks, e.g. an image span
    a, b, c, d = (_seq(0, 10, tokens=head + [1, 2]), _seq(1, 10, tokens=head + [3, 4]), _seq(2, 5),
                  _seq(3, 4))  # fmt: skip
    for s in (a, b, c, d):
        sched.add(s)
    # b would compute a's blocks a second time: it waits; c goes ahead; d would pass the prefill budget
    assert sched.schedule() == [a, c]
    assert list(sched.waiting) == [b, d]
    _grow(a, c)
    for s in (a, c):
        bm.register(s)
    # b now starts from a's two cached blocks: 2 new tokens count against the budget, so d fits too
    assert sched.schedule() == [a, c, b, d]
    assert b.num_cached == 8 and b.block_table[:2] == a.block_table[:2] and bm.hit_tokens == 8


def _grow(*seqs: Sequence) -> None:
    """As after a step: the prompt is in the cache and one token was generated."""
    for s in seqs:
        s.num_cached = s.num_tokens
        s.output_token_ids.append(7)


def test_preemption_takes_the_most_recently_admitted_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=100)
    a, b, c, d = _seq(0, 4), _seq(1, 4), _seq(2, 4), _seq(3, 4)
    for s in (a, b, c, d):
        sched.add(s)
    assert sched.schedule() == [a, b, c, d]  # one block each, none free
    _grow(a, b, c, d)  # each now needs a second block
    assert sched.schedule() == [a, b]  # a preempts d, b preempts c; nothing new is admitted
    assert list(sched.waiting) == [c, d] and c.status is d.status is Status.WAITING
    assert c.block_table == [] and c.num_cached == 0 and c.output_token_ids == [7]  # recomputed later
    assert sched.num_preemptions == 2 and bm.num_free == 0


def test_a_sequence_can_be_its_own_victim():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=100)
    a, b = _seq(0, 4), _seq(1, 4)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    _grow(a, b)
    assert sched.schedule() == [a]  # a takes the free block; b, the newest, gives way
    assert list(sched.waiting) == [b] and bm.num_free == 1
    sched.finish(a)
    assert sched.schedule() == [b] and len(b.block_table) == 2  # recomputed: prompt + its token


def test_preemption_gives_the_tokens_of_an_uninterrupted_run(qwen_vl_ckpt, qwen_vl_llm, photo_dir):
    photos = sorted(photo_dir.iterdir())
    prompts = [
        f"Picture 1: <img>{photos[0]}</img>\nWhat is this? Answer:",
        "The quick brown fox jumps over the lazy dog",
        "Describe a sunny day at the beach in three sentences.",
        "1 2 3 4 5 6 7 8 9 10",
        f"<img>{photos[1]}</img>What colour is it?",
        "Write a haiku about autumn leaves falling.",
    ]
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    sampled = [SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, top_p=0.9, seed=i) for i in range(6)]
    plenty = qwen_vl_llm.generate(prompts, greedy, use_tqdm=False)
    plenty_sampled = qwen_vl_llm.generate(prompts, sampled, use_tqdm=False)
    # 16-token blocks: an image request (~270 + 40 tokens) needs 20 of the 24 blocks; the prompts are
    # admitted while they fit, then their growth runs the cache out
    tight = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=24, max_batch_size=6,
                max_model_len=1024, progress=False)  # fmt: skip
    outs = tight.generate(prompts, greedy, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0, "the cache was meant to be too small for the batch"
    assert [o.token_ids for o in outs] == [o.token_ids for o in plenty]
    assert [o.text for o in outs] == [o.text for o in plenty]
    before = tight.scheduler.num_preemptions
    outs = tight.generate(prompts, sampled, use_tqdm=False)
    assert tight.scheduler.num_preemptions > before
    assert [o.token_ids for o in outs] == [o.token_ids for o in plenty_sampled]
    assert tight.block_manager.num_free == 24


# ---- vision feature cache --------------------------------------------------------------------------


def test_feature_cache_is_lru_within_its_byte_budget():
    import torch

    from engine.image_cache import FeatureCache, pixel_key

    cache = FeatureCache(max_bytes=3 * 4 * 10)  # room for three [10] fp32 tensors
    for i in range(3):
        cache.put(f"k{i}", torch.full((10,), float(i)))
    assert cache.get("k0") is not None  # k0 is now the most recently used
    cache.put("k3", torch.zeros(10))
    assert cache.get("k1") is None and cache.get("k0") is not None and cache.get("k3") is not None
    assert cache.bytes == 3 * 40 and (cache.hits, cache.misses) == (3, 1)
    a, b = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    b[1, 2, 3] = 1e-6
    assert pixel_key(a) == pixel_key(a.clone()) != pixel_key(b)  # content, not identity


def test_vision_tower_runs_once_per_distinct_image(qwen_vl_ckpt, photo_dir, tmp_path):
    import shutil

    photos = sorted(photo_dir.iterdir())
    copy = tmp_path / "same-picture-other-name.jpg"
    shutil.copy(photos[0], copy)
    prompts = [f"<img>{photos[0]}</img>What is this? Answer:", f"<img>{copy}</img>What colour is it? Answer:",
               f"<img>{photos[1]}</img>What is this? Answer:", f"<img>{photos[0]}</img>Is it big? Answer:"]  # fmt: skip
    params = SamplingParams(max_tokens=6)
    kwargs = dict(dtype="float32", device="cpu", block_size=16, num_blocks=128, max_model_len=512, progress=False)
    uncached = LLM(qwen_vl_ckpt, image_cache_gb=0, **kwargs).generate(prompts, params, use_tqdm=False)

    llm = LLM(qwen_vl_ckpt, **kwargs)
    encoded = []
    encode = llm.model.encode_images
    llm.model.encode_images = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    outs = llm.generate(prompts[:2], params, use_tqdm=False) + llm.generate(prompts[2:], params, use_tqdm=False)
    assert encoded == [1, 1]  # photo 0 (and its copy: same pixels) once, photo 1 once; the 4th is a hit
    assert [o.token_ids for o in outs] == [o.token_ids for o in uncached]
    # the copy waited one step for photo 0's blocks; it and the 4th prompt took the span's last slot,
    # which lies in a block shared with the question text, from the feature cache
    assert llm.runner.image_cache.hits == 2


# ---- prefix cache ----------------------------------------------------------------------------------


def test_prefix_cache_reuses_shared_heads_and_never_mixes_images(qwen_vl_ckpt, photo_dir, tmp_path):
    import shutil

    photos = sorted(photo_dir.iterdir())
    renamed = tmp_path / "another-name-for-the-same-picture.jpg"
    shutil.copy(photos[0], renamed)
    head = "You are a careful assistant. Read the question and answer with one word. " * 3
    waves = [
        [head + "Question: what is red?", head + "Question: what is blue?"],  # the 2nd waits a step, reuses the head
        [head + "Question: what is red?"] * 2,  # both reuse the head the first wave registered
        [f"Picture 1: <img>{photos[0]}</img>\nWhat is in the picture?"],
        [f"Picture 1: <img>{photos[0]}</img>\nWhat is shown in this picture? Answer:",  # shares part of a span
         f"Picture 1: <img>{photos[1]}</img>\nWhat is in the picture?",  # same text, another image
         f"Picture 1: <img>{renamed}</img>\nWhat is in the picture?"],  # same pixels, another path
    ]  # fmt: skip
    params = SamplingParams(max_tokens=8)
    kwargs = dict(dtype="float32", device="cpu", block_size=16, max_model_len=512, max_batch_size=4, progress=False)
    plain = LLM(qwen_vl_ckpt, num_blocks=128, enable_prefix_caching=False, **kwargs)
    # 80 blocks: the waves take ~92 in all, so later ones hand out blocks that earlier ones registered
    cached = LLM(qwen_vl_ckpt, num_blocks=80, **kwargs)
    bm = cached.block_manager
    hits = []
    for prompts in waves:
        before = bm.hit_tokens
        want = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
        assert [o.token_ids for o in cached.generate(prompts, params, use_tqdm=False)] == want
        hits.append(bm.hit_tokens - before)
    assert hits[0] >= 48  # the second prompt of the first wave: the head the first one computed
    assert hits[1] >= 2 * 48  # the shared head (at least 3 full 16-token blocks) of both prompts
    # the renamed copy and the other question about the same picture reuse the image's blocks (the
    # latter up to where its text differs, inside the span's last block); another image shares
    # nothing, its first block already holds image slots
    assert 2 * 240 <= hits[3] < 3 * 240
    assert bm.num_free == 80 and all(c == 0 for c in bm.ref_count)
    assert all(bm.block_key[b] == k for k, b in bm.cached.items())  # no stale entry points to a reused block


def test_prefix_cache_never_shares_keys_rotated_with_another_ntk_factor(qwen_vl_ckpt_short):
    """seq_length 32: a 40-token prompt gets dynamic-NTK alpha 3, a 20-token prompt with the same head
    alpha 1. The short one's first block holds keys rotated with alpha 1; reusing it for the long one
    would change its logits (the original recomputes every key with the prompt's own alpha)."""
    from engine.models.qwen_vl.language import ntk_alpha

    head = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    short, long = head + " end", head + " and then seventeen eighteen nineteen twenty, twenty-one twenty-two twenty-three" * 2
    kwargs = dict(dtype="float32", device="cpu", block_size=16, num_blocks=32, max_model_len=256, progress=False)
    params = SamplingParams(max_tokens=4, logprobs=0)
    plain = LLM(qwen_vl_ckpt_short, enable_prefix_caching=False, **kwargs).generate(long, params, use_tqdm=False)[0]
    cached = LLM(qwen_vl_ckpt_short, **kwargs)
    first = cached.generate(short, params, use_tqdm=False)[0]
    lengths = len(first.prompt_token_ids), len(plain.prompt_token_ids)
    assert lengths[0] > 16 and ntk_alpha(lengths[0], 32) == 1 and ntk_alpha(lengths[1], 32) > 1, lengths
    assert plain.prompt_token_ids[:16] == first.prompt_token_ids[:16]  # one full block in common
    out = cached.generate(long, params, use_tqdm=False)[0]
    assert out.token_ids == plain.token_ids
    for got, want in zip(out.logprobs, plain.logprobs, strict=True):
        assert got.keys() == want.keys()
        assert max(abs(got[t] - want[t]) for t in got) < 1e-5
