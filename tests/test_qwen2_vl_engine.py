"""Protects Qwen2-VL and Qwen2.5-VL on the engine (engine/models/qwen2_vl/, model_type "qwen2_vl" and
"qwen2_5_vl") end to end against transformers' own Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration and their processors, on tiny random checkpoints that transformers
itself wrote (save_pretrained; conftest's build_tiny_qwen2vl: a byte-level BPE tokenizer trained in the
test, a chat template, the real image processor with small max_pixels; Qwen2.5-VL with window attention
whose windows the images' grids do not fill):

- the prompt token ids (chat template, <|image_pad|> expanded to each image's merged patch count) equal
  the processor's, the greedy tokens equal transformers' generate and every generated token's
  log-probabilities are within 1e-4 of its raw logits', for text only, one image, two images of
  different sizes and aspect ratios; and the tokens of all of them in one engine batch;
- the same outputs through the prefix cache, and from a cache small enough to preempt;
- prompts that do not add up (placeholders vs images) are one EngineError;
- tensor parallelism 2 under torchrun (gloo): the single process's tokens and logprobs on every rank;
- python -m engine.serve answers an OpenAI chat completion with an image, its prompt rendered as offline;
- benchmarks/engine_qwen2_vl.py runs both systems and prints their agreement;
- the harness: a TextVQA run on the engine backend equals the same run on the hf backend, sample for
  sample (raw output, prediction, score, token counts); a performance run on the engine backend runs
  the exact token counts, with an image (the smallest chat prompt holding it, then filler) and without;
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineError, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))

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


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def ckpt(request):
    """The tiny checkpoint of each model_type the family runs."""
    return request.getfixturevalue({"qwen2_vl": "tiny_qwen2vl", "qwen2_5_vl": "tiny_qwen2_5vl"}[request.param])


@pytest.fixture(scope="module")
def reference(ckpt, photo_dir):
    """transformers' prompt ids and greedy tokens for each case, one request at a time."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    logprobs.clear()
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


def test_each_prompt_alone_equals_transformers(ckpt, photo_dir, reference):
    llm = _llm(ckpt)
    for name, (parts, _) in _cases(photo_dir).items():
        [out] = llm.generate([parts], SamplingParams(max_tokens=NEW, min_tokens=NEW, logprobs=-1), use_tqdm=False)
        want_ids, want_tokens = reference[name]
        assert list(out.prompt_token_ids) == want_ids, name
        assert list(out.token_ids) == want_tokens, name
        got = torch.stack(out.outputs[0].logprobs)  # [NEW, vocab], the raw distributions
        diff = (got - logprobs[name][:, : got.shape[1]]).abs().max().item()
        assert diff < 1e-4, (name, diff)


def test_a_batch_the_prefix_cache_and_preemption_give_the_same_tokens(ckpt, photo_dir, reference):
    cases = _cases(photo_dir)
    prompts = [parts for parts, _ in cases.values()] * 2
    want = [reference[name] for name in cases] * 2
    llm = _llm(ckpt)
    assert _generate(llm, prompts) == want  # the second copy of each prompt is served by the prefix cache
    assert llm.llm_engine.block_manager.hit_tokens > 0
    # room for every prompt but not for their growth: decoding preempts and recomputes
    prompt_blocks = sum(-(-len(ids) // 4) for ids, _ in want)
    small = _llm(ckpt, num_blocks=prompt_blocks + 1, block_size=4, enable_prefix_caching=False)
    assert _generate(small, prompts) == want
    assert small.llm_engine.scheduler.num_preemptions > 0


def test_placeholders_and_images_must_add_up(tiny_qwen2vl, photo_dir):
    llm = _llm(tiny_qwen2vl)
    family = llm.llm_engine.family  # generation_config.json's eos (<|im_end|> here) and <|endoftext|> end a request
    ids = family.tokenizer.ids
    assert family.process_prompt([{"text": "hi"}]).stop_token_ids == {ids["<|im_end|>"], ids["<|endoftext|>"]} == {2, 0}
    with pytest.raises(EngineError, match=r"1 image placeholder\(s\) .* for 0 image\(s\)"):
        llm.llm_engine.add_request("a", "<|vision_start|><|image_pad|><|vision_end|>What is it?")
    ids = llm.llm_engine.prompt_token_ids({"prompt": "<|vision_start|><|image_pad|><|vision_end|>",
                                           "multi_modal_data": {"image": str(photo_dir / "coffee.png")}})  # fmt: skip
    image = {"multi_modal_data": {"image": str(photo_dir / "coffee.png")}}
    assert llm.llm_engine.prompt_token_ids({"prompt_token_ids": ids, **image}) == ids  # vLLM's form, as given
    with pytest.raises(EngineError, match=r"image 1's span is \d+ tokens; the image takes \d+"):
        llm.llm_engine.add_request("c", {"prompt_token_ids": ids[:-2] + ids[-1:], **image})
    with pytest.raises(EngineError, match="image not found"):
        llm.llm_engine.add_request("b", [{"image": str(photo_dir / "missing.png")}, {"text": "?"}])


def _records(out):
    import json

    (path,) = out.glob("debug/**/samples.jsonl")
    keep = ("raw_output", "prediction", "score", "input_tokens", "output_tokens", "error")
    return {r["id"]: {k: r[k] for k in keep} for r in map(json.loads, path.read_text().splitlines())}


def test_a_textvqa_run_on_the_engine_backend_equals_the_hf_backends(hf_model_yaml, textvqa, tmp_path):
    import yaml

    from modeltest.cli import main

    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(textvqa)}))
    engine_yaml = tmp_path / "engine.yaml"
    engine_yaml.write_text(yaml.safe_dump({**yaml.safe_load(hf_model_yaml.read_text()), "backend": "engine",
                                           "block_size": 16}))  # fmt: skip
    runs = {}
    for name, model in (("hf", hf_model_yaml), ("engine", engine_yaml)):
        code = main(["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu",
                     "--output_dir", str(tmp_path / name), "--no_progress", "--batch_size", "4"])  # fmt: skip
        assert code == 0, name
        runs[name] = _records(tmp_path / name)
    assert len(runs["hf"]) == 8 and all(r["error"] is None for r in runs["hf"].values())
    assert runs["engine"] == runs["hf"]


def test_performance_on_the_engine_backend_runs_the_exact_token_counts(tiny_qwen2vl, tmp_path):
    import json

    import yaml

    from modeltest.cli import main

    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model_name": "t", "model_path": str(tiny_qwen2vl),
                                                         "data_type": "fp32", "backend": "engine", "block_size": 16}))  # fmt: skip
    for with_image, cases in ((True, [[40, 3], [28, 2]]), (False, [[17, 3]])):  # 28: the template and image alone
        (tmp_path / "task.yaml").write_text(yaml.safe_dump({"task_type": "performance", "task_name": "synthetic",
                                                            "case_pair": cases, "batch_size": [2], "warmup_rounds": 0,
                                                            "with_image": with_image}))  # fmt: skip
        out = tmp_path / f"out{with_image}"
        assert main(["--model_config_path", str(tmp_path / "model.yaml"), "--task_config_path", str(tmp_path / "task.yaml"),
                     "--device", "cpu", "--output_dir", str(out), "--no_progress"]) == 0  # fmt: skip
        (found,) = out.glob("results/**/performance_pa_batch2_tp1_result.json")
        for case in json.loads(found.read_text())["cases"]:
            assert case["error"] is None
            assert case["input_tokens"] == [case["input_len"]] * 2 and case["output_tokens"] == [case["output_len"]] * 2


TP_SCRIPT = """
import json, os, sys
from engine import LLM, SamplingParams
ckpt, photos, out = sys.argv[1:4]
prompts = [[{"text": "Say something about a stop sign."}],
           [{"image": os.path.join(photos, "coffee.png")}, {"text": "What is in the picture?"}]]
llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=512, num_blocks=64, block_size=16, progress=False,
          tensor_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
outs = llm.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6, logprobs=-1), use_tqdm=False)
import torch
torch.save([(list(o.token_ids), torch.stack(o.outputs[0].logprobs)) for o in outs], out + "." + os.environ.get("RANK", "0"))
"""


def test_tensor_parallel_2_gives_the_single_process_tokens(ckpt, photo_dir, tmp_path):
    """torchrun, gloo, 2 processes: q/k/v split by head with 2 KV heads over 2 ranks, the vocabulary split."""
    import subprocess
    import sys

    from dist_worker import torchrun  # (tests/ is on the path)

    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(ckpt), str(photo_dir), str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    done = torchrun(2, str(script), str(ckpt), str(photo_dir), str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    want = torch.load(tmp_path / "one.0", weights_only=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"two.{rank}", weights_only=True)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(torch.allclose(a, b, atol=1e-5) for (_, a), (_, b) in zip(got, want, strict=True))


def test_the_server_answers_a_chat_with_an_image(tiny_qwen2vl, photo_dir):
    """python -m engine.serve on Qwen2-VL: an OpenAI chat completion with an image runs through the family's
    chat template; its usage counts the prompt as the engine renders it."""
    import base64
    import subprocess

    import openai
    from test_openai_backend import _listening

    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", str(tiny_qwen2vl), "--port", "0", "--device", "cpu",
                             "--dtype", "float32"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = _listening(proc, timeout_s=180)
        data = base64.b64encode((photo_dir / "coffee.png").read_bytes()).decode()
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY").chat.completions.create(
            model=str(tiny_qwen2vl), max_tokens=4, temperature=0, extra_body={"min_tokens": 4},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                                   {"type": "text", "text": "What is in the picture?"}]}],
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    want = _llm(tiny_qwen2vl).llm_engine.prompt_token_ids([{"image": str(photo_dir / "coffee.png")},
                                                           {"text": "What is in the picture?"}])  # fmt: skip
    assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens == len(want)


def test_the_benchmark_prints_both_systems_and_their_agreement(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks/engine_qwen2_vl.py"), "--requests", "4", "--images", "3",
                           "--hf_batches", "1,2", "--max_pixels", str(112 * 112), "--checkpoint_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines() if line.endswith("/4")}
    assert set(rows) == {"transformers batch 1", "transformers batch 2", "engine"}
    assert all(line.endswith(" 4/4") for line in rows.values())  # the same greedy tokens in every setting
    assert "engine / transformers best (transformers batch" in proc.stdout


def test_the_shipped_config_asks_lmms_evals_textvqa_question(tiny_qwen2vl, textvqa, tmp_path):
    import json
    from pathlib import Path

    import yaml

    from modeltest.cli import main

    shipped = yaml.safe_load((Path(__file__).parent.parent / "configs/model/qwen2_vl.yaml").read_text())
    assert shipped["backend"] == "engine"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({**shipped, "model_path": str(tiny_qwen2vl), "data_type": "fp32"}))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(textvqa)}))
    assert main(["--model_config_path", str(tmp_path / "m.yaml"), "--task_config_path", str(tmp_path / "t.yaml"),
                 "--device", "cpu", "--limit", "1", "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 0  # fmt: skip
    (path,) = (tmp_path / "out").glob("debug/**/samples.jsonl")
    record = json.loads(path.read_text().splitlines()[0])
    assert record["prompt"].endswith(f"{record['question']}\nAnswer the question using a single word or phrase."
                                     "<|im_end|>\n<|im_start|>assistant\n")
