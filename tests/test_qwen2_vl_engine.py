"""Protects Qwen2-VL on the engine (engine/models/qwen2_vl/, model_type "qwen2_vl") end to end against
transformers' own Qwen2VLForConditionalGeneration and Qwen2VLProcessor on a tiny random checkpoint that
transformers itself wrote (save_pretrained; conftest's build_tiny_qwen2vl: a byte-level BPE tokenizer
trained in the test, a chat template, the real image processor with small max_pixels):

- the prompt token ids (chat template, <|image_pad|> expanded to each image's merged patch count) equal
  the processor's, the greedy tokens equal transformers' generate and every generated token's
  log-probabilities are within 1e-4 of its raw logits', for text only, one image, two images of
  different sizes and aspect ratios; and the tokens of all of them in one engine batch;
- the same outputs through the prefix cache, and from a cache small enough to preempt;
- prompts that do not add up (placeholders vs images) are one EngineError;
- the harness's engine backend (Qwen-VL's prompt formats) refuses a qwen2_vl checkpoint in one line.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineError, SamplingParams

NEW = 6
logprobs: dict[str, torch.Tensor] = {}  # transformers' per case, filled by the reference fixture


def _cases(photo_dir):
    q = "What is in the picture?"
    return {
        "text": ([{"text": "Say something about a stop sign."}], []),
        "one image": ([{"image": str(photo_dir / "coffee.png")}, {"text": q}], [photo_dir / "coffee.png"]),
        "two images": ([{"image": str(photo_dir / "rocket.png")}, {"text": "and"}, {"image": str(photo_dir / "chelsea.jpg")},
                        {"text": "Compare them."}], [photo_dir / "rocket.png", photo_dir / "chelsea.jpg"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_qwen2vl, photo_dir):
    """transformers' prompt ids and greedy tokens for each case, one request at a time."""
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_qwen2vl)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl, dtype=torch.float32).eval()
    out = {}
    for name, (parts, paths) in _cases(photo_dir).items():
        content = [{"type": "image"} if "image" in p else {"type": "text", "text": p["text"]} for p in parts]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        images = [Image.open(p).convert("RGB") for p in paths] or None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)  # fmt: skip
        n = inputs["input_ids"].shape[1]
        out[name] = (inputs["input_ids"][0].tolist(), gen.sequences[0, n:].tolist())
        logprobs[name] = torch.log_softmax(torch.stack(gen.logits)[:, 0].float(), dim=-1)  # [NEW, vocab], raw
    return out


def _llm(folder, **kw):
    return LLM(folder, dtype="float32", device="cpu", max_model_len=512, progress=False,
               **{"num_blocks": 64, "block_size": 16, **kw})  # fmt: skip


def _generate(llm, prompts):
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, min_tokens=NEW), use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.token_ids)) for o in outs]


def test_each_prompt_alone_equals_transformers(tiny_qwen2vl, photo_dir, reference):
    llm = _llm(tiny_qwen2vl)
    for name, (parts, _) in _cases(photo_dir).items():
        [out] = llm.generate([parts], SamplingParams(max_tokens=NEW, min_tokens=NEW, logprobs=-1), use_tqdm=False)
        want_ids, want_tokens = reference[name]
        assert list(out.prompt_token_ids) == want_ids, name
        assert list(out.token_ids) == want_tokens, name
        got = torch.stack(out.outputs[0].logprobs)  # [NEW, vocab], the raw distributions
        diff = (got - logprobs[name][:, : got.shape[1]]).abs().max().item()
        assert diff < 1e-4, (name, diff)


def test_a_batch_the_prefix_cache_and_preemption_give_the_same_tokens(tiny_qwen2vl, photo_dir, reference):
    cases = _cases(photo_dir)
    prompts = [parts for parts, _ in cases.values()] * 2
    want = [reference[name] for name in cases] * 2
    llm = _llm(tiny_qwen2vl)
    assert _generate(llm, prompts) == want  # the second copy of each prompt is served by the prefix cache
    assert llm.llm_engine.block_manager.hit_tokens > 0
    # room for every prompt but not for their growth: decoding preempts and recomputes
    prompt_blocks = sum(-(-len(ids) // 4) for ids, _ in want)
    small = _llm(tiny_qwen2vl, num_blocks=prompt_blocks + 1, block_size=4, enable_prefix_caching=False)
    assert _generate(small, prompts) == want
    assert small.llm_engine.scheduler.num_preemptions > 0


def test_placeholders_and_images_must_add_up(tiny_qwen2vl, photo_dir):
    llm = _llm(tiny_qwen2vl)
    family = llm.llm_engine.family  # generation_config.json's eos (<|im_end|> here) ends a request
    assert family.process_prompt([{"text": "hi"}]).stop_token_ids == {family.tokenizer.ids["<|im_end|>"]} == {2}
    with pytest.raises(EngineError, match=r"1 image placeholder\(s\) .* for 0 image\(s\)"):
        llm.llm_engine.add_request("a", "<|vision_start|><|image_pad|><|vision_end|>What is it?")
    with pytest.raises(EngineError, match="image not found"):
        llm.llm_engine.add_request("b", [{"image": str(photo_dir / "missing.png")}, {"text": "?"}])


def test_the_harness_engine_backend_refuses_it_before_loading(tiny_qwen2vl, textvqa, tmp_path, capsys):
    from modeltest.cli import main

    (tmp_path / "model.yaml").write_text(f"model_name: tiny2\nmodel_path: {tiny_qwen2vl}\nbackend: engine\n")
    (tmp_path / "task.yaml").write_text(f"task_name: textvqa\nlocal_dataset_path: {textvqa}\n")
    code = main(["--model_config_path", str(tmp_path / "model.yaml"), "--task_config_path", str(tmp_path / "task.yaml"),
                 "--check_only"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].endswith("model_type 'qwen2_vl': the engine backend renders Qwen-VL's prompts only for now; run "
                           "this model with --backend hf, or serve it (python -m engine.serve) and use --backend openai")
