"""Protects what `LLM.generate` computes and returns, on the tiny random Qwen-VL (fp32, CPU):

- paged attention: K/V read back through shuffled block tables give the logits of a dense, cache-free
  recomputation (whole model, and TorchAttention alone on mixed prefill / chunk / decode batches);
- batch invariance: greedy tokens of a mixed batch (text, one image, two images) equal each prompt's
  tokens alone, also when the scheduler admits in waves (small max_batch_size or a small KV cache);
- the prompt forms (raw string, parts, multi_modal_data with a PIL image, chat) and ChatML layout;
- sampling: seeds, greedy equivalences, repetition penalty (HF semantics), min_tokens, logprobs;
- stops (strings, token ids, end tokens, max_tokens, ignore_eos), errors, and timings.
"""

from __future__ import annotations

import math
import random
import re
from collections import OrderedDict, defaultdict

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.attention import AttentionBackend, AttentionMetadata
from engine.attention.torch import TorchAttention
from engine.block_manager import blocks_for
from engine.errors import EngineError
from engine.models.qwen_vl.language import ntk_alpha
from engine.models.qwen_vl.processor import preprocess
from engine.models.qwen_vl.tokenizer import IMAGE_TAGS, IMG_SPAN
from engine.sampling import apply_repetition_penalty, mask_end_tokens
from engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=6)
TEXT = "The quick brown fox jumps over the lazy dog"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(llm, prompts, params=GREEDY, **kw):
    return llm.generate(prompts, params, use_tqdm=False, **kw)


class Recorder:
    """Wraps `llm.runner.run` while active: keeps every step's logits per sequence (after `bias`,
    i.e. what the sampler saw), each sequence's block table and each step's batch size."""

    def __init__(self, llm, bias=None):
        self.llm, self.bias = llm, bias
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tables: dict[str, list[int]] = {}
        self.batch_sizes: list[tuple[int, bool]] = []

    def __enter__(self):
        original = self.llm.runner.run

        def run(seqs, *args, **kwargs):
            if args or kwargs:  # not the one-row-per-sequence call `LLMEngine.step` makes
                return original(seqs, *args, **kwargs)
            prefill = any(s.num_tokens - s.num_cached > 1 for s in seqs)  # a prompt is computed in this step
            logits = original(seqs).clone()
            self.batch_sizes.append((len(seqs), prefill))
            for row, seq in zip(logits, seqs, strict=True):
                if self.bias is not None:
                    self.bias(seq, row)
                self.logits[seq.request_id].append(row.clone())
                self.tables[seq.request_id] = list(seq.block_table)
            return logits

        self.llm.runner.run = run
        return self

    def __exit__(self, *exc):
        del self.llm.runner.run

    def steps(self, out) -> torch.Tensor:
        return torch.stack(self.logits[out.request_id])


class DenseCausalAttention(AttentionBackend):
    """No cache at all: one sequence's full causal attention over the step's own K/V (SDPA)."""

    name = "dense"

    def forward(self, q, k, v, k_cache, v_cache, meta):
        assert len(meta.query_lens) == 1 and meta.query_lens == meta.context_lens_list
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, tokens, dim]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)


@torch.inference_mode()
def dense_logits(llm, prompt_ids, images, generated) -> torch.Tensor:
    """The logits before each generated token, from one cache-free forward over prompt + generated[:-1]
    (the rotary NTK factor is fixed from the prompt length, as the engine and the original do)."""
    cfg = llm.model_config
    ids = list(prompt_ids) + list(generated[:-1])
    n = len(ids)
    pos = torch.arange(n)
    alpha = ntk_alpha(len(prompt_ids), cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
    context = llm.model.step_context(pos, torch.zeros(n, dtype=torch.long), [alpha])
    meta = AttentionMetadata(torch.empty(0), torch.empty(0), torch.tensor([n]), [n], [n], 0)
    features = rows = None
    starts = [i for i, t in enumerate(prompt_ids) if t == llm.tokenizer.img_start_id]
    assert len(starts) == len(images)
    if images:
        features = llm.model.encode_images(preprocess(images, cfg.visual.image_size)).flatten(0, 1)
        rows = torch.tensor([s + 1 + j for s in starts for j in range(IMG_SPAN)])
    caches = [(None, None)] * cfg.num_hidden_layers
    hidden = llm.model(torch.tensor(ids), caches, meta, context, DenseCausalAttention(), features, rows)
    return llm.model.compute_logits(hidden[len(prompt_ids) - 1 :]).float()


@pytest.fixture(scope="module")
def photos(photo_dir):
    return {p.stem: str(p) for p in sorted(photo_dir.iterdir())}


# ---- paged attention vs contiguous K/V ------------------------------------------------------------


def _check_paged_against_dense(llm, prompts, images, max_tokens):
    gen(llm, "move the free list along first", SamplingParams(max_tokens=3))
    saved = list(llm.block_manager.free_blocks)
    shuffled = saved[:]
    random.Random(0).shuffle(shuffled)
    llm.block_manager.free_blocks = OrderedDict.fromkeys(shuffled)
    try:
        with Recorder(llm) as rec:
            outs = gen(llm, prompts, SamplingParams(max_tokens=max_tokens))
    finally:
        llm.block_manager.free_blocks = OrderedDict.fromkeys(saved)
    for out, imgs in zip(outs, images, strict=True):
        assert len(out.token_ids) == max_tokens
        table = rec.tables[out.request_id]
        assert len(table) >= 3
        assert table != list(range(table[0], table[0] + len(table))), "block table should not be contiguous"
        ref = dense_logits(llm, out.prompt_token_ids, imgs, out.token_ids)
        paged = rec.steps(out)
        assert paged.shape == ref.shape
        diff = (paged - ref).abs().max().item()
        assert diff < 1e-4, f"paged vs dense logits differ by {diff}"
        assert ref.argmax(-1).tolist() == out.token_ids


def test_paged_kv_matches_dense_recomputation(qwen_vl_llm, photos):
    prompts = [
        " ".join(["paged attention reads keys and values through block tables"] * 4),
        [{"image": photos["astronaut"]}, {"text": "What is in the picture?"}],
    ]
    _check_paged_against_dense(qwen_vl_llm, prompts, [[], [photos["astronaut"]]], max_tokens=10)


def test_paged_kv_matches_dense_past_seq_length(qwen_vl_ckpt_short, photos):
    """seq_length 32: the prompts pass it, so dynamic NTK (alpha > 1) and log-n scaling are active."""
    llm = LLM(
        qwen_vl_ckpt_short,
        dtype="float32",
        device="cpu",
        block_size=16,
        num_blocks=64,
        max_model_len=1024,
        max_batch_size=4,
        progress=False,
    )
    prompts = [
        " ".join(["a prompt longer than the thirty two token seq_length of this checkpoint"] * 4),
        [{"image": photos["coffee"]}, {"text": "Describe it."}],
    ]
    assert ntk_alpha(len(llm.tokenizer.encode(prompts[0])), 32) > 1
    _check_paged_against_dense(llm, prompts, [[], [photos["coffee"]]], max_tokens=6)


def test_torch_attention_matches_dense_with_shuffled_block_tables():
    torch.manual_seed(0)
    heads, dim, block_size, num_blocks = 3, 8, 4, 16
    tables = {"A": [11, 0], "B": [5, 14, 2, 9], "C": [7, 3], "D": [12]}
    total = {"A": 8, "B": 14, "C": 5, "D": 4}
    q_all, k_all, v_all = ({s: torch.randn(n, heads, dim) for s, n in total.items()} for _ in range(3))
    k_cache = torch.zeros(num_blocks, block_size, heads, dim)
    v_cache = torch.zeros_like(k_cache)
    attn = TorchAttention()

    def dense(s, start, end):  # float64 reference: queries start..end-1 over keys 0..end-1
        q, k, v = (t[s][:end].double().transpose(0, 1) for t in (q_all, k_all, v_all))
        scores = q[:, start:end] @ k.transpose(1, 2) / math.sqrt(dim)
        future = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
        return (scores.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(0, 1)

    def step(chunks):  # chunks: (seq, start, end) = new tokens start..end-1
        order = list(chunks)
        width = max(len(tables[s]) for s, _, _ in order)
        slots = [
            tables[s][p // block_size] * block_size + p % block_size for s, a, b in order for p in range(a, b)
        ]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([tables[s] + [0] * (width - len(tables[s])) for s, _, _ in order]),
            context_lens=torch.tensor([b for _, _, b in order]),
            query_lens=[b - a for _, a, b in order],
            context_lens_list=[b for _, _, b in order],
            block_size=block_size,
        )
        q, k, v = (torch.cat([t[s][a:b] for s, a, b in order]) for t in (q_all, k_all, v_all))
        out = attn.forward(q, k, v, k_cache, v_cache, meta)
        ref = torch.cat([dense(s, a, b) for s, a, b in order])
        assert (out.double() - ref).abs().max().item() < 1e-5, chunks
        for s, a, b in order:  # the new K/V sit at their slots
            for p in range(a, b):
                blk, off = tables[s][p // block_size], p % block_size
                assert torch.equal(k_cache[blk, off], k_all[s][p]) and torch.equal(
                    v_cache[blk, off], v_all[s][p]
                )

    step([("A", 0, 6), ("B", 0, 9), ("C", 0, 5)])  # prefill of three prompts
    step([("A", 6, 7), ("B", 9, 13), ("D", 0, 3)])  # decode + a chunk after cached tokens + a new prefill
    step([("B", 13, 14), ("A", 7, 8), ("D", 3, 4)])  # decode only, in another order
    step([("C", 4, 5)])  # a single query (query_len 1) re-written over its own cached slot


# ---- batch invariance ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(photos):
    """Prompts of different lengths: text only, one image, two images, a PIL image; varied max_tokens."""
    from PIL import Image

    prompts = [
        "Hello",
        [{"image": photos["astronaut"]}, {"text": "What is shown in this picture? Answer:"}],
        " ".join(["a longer text-only prompt, so the lengths in the batch differ"] * 3),
        [{"image": photos["chelsea"]}, {"image": photos["rocket"]}, {"text": "Compare the two pictures."}],
        {
            "prompt": "Picture 1: <img>cup</img>\nDescribe it.",
            "multi_modal_data": {"image": Image.open(photos["coffee"])},
        },
        "Q: what is two plus two? A:",
    ]
    params = [SamplingParams(max_tokens=n) for n in (5, 7, 4, 6, 7, 5)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(qwen_vl_llm, mixed):
    prompts, params = mixed
    return [gen(qwen_vl_llm, p, sp)[0] for p, sp in zip(prompts, params, strict=True)]


def test_batch_equals_alone(qwen_vl_llm, mixed, alone):
    prompts, params = mixed
    assert [len(qwen_vl_llm.tokenizer.image_paths(o.prompt_token_ids)) for o in alone] == [0, 1, 0, 2, 1, 0]
    outs = gen(qwen_vl_llm, prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert [o.text for o in outs] == [o.text for o in alone]
    assert [len(o.token_ids) for o in outs] == [sp.max_tokens for sp in params]


def test_batch_in_waves_of_max_batch_size(qwen_vl_ckpt, mixed, alone):
    llm = LLM(
        qwen_vl_ckpt,
        dtype="float32",
        device="cpu",
        block_size=16,
        num_blocks=256,
        max_model_len=1024,
        max_batch_size=2,
        progress=False,
    )
    prompts, params = mixed
    with Recorder(llm) as rec:
        outs = gen(llm, prompts, params)
    assert max(n for n, _ in rec.batch_sizes) == 2
    assert sum(prefill for _, prefill in rec.batch_sizes) >= 3
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


def test_batch_through_a_small_kv_cache(qwen_vl_ckpt, mixed, alone):
    prompts, params = mixed
    need = [
        blocks_for(len(o.prompt_token_ids) + sp.max_tokens, 16) for o, sp in zip(alone, params, strict=True)
    ]
    num_blocks = max(need) + min(need)  # the two-image prompt and at most a small one fit beside it
    llm = LLM(
        qwen_vl_ckpt,
        dtype="float32",
        device="cpu",
        block_size=16,
        num_blocks=num_blocks,
        max_model_len=1024,
        max_batch_size=8,
        progress=False,
    )
    with Recorder(llm) as rec:
        outs = gen(llm, prompts, params)
    assert max(n for n, _ in rec.batch_sizes) < len(prompts)
    assert sum(prefill for _, prefill in rec.batch_sizes) >= 3
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert llm.block_manager.num_free == num_blocks


# ---- prompt forms --------------------------------------------------------------------------------


def test_prompt_forms_give_the_same_tokens(qwen_vl_llm, photos):
    from PIL import Image

    path, question = photos["camera"], "What brand is this camera?"
    forms = [
        f"Picture 1: <img>{path}</img>\n{question}",
        [{"image": path}, {"text": question}],
        {"prompt": f"Picture 1: <img>x</img>\n{question}", "multi_modal_data": {"image": Image.open(path)}},
        {"prompt": f"Picture 1: <img>{path}</img>\n{question}", "multi_modal_data": {"image": [path]}},
        [{"image": Image.open(path)}, {"text": question}],
    ]
    outs = gen(qwen_vl_llm, forms)
    assert outs[1].prompt_token_ids == outs[0].prompt_token_ids == outs[3].prompt_token_ids
    assert outs[1].prompt == outs[0].prompt
    tok = qwen_vl_llm.tokenizer
    for o in outs:  # same layout: one 258-id span at the same place, same text around it
        ((start, _),) = tok.image_paths(o.prompt_token_ids)
        ids = o.prompt_token_ids
        assert ids[:start] == outs[0].prompt_token_ids[:start]
        assert ids[start + IMG_SPAN + 1 :] == outs[0].prompt_token_ids[start + IMG_SPAN + 1 :]
    assert len({tuple(o.token_ids) for o in outs}) == 1, [o.token_ids for o in outs]


def _chat_ids(tok, system, turns):
    """The original make_context layout, built from its pieces."""
    nl = tok.encode("\n")

    def block(role, content):
        return (
            [tok.im_start_id]
            + tok.encode(role)
            + nl
            + tok.encode(content, allowed_special=IMAGE_TAGS)
            + [tok.im_end_id]
        )

    ids = block("system", system)
    for role, content in turns:
        ids += nl + block(role, content)
    return ids + nl + [tok.im_start_id] + tok.encode("assistant") + nl


def test_chat_renders_the_original_chatml_layout(qwen_vl_llm, photos):
    tok = qwen_vl_llm.tokenizer
    one = gen(
        qwen_vl_llm, [{"role": "user", "content": "Hi there <|im_start|>"}], SamplingParams(max_tokens=1)
    )[0]
    assert one.prompt_token_ids == _chat_ids(
        tok, "You are a helpful assistant.", [("user", "Hi there <|im_start|>")]
    )
    assert one.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there <|im_start|>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert one.prompt_token_ids.count(tok.im_start_id) == 3  # typed special-token text stays text

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"image": photos["rocket"]}, {"text": "What is it?"}]},
        {"role": "assistant", "content": "A rocket."},
        {"role": "user", "content": "How tall?"},
    ]
    out = gen(qwen_vl_llm, [messages], SamplingParams(max_tokens=1))[0]
    turns = [
        ("user", f"Picture 1: <img>{photos['rocket']}</img>\nWhat is it?"),
        ("assistant", "A rocket."),
        ("user", "How tall?"),
    ]
    assert out.prompt_token_ids == _chat_ids(tok, "Be brief.", turns)
    assert tok.decode(out.prompt_token_ids) == out.prompt


def _force(token, at):
    """A bias that makes `token` the argmax once a sequence has generated `at` tokens (or always: at=None)."""

    def bias(seq, row):
        if at is None or len(seq.output_token_ids) == at:
            row[token] = row.max() + 1000.0

    return bias


@pytest.mark.parametrize("end", ["im_end_id", "im_start_id"])
def test_chat_stops_at_im_end_and_im_start(qwen_vl_llm, end):
    tok = qwen_vl_llm.tokenizer
    token = getattr(tok, end)
    chat = [{"role": "user", "content": "Tell me something."}]
    with Recorder(qwen_vl_llm, bias=_force(token, at=2)):
        out, raw = gen(
            qwen_vl_llm,
            [
                chat,
                tok.decode(_chat_ids(tok, "You are a helpful assistant.", [("user", "Tell me something.")])),
            ],
            SamplingParams(max_tokens=6),
        )
    assert raw.prompt_token_ids == out.prompt_token_ids  # the same ids, as a raw string
    assert out.finish_reason == "stop" and out.token_ids[-1] == token and len(out.token_ids) == 3
    assert out.text == tok.decode(out.token_ids[:2])
    # a raw prompt ends only at <|endoftext|>
    assert raw.finish_reason == "length" and len(raw.token_ids) == 6 and raw.token_ids[2] == token
    assert raw.token_ids[:2] == out.token_ids[:2]


# ---- sampling --------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(qwen_vl_llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=8)
    first = gen(qwen_vl_llm, TEXT, sp)[0].token_ids
    assert gen(qwen_vl_llm, TEXT, sp)[0].token_ids == first
    others = [GREEDY, sp, SamplingParams(temperature=1.0, max_tokens=8), sp]
    batch = gen(qwen_vl_llm, ["Another prompt", TEXT, "A third prompt here", TEXT], others)
    assert batch[1].token_ids == first and batch[3].token_ids == first
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=4321, max_tokens=8)
    assert gen(qwen_vl_llm, TEXT, other_seed)[0].token_ids != first
    assert len(first) == 8


def test_greedy_equivalents_are_argmax(qwen_vl_llm):
    params = [
        SamplingParams(max_tokens=6),
        SamplingParams(temperature=1.0, top_k=1, max_tokens=6),
        SamplingParams(temperature=1.3, top_p=1e-6, max_tokens=6),
    ]
    with Recorder(qwen_vl_llm) as rec:
        outs = gen(qwen_vl_llm, [TEXT] * 3, params)
    assert outs[0].token_ids == rec.steps(outs[0]).argmax(-1).tolist()
    assert outs[1].token_ids == outs[0].token_ids == outs[2].token_ids


def _hf_penalty(logits, seen, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    return RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits[None].clone())[0]


def _row(prompt, output, params, end_ids=()):
    return Sequence(0, "r", "", list(prompt), params, frozenset(end_ids), output_token_ids=list(output))


def test_repetition_penalty_and_min_tokens_on_a_batch_of_rows():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    batch = logits.repeat(3, 1)
    rows = [_row([0, 1], [1, 4], SamplingParams(repetition_penalty=2.0)),  # row 0
            _row([5], [], SamplingParams(repetition_penalty=4.0))]  # row 2; row 1 untouched  # fmt: skip
    apply_repetition_penalty(batch, rows, [0, 2])
    assert batch[0].tolist() == [1.0, -4.0, 1.0, -1.0, 0.25, 3.0]  # positive divided, negative multiplied
    assert torch.equal(batch[0], _hf_penalty(logits, [0, 1, 1, 4], 2.0))
    assert torch.equal(batch[1], logits) and torch.equal(batch[2], _hf_penalty(logits, [5], 4.0))
    masked = logits.repeat(2, 1)
    mask_end_tokens(masked, [_row([0], [1, 2], SamplingParams(min_tokens=3, max_tokens=5), {5, 3})], [1])
    assert masked[1, 5] == masked[1, 3] == float("-inf") and masked[1, :3].tolist() == logits[:3].tolist()
    assert torch.equal(masked[0], logits)


def test_repetition_penalty_follows_hf(qwen_vl_llm):
    prompt = "a a a a a a a a"
    with Recorder(qwen_vl_llm) as rec:
        plain, penalised = gen(
            qwen_vl_llm,
            [prompt, prompt],
            [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, repetition_penalty=1.5)],
        )
    assert penalised.token_ids != plain.token_ids
    seen = list(penalised.prompt_token_ids)
    for raw, token in zip(rec.steps(penalised), penalised.token_ids, strict=True):
        assert token == int(_hf_penalty(raw, seen, 1.5).argmax())
        seen.append(token)


def test_min_tokens_masks_eos_and_ignore_eos(qwen_vl_llm):
    eod = qwen_vl_llm.tokenizer.eod_id
    params = [
        SamplingParams(max_tokens=6),
        SamplingParams(max_tokens=6, min_tokens=3),
        SamplingParams(max_tokens=6, ignore_eos=True),
    ]
    with Recorder(qwen_vl_llm, bias=_force(eod, at=None)):
        plain, least, ignore = gen(qwen_vl_llm, [TEXT] * 3, params)
    assert plain.token_ids == [eod] and plain.finish_reason == "stop" and plain.stop_reason is None
    assert plain.text == ""
    assert len(least.token_ids) == 4 and least.token_ids[-1] == eod and eod not in least.token_ids[:3]
    assert least.finish_reason == "stop" and least.text == qwen_vl_llm.tokenizer.decode(least.token_ids[:3])
    assert ignore.token_ids == [eod] * 6 and ignore.finish_reason == "length"


def test_logprobs_are_log_softmax_of_the_raw_logits(qwen_vl_llm):
    params = [
        SamplingParams(max_tokens=4, logprobs=3),
        SamplingParams(max_tokens=4, logprobs=2, temperature=2.0, seed=7),
        SamplingParams(max_tokens=2, logprobs=0),
    ]
    with Recorder(qwen_vl_llm) as rec:
        outs = gen(qwen_vl_llm, [TEXT] * 3, params)
    assert GREEDY.logprobs is None and gen(qwen_vl_llm, "x", SamplingParams(max_tokens=1))[0].logprobs is None
    for out, sp in zip(outs, params, strict=True):
        assert len(out.logprobs) == len(out.token_ids) == sp.max_tokens
        for entry, token, raw in zip(out.logprobs, out.token_ids, rec.steps(out), strict=True):
            logp = torch.log_softmax(raw, -1)
            top = set(torch.topk(raw, sp.logprobs).indices.tolist()) if sp.logprobs else set()
            assert set(entry) == top | {token}
            for t, value in entry.items():
                assert value <= 0 and value == pytest.approx(
                    float(raw[t] - torch.logsumexp(raw, -1)), abs=1e-5
                )
                assert value == pytest.approx(float(logp[t]), abs=1e-6)
    greedy = outs[0]
    assert all(len(e) == 3 for e in greedy.logprobs)  # the chosen token is the top one
    ref = torch.log_softmax(dense_logits(qwen_vl_llm, greedy.prompt_token_ids, [], greedy.token_ids)[0], -1)
    for t, value in greedy.logprobs[0].items():
        assert value == pytest.approx(float(ref[t]), abs=1e-4)


# ---- stops -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_run(qwen_vl_llm):
    return gen(qwen_vl_llm, TEXT, SamplingParams(max_tokens=10))[0]


def test_stops(qwen_vl_llm, greedy_run):
    tok = qwen_vl_llm.tokenizer
    ids = greedy_run.token_ids
    assert greedy_run.finish_reason == "length" and len(ids) == 10 and greedy_run.stop_reason is None

    full = tok.decode(ids)

    def clean(k):  # a token whose text is whole, and first appears where it is generated
        piece, before = tok.decode([ids[k]]), tok.decode(ids[:k])
        whole = piece.strip() and "\ufffd" not in before + piece and full.startswith(before + piece)
        return whole and full.find(piece) == len(before)

    k = next(k for k in range(2, 8) if clean(k))
    word, end = tok.decode([ids[k]]), len(tok.decode(ids[: k + 1]))
    across = full[end - 1 : end + 1]  # the last character of token k and the first of token k + 1
    assert len(across) == 2 and "\ufffd" not in across
    j = next(j for j in range(3, 10) if ids[j] not in ids[:j])
    params = [
        SamplingParams(max_tokens=10, stop=[word]),
        SamplingParams(max_tokens=10, stop_token_ids=[ids[j]]),
        SamplingParams(max_tokens=10, stop=["never appears \x00", across]),
        SamplingParams(max_tokens=4),
    ]
    by_string, by_id, by_boundary, short = gen(qwen_vl_llm, [TEXT] * 4, params)

    assert by_string.finish_reason == "stop" and by_string.stop_reason == word
    assert by_string.token_ids == ids[: k + 1] and by_string.text == tok.decode(ids[:k])
    assert word not in by_string.text

    assert by_id.finish_reason == "stop" and by_id.stop_reason == ids[j]
    assert by_id.token_ids == ids[: j + 1] and by_id.text == tok.decode(ids[:j])

    assert by_boundary.finish_reason == "stop" and by_boundary.stop_reason == across
    assert by_boundary.text == full[: full.index(across)]
    assert by_boundary.token_ids == ids[: len(by_boundary.token_ids)]

    assert (
        short.finish_reason == "length" and short.token_ids == ids[:4] and short.text == tok.decode(ids[:4])
    )
    assert short.stop_reason is None


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": -2}, "logprobs"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(EngineError, match=rf"^SamplingParams: {field} "):
        SamplingParams(**kwargs)


def test_too_long_prompt_raises_or_returns_an_error(qwen_vl_llm):
    too_long = SamplingParams(max_tokens=4096)
    with pytest.raises(EngineError, match=r"prompt 0: .*max_model_len 4096"):
        gen(qwen_vl_llm, ["Hi", "Hello"], [too_long, GREEDY])
    outs = gen(qwen_vl_llm, ["Hello", "Hi", TEXT], [GREEDY, too_long, GREEDY], errors="return")
    assert (
        outs[1].finish_reason == "error" and "max_model_len 4096" in outs[1].error and outs[1].token_ids == []
    )
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert outs[0].token_ids == gen(qwen_vl_llm, "Hello")[0].token_ids
    assert outs[2].token_ids == gen(qwen_vl_llm, TEXT)[0].token_ids
    with pytest.raises(EngineError, match="errors must be"):
        gen(qwen_vl_llm, "Hi", errors="ignore")


def test_engine_is_usable_after_a_rejected_batch(qwen_vl_ckpt):
    llm = LLM(
        qwen_vl_ckpt,
        dtype="float32",
        device="cpu",
        block_size=16,
        num_blocks=64,
        max_model_len=512,
        progress=False,
    )
    expected = gen(llm, "Good prompt")[0].token_ids
    with pytest.raises(EngineError, match="prompt 1:"):
        gen(llm, ["Queued first", "Too long"], [GREEDY, SamplingParams(max_tokens=600)])
    assert not llm.llm_engine.has_unfinished_requests()  # "Queued first" was taken back out
    assert gen(llm, "Good prompt")[0].token_ids == expected
    assert llm.block_manager.num_free == 64 and not llm.scheduler.has_work()


def test_bad_images_are_clear_errors(qwen_vl_llm, photos, tmp_path):
    missing = tmp_path / "no such dir" / "nothing.jpg"
    with pytest.raises(EngineError, match=re.escape(f"image not found: {missing}")):
        gen(qwen_vl_llm, [{"image": str(missing)}, {"text": "What?"}])
    with pytest.raises(EngineError, match=r"2 <img>...</img> span\(s\) but multi_modal_data gives 1"):
        gen(
            qwen_vl_llm,
            {"prompt": "<img>a</img><img>b</img>What?", "multi_modal_data": {"image": photos["coffee"]}},
        )
    long_path = "/" + "d" * 300 + ".jpg"
    with pytest.raises(EngineError, match=r"image path is 305 bytes; .* at most 256"):
        gen(qwen_vl_llm, f"Picture 1: <img>{long_path}</img>\nWhat?")
    outs = gen(qwen_vl_llm, [f"<img>{missing}</img>", f"<img>{long_path}</img>", "Hello"], errors="return")
    assert [o.finish_reason for o in outs] == ["error", "error", "length"]
    assert str(missing) in outs[0].error and "305 bytes" in outs[1].error and outs[2].error is None


# ---- timings -----------------------------------------------------------------------------------------


def test_timings(qwen_vl_llm):
    many, one = gen(qwen_vl_llm, [TEXT, "Hi"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=1)])
    for out in (many, one):
        assert out.ttft > 0 and out.e2e_time >= out.ttft
        assert out.arrival_time <= out.first_token_time <= out.finish_time
    assert many.decode_time_per_token is not None and many.decode_time_per_token > 0
    assert many.decode_time_per_token == pytest.approx((many.e2e_time - many.ttft) / 3)
    assert one.decode_time_per_token is None
