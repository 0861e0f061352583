"""Protects the engine's request API on the tiny random Qwen-VL (fp32, CPU):

- LLMEngine add_request / step / abort_request with several requests: an aborted request (running or
  waiting) has its KV blocks back the moment abort_request returns, and the others finish with the
  same tokens as without it; stats() counts running, waiting, blocks, preemptions, prefix hits;
- streaming: DELTA outputs add up to the final text and tokens, also when a stop string spans two
  steps (cut exactly, never shown); CUMULATIVE outputs grow; FINAL_ONLY gives one output;
- the LLM facade: vLLM's argument names (synonyms, conflicts, tensor_parallel_size, trust_remote_code),
  vLLM's `.outputs[0]` beside the flat fields, and `{"prompt_token_ids": [...]}` prompts;
- logprobs=-1: the whole distribution per generated token.
"""

from __future__ import annotations

import pytest
import torch

from engine import EngineArgs, EngineError, LLMEngine, RequestOutputKind, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The quick brown fox jumps over the lazy dog"
PROMPTS = ["Hello there", TEXT, "Describe a sunny day at the beach.", "1 2 3 4 5 6 7 8"]


@pytest.fixture(scope="module")
def engine(qwen_vl_ckpt) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16,
                                                 num_blocks=64, max_model_len=512, max_batch_size=3, progress=False))  # fmt: skip


@pytest.fixture(scope="module")
def alone(qwen_vl_llm) -> list[list[int]]:
    """Each prompt's greedy tokens, generated on its own."""
    return [qwen_vl_llm.generate(p, SamplingParams(max_tokens=8), use_tqdm=False)[0].token_ids for p in PROMPTS]


def _drain(engine, outputs=None) -> dict:
    """Step until nothing is left; the final output of each request."""
    final = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if outputs is not None:
                outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("the engine did not finish")


def test_abort_frees_blocks_at_once_and_leaves_the_others_unchanged(engine, alone):
    params = SamplingParams(max_tokens=8)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 4, 0)
    engine.step()
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (3, 1)  # max_batch_size 3
    running = {s.request_id: s for s in engine.scheduler.running}
    held = len(running["r1"].block_table)
    assert held >= 1
    engine.abort_request("r1")
    after = engine.stats()  # at once, before any other step
    assert after.kv_blocks_used == stats.kv_blocks_used - held and after.num_running == 2
    engine.abort_request(["r3", "no-such-request"])  # a waiting one, and an unknown id (ignored)
    assert engine.stats().num_waiting == 0 and engine.get_num_unfinished_requests() == 2
    final = _drain(engine)
    assert set(final) == {"r0", "r2"}
    assert final["r0"].token_ids == alone[0] and final["r2"].token_ids == alone[2]
    assert engine.stats().kv_blocks_used == 0 and engine.stats().kv_blocks_total == 64


def test_a_request_id_is_used_once_and_a_bad_request_queues_nothing(engine):
    engine.add_request("dup", "Hi", SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="request id 'dup' is already in the engine"):
        engine.add_request("dup", "Hi again")
    with pytest.raises(EngineError, match="max_model_len 512"):
        engine.add_request("long", "Hi", SamplingParams(max_tokens=600))
    assert engine.get_num_unfinished_requests() == 1
    assert set(_drain(engine)) == {"dup"}


def test_stats_count_preemptions_and_prefix_hits(qwen_vl_ckpt):
    engine = LLMEngine.from_engine_args(EngineArgs(model=qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16,
                                                   num_blocks=6, max_model_len=96, progress=False))  # fmt: skip
    head = "a shared head of the prompts, long enough for a whole block of sixteen tokens, then"
    for i in range(3):
        engine.add_request(str(i), f"{head} question {i}", SamplingParams(max_tokens=40, ignore_eos=True))
    _drain(engine)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens >= 16
    assert stats.num_preemptions == engine.scheduler.num_preemptions
    assert stats.prefix_cache_hit_tokens == engine.block_manager.hit_tokens


def _stop_across_two_steps(tok, ids: list[int]) -> tuple[str, str]:
    """A stop string made of the last character of one generated token and the first of the next."""
    full = tok.decode(ids)
    for k in range(1, len(ids) - 1):
        end = len(tok.decode(ids[: k + 1]))
        across = full[end - 1 : end + 1]
        if len(across) == 2 and "\ufffd" not in full[: end + 1] and full.find(across) == end - 1:
            return across, full
    raise AssertionError(f"no stop string spans two tokens in {full!r}")


def test_streamed_deltas_add_up_to_the_final_text(engine, qwen_vl_llm):
    tok = engine.tokenizer
    plain = qwen_vl_llm.generate(PROMPTS, SamplingParams(max_tokens=12), use_tqdm=False)
    across, full = _stop_across_two_steps(tok, plain[1].token_ids)
    kinds = [RequestOutputKind.DELTA, RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY]
    stops = [[], [across], [], []]
    for i, (prompt, kind, stop) in enumerate(zip(PROMPTS, kinds, stops, strict=True)):
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=12, stop=stop, output_kind=kind, logprobs=1))
    seen: dict[str, list] = {}
    final = _drain(engine, seen)

    for i in (0, 1):  # DELTA: the pieces concatenate to what LLM.generate returns
        pieces = seen[f"s{i}"]
        text = "".join(o.outputs[0].text for o in pieces)
        tokens = [t for o in pieces for t in o.outputs[0].token_ids]
        logprobs = [e for o in pieces for e in o.outputs[0].logprobs]
        assert [o.finished for o in pieces] == [False] * (len(pieces) - 1) + [True]
        assert len(tokens) == len(logprobs) and tokens == plain[i].token_ids[: len(tokens)]
        if i == 0:
            assert text == plain[0].text and tokens == plain[0].token_ids
    stopped = "".join(o.outputs[0].text for o in seen["s1"])
    assert stopped == full[: full.index(across)] and across not in stopped
    assert seen["s1"][-1].finish_reason == "stop" and seen["s1"][-1].stop_reason == across

    texts = [o.outputs[0].text for o in seen["s2"]]  # CUMULATIVE: each output extends the last
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == plain[2].text and seen["s2"][-1].token_ids == plain[2].token_ids
    assert len(seen["s3"]) == 1 and seen["s3"][0].finished and seen["s3"][0].token_ids == plain[3].token_ids

    out = final["s2"].outputs[0]
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(out.logprobs, out.token_ids, strict=True)))


# ---- the LLM facade ---------------------------------------------------------------------------------


def test_vllm_argument_names(qwen_vl_ckpt):
    from engine import LLM

    llm = LLM(qwen_vl_ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=32, max_model_len=256,
              max_num_seqs=2, gpu_memory_utilization=0.5, max_num_batched_tokens=300, tensor_parallel_size=1,
              trust_remote_code=True, progress=False)  # fmt: skip
    c = llm.config
    assert (c.max_batch_size, c.memory_fraction, c.max_prefill_tokens) == (2, 0.5, 300)
    assert llm.scheduler.max_batch_size == 2 and llm.scheduler.max_prefill_tokens == 300
    out = llm.generate([TEXT, "Hi"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.token_ids for o in out] and len(out[0].token_ids) == 3
    assert out[0].outputs[0].text == out[0].text and out[0].outputs[0].finish_reason == "length"
    assert out[0].finished and out[0].prompt_token_ids == llm.tokenizer.encode(TEXT)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 4, "max_num_seqs": 8}, "max_batch_size=4 and max_num_seqs=8 disagree"),
        ({"memory_fraction": 0.8, "gpu_memory_utilization": 0.9}, "memory_fraction=0.8 and gpu_memory_utilization=0.9"),
        ({"max_prefill_tokens": 100, "max_num_batched_tokens": 200}, "max_prefill_tokens=100 and max_num_batched_tokens"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
        ({"trust_remote_code": "yes"}, "trust_remote_code must be true or false"),
    ],
)
def test_vllm_argument_conflicts_are_refused_before_loading(tmp_path, kwargs, message):
    with pytest.raises(EngineError, match=message):
        EngineArgs(model=tmp_path / "never-read", **kwargs)


def test_token_id_prompts(qwen_vl_llm, photo_dir):
    from PIL import Image

    tok = qwen_vl_llm.tokenizer
    photo = sorted(photo_dir.iterdir())[0]
    text = f"Picture 1: <img>{photo}</img>\nWhat is it?"
    params = SamplingParams(max_tokens=5)
    want = qwen_vl_llm.generate([TEXT, text], params, use_tqdm=False)
    got = qwen_vl_llm.generate([{"prompt_token_ids": tok.encode(TEXT)}, {"prompt_token_ids": tok.encode(text)}],
                               params, use_tqdm=False)  # fmt: skip
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in want] and got[1].prompt == text
    # the image given in multi_modal_data, the span's slots holding any label
    labelled = tok.encode("Picture 1: <img>photo</img>\nWhat is it?")
    pil = {"prompt_token_ids": labelled, "multi_modal_data": {"image": Image.open(photo)}}
    assert qwen_vl_llm.generate(pil, params, use_tqdm=False)[0].token_ids == want[1].token_ids

    broken = list(labelled)
    broken[broken.index(tok.img_end_id)] = tok.encode("x")[0]
    not_utf8 = list(labelled)
    not_utf8[labelled.index(tok.img_start_id) + 1] = 0xFF  # the path's first byte
    for prompt, message in [
        ({"prompt_token_ids": [1, 2, 10**6]}, "1000000 is not a token id"),
        ({"prompt_token_ids": "1 2 3"}, "must be a list of integers"),
        ({"prompt_token_ids": broken}, f"the image span at position {labelled.index(tok.img_start_id)} is not <img>"),
        ({"prompt_token_ids": not_utf8}, "holds a path that is not UTF-8"),
        ({"prompt_token_ids": [1], "prompt": "x"}, "'prompt' or 'prompt_token_ids', not both"),
    ]:
        with pytest.raises(EngineError, match=message):
            qwen_vl_llm.generate(prompt, params, use_tqdm=False)


def test_generate_drops_its_requests_when_interrupted(qwen_vl_llm):
    engine = qwen_vl_llm.llm_engine
    step = engine.step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    engine.step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            qwen_vl_llm.generate([TEXT, "Hi"], SamplingParams(max_tokens=10), use_tqdm=False)
    finally:
        del engine.step
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0
    assert torch.is_tensor(engine.runner.kv_caches[0][0])


def test_logprobs_minus_one_gives_the_whole_distribution(qwen_vl_llm):
    from test_engine_generate import Recorder

    with Recorder(qwen_vl_llm) as rec:
        out = qwen_vl_llm.generate(TEXT, SamplingParams(max_tokens=3, logprobs=-1), use_tqdm=False)[0]
    assert len(out.logprobs) == 3
    for row, raw, token in zip(out.logprobs, rec.steps(out), out.token_ids, strict=True):
        assert row.dtype == torch.float32 and row.shape == (qwen_vl_llm.model_config.vocab_size,)
        assert torch.allclose(row, torch.log_softmax(raw, -1), atol=1e-6)
        assert int(row.argmax()) == token  # greedy
    chosen = [float(r[t]) for r, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(chosen))


def test_the_applications_log_format_is_kept(monkeypatch):
    """The engine adds its own stderr handler only when nothing is configured, and under tensor
    parallelism re-formats only that one: a handler the application put on `engine` keeps its format."""
    import logging

    import engine.llm_engine as le

    monkeypatch.setattr(le, "_handler", None)
    mine = logging.StreamHandler()
    mine.setFormatter(fmt := logging.Formatter("MINE %(message)s"))
    monkeypatch.setattr(le.logger, "handlers", [mine])
    le._default_logging(" (rank 1)")
    assert le.logger.handlers == [mine] and mine.formatter is fmt


def test_prompt_token_ids_are_what_generate_runs(qwen_vl_llm, photo_dir):
    """LLM.prompt_token_ids (the harness's input length) equals the ids generate runs, for each prompt
    form; parts or chat messages under "prompt" take multi_modal_data's images in their spans."""
    from PIL import Image

    photo = sorted(photo_dir.iterdir())[0]
    chat = [{"role": "user", "content": [{"image": "label"}, {"text": "What is it?"}]}]
    prompts = [
        f"<img>{photo}</img>What is it? Answer:",
        [{"image": str(photo)}, {"text": "What is it?"}],
        {"prompt": chat, "multi_modal_data": {"image": [Image.open(photo)]}},
        {"prompt": [{"image": "label"}, {"text": "What is it?"}], "multi_modal_data": {"image": str(photo)}},
    ]
    outs = qwen_vl_llm.generate(prompts, SamplingParams(max_tokens=3), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert qwen_vl_llm.prompt_token_ids(prompt) == out.prompt_token_ids
    direct = qwen_vl_llm.generate([[{"role": "user", "content": [{"image": str(photo)}, {"text": "What is it?"}]}]],
                                  SamplingParams(max_tokens=3), use_tqdm=False)[0]  # fmt: skip
    assert outs[2].token_ids == direct.token_ids and outs[2].prompt.startswith("<|im_start|>system")
    assert outs[3].token_ids == outs[1].token_ids  # the span's label is not what the model sees
