"""Protects the harness on the bundled engine: the `engine` backend (Qwen-VL's raw VQA prompt, batching,
per-sample failures), `bash scripts/mm_run.sh textvqa qwen_vl` on a Qwen-VL checkpoint in the original
format, and `python -m modeltest selftest`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import SamplingParams
from modeltest.backends.base import Request
from modeltest.backends.engine import EngineBackend, _label
from modeltest.config import load_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backend(qwen_vl_ckpt, tmp_path_factory):
    import yaml

    cfg = tmp_path_factory.mktemp("cfg") / "qwen_vl.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name": "tiny_qwen_vl", "model_path": str(qwen_vl_ckpt), "data_type": "fp32", "backend": "engine",
        "block_size": 32, "mm_model": {"infer_params": {"max_batch_size": 3}},
    }))  # fmt: skip
    return EngineBackend(load_model_config(cfg), device="cpu")


def test_engine_backend_renders_qwen_vqa_prompt_and_batches(backend, textvqa):
    img = textvqa.parent / "train_images"
    reqs = [Request(i, [{"image": str(img / name)}, {"text": q}], 5)
            for i, (name, q) in enumerate([("astronaut.jpg", "what is this? Answer:"),
                                           ("coffee.png", "what color is the cup? Answer:"),
                                           ("chelsea.jpg", "what animal is it? Answer:"),
                                           ("rocket.png", "what is written? Answer:")])]  # fmt: skip
    batched = backend.generate(reqs)
    single = [backend.generate([r])[0] for r in reqs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert batched[0].prompt == f"<img>{img / 'astronaut.jpg'}</img>what is this? Answer:"
    assert all(g.error is None and g.output_tokens == 5 and g.input_tokens > 258 for g in batched)
    assert batched[0].extra["finish_reason"] == "length" and batched[0].extra["ttft_s"] > 0
    # the same request straight through the engine, with the image path in the prompt as the original takes it
    direct = backend.llm.generate(batched[0].prompt, SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert direct.text == batched[0].text


def test_engine_backend_isolates_a_broken_image(backend, textvqa, tmp_path):
    img = textvqa.parent / "train_images"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = Request(2, [{"image": str(img / "astronaut.jpg")}, {"text": "what is this? Answer:"}], 4)
    streamed = []
    out = backend.generate([
        Request(0, [{"image": str(img / "nope.jpg")}, {"text": "q"}], 4),
        Request(1, [{"image": str(broken)}, {"text": "q"}], 4),
        good,
    ], on_result=lambda i, gen: streamed.append((i, gen)))  # fmt: skip
    assert sorted(i for i, _ in streamed) == [0, 1, 2] and all(out[i] is gen for i, gen in streamed)
    assert "image not found" in out[0].error and "nope.jpg" in out[0].error
    assert "unreadable" in out[1].error and "broken.jpg" in out[1].error
    assert out[2].error is None and out[2].text == backend.generate([good])[0].text


def test_image_label_fits_the_span():
    assert _label("/data/a.jpg") == "/data/a.jpg"
    long = "/" + "d" * 300 + "/photo.jpg"
    assert _label(long) == "photo.jpg"
    assert _label({"path": "x.png", "bytes": b""}) == "x.png"


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE",
                "NNODES", "NODE_RANK", "TP", "DP", "MODELTEST_OUTPUT_DIR"):
        env.pop(key, None)
    return env


def _mm_run(ckpt, textvqa, out, *flags, env=None):
    return subprocess.run(
        ["bash", str(REPO / "scripts/mm_run.sh"), "textvqa", "qwen_vl", "--model_path", str(ckpt),
         "--dataset_path", str(textvqa), "--limit", "3", "--device", "cpu", "--no_progress", "--batch_size", "2",
         *flags],
        env={**_env(), "MODELTEST_OUTPUT_DIR": str(out), **(env or {})}, capture_output=True, text=True,
        timeout=600, cwd=REPO,
    )  # fmt: skip


def test_mm_run_textvqa_qwen_vl_on_original_format_weights(qwen_vl_ckpt, textvqa, tmp_path):
    out = tmp_path / "out"
    res = _mm_run(qwen_vl_ckpt, textvqa, out)
    assert res.returncode == 0, res.stderr
    (csv_path,) = out.glob("results/CPU/precision_test/textvqa/bf16/qwen_vl/textvqa_pa_batch2_tp1_result.csv")
    assert csv_path.read_text().splitlines()[1].startswith("textvqa,0,3,")
    (samples,) = out.glob("debug/**/samples.jsonl")
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == 3 and all(r["error"] is None and r["output_tokens"] > 0 for r in rows)
    assert rows[0]["prompt"].startswith("<img>") and rows[0]["prompt"].endswith("Answer:")

    # two processes on the CPU, tensor parallel: the pre-flight, then torchrun (this config is bf16, where
    # the split sums round differently: tests/test_data_parallel.py compares answers in fp32)
    two = tmp_path / "two"
    res = _mm_run(qwen_vl_ckpt, textvqa, two, env={"NPROC_PER_NODE": "2", "MODELTEST_DIST_TIMEOUT": "60"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "modeltest: check passed" in res.stderr
    (csv_two,) = two.glob("results/CPU/precision_test/textvqa/bf16/qwen_vl/textvqa_pa_batch2_tp2_result.csv")
    assert csv_two.read_text().splitlines()[1].startswith("textvqa,0,3,")
    (samples_two,) = two.glob("debug/**/samples.jsonl")
    rows_two = [json.loads(x) for x in samples_two.read_text().splitlines()]
    assert sorted(r["id"] for r in rows_two) == sorted(r["id"] for r in rows)
    assert all(r["error"] is None and r["output_tokens"] > 0 for r in rows_two)


def test_selftest_runs_the_whole_pipeline(tmp_path):
    res = subprocess.run([sys.executable, "-m", "modeltest", "selftest", "--dir", str(tmp_path / "st"), "--samples", "4"],
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "selftest: OK" in res.stdout and "4 samples, 0 failed" in res.stdout
    csv_line = next(line for line in res.stdout.splitlines() if "results CSV" in line)
    assert Path(csv_line.split()[-1]).is_file()
    ckpt = tmp_path / "st" / "tiny-qwen-vl"
    assert (ckpt / "qwen.tiktoken").is_file() and (ckpt / "model.safetensors.index.json").is_file()
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen"
