"""Protects the whole pipeline on a real model: a tiny random Qwen2-VL saved in transformers' format,
real photos, the TextVQA task, outputs, batching and resume - through the CLI and mm_run.sh."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from modeltest.backends.base import Request
from modeltest.backends.hf import HFBackend
from modeltest.cli import main
from modeltest.config import load_model_config

REPO = Path(__file__).resolve().parent.parent


def _samples(out: Path) -> list[dict]:
    (path,) = out.glob("debug/**/samples.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()]


def _result(out: Path) -> list[list[str]]:
    (path,) = out.glob("results/**/*_result.csv")
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_hf_backend_batched_equals_single(hf_model_yaml, textvqa):
    backend = HFBackend(load_model_config(hf_model_yaml), device="cpu")
    img = str(textvqa.parent / "train_images")
    reqs = [Request(i, [{"image": f"{img}/{name}"}, {"text": q}], 6)
            for i, (name, q) in enumerate([("astronaut.jpg", "what is this?"), ("coffee.png", "what color is the cup? Answer:")])]  # fmt: skip
    batched = backend.generate(reqs)
    single = [backend.generate([r])[0] for r in reqs]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(0 < g.output_tokens <= 6 and g.input_tokens > 10 and g.error is None for g in batched)
    assert "<|image_pad|>" in batched[0].prompt and "what is this?" in batched[0].prompt
    missing = backend.generate([Request(9, [{"image": f"{img}/nope.jpg"}, {"text": "q"}], 6)] + reqs[:1])
    assert "image not found" in missing[0].error and missing[1].text == batched[0].text


def test_textvqa_end_to_end_with_resume(hf_model_yaml, task_yaml, tmp_path):
    base = ["--model_config_path", str(hf_model_yaml), "--task_config_path", str(task_yaml), "--device", "cpu",
            "--no_progress"]  # fmt: skip
    assert main(base + ["--output_dir", str(tmp_path / "full"), "--batch_size", "3"]) == 0
    full = _samples(tmp_path / "full")
    assert len(full) == 8 and all(r["error"] is None and r["output_tokens"] > 0 for r in full)
    assert "<|im_start|>user" in full[0]["prompt"]
    # a first run stopped after 3 samples, then the same command again
    part = tmp_path / "part"
    assert main(base + ["--output_dir", str(part), "--batch_size", "3", "--limit", "3"]) == 0
    assert main(base + ["--output_dir", str(part), "--batch_size", "3"]) == 0
    resumed = _samples(part)
    assert [r["id"] for r in resumed] == [r["id"] for r in full]
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in full]
    assert _result(part) == _result(tmp_path / "full")
    assert _result(part)[0] == ["Tasks", "N-Shot", "Total", "Pass", "Metric", "Value"]


def _cli_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_loses_at_most_the_samples_in_flight(hf_model_yaml, task_yaml, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "modeltest", "--model_config_path", str(hf_model_yaml), "--task_config_path",
           str(task_yaml), "--device", "cpu", "--no_progress", "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    samples = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("debug/**/samples.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            samples = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert samples is not None, "the run wrote no samples before it was killed"
    kept = len(samples.read_text().splitlines())
    assert kept < 8, "the run finished before it could be killed; the test needs more samples"
    done = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in _samples(out)]
    assert ids == list(range(34602, 34610))  # nothing twice, nothing lost
    ref = tmp_path / "ref"
    assert main(cmd[3:-1] + [str(ref)]) == 0
    assert [r["prediction"] for r in _samples(out)] == [r["prediction"] for r in _samples(ref)]
    assert _result(out) == _result(ref)


def _mm_run(tmp_path, *args, env_extra=None):
    """Run a copy of scripts/mm_run.sh + configs/ from a folder whose path has spaces."""
    root = tmp_path / "my repo copy"
    if not root.exists():
        shutil.copytree(REPO / "scripts", root / "scripts")
        shutil.copytree(REPO / "configs", root / "configs")
    env = _cli_env()
    # one process, outputs under the copy (tests/test_mm_run.py covers the layouts and the torchrun launch)
    for key in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "NNODES", "NODE_RANK",
                "TP", "DP", "MODELTEST_OUTPUT_DIR"):  # fmt: skip
        env.pop(key, None)
    env.update(env_extra or {}, PYTHON=sys.executable)
    return root, subprocess.run(["bash", str(root / "scripts/mm_run.sh"), *args], env=env, cwd=root,
                                capture_output=True, text=True, timeout=300)  # fmt: skip


def test_mm_run_lists_tasks_and_models_on_unknown_names(tmp_path):
    _, res = _mm_run(tmp_path, "textvqq", "qwen_vl")
    assert res.returncode == 2 and "unknown task 'textvqq'" in res.stderr
    assert "textvqa" in res.stderr and "qwen_vl" in res.stderr
    _, res = _mm_run(tmp_path, "textvqa", "nope")
    assert res.returncode == 2 and "unknown model 'nope'" in res.stderr


def test_mm_run_end_to_end_with_spaces_in_paths(tmp_path, textvqa, tiny_qwen2vl):
    root = tmp_path / "my repo copy"
    _mm_run(tmp_path, "--help")  # copies the tree
    data = tmp_path / "data with spaces"
    shutil.copytree(textvqa.parent, data)
    (root / "configs/model/tiny.yaml").write_text(
        f"model_name: tiny\nmodel_path: '{tiny_qwen2vl}'\ndata_type: fp32\nbackend: hf\n"
        "mm_model:\n  infer_params:\n    max_output_length: 4\n"
    )
    _, res = _mm_run(tmp_path, "textvqa", "tiny", "--dataset_path", str(data / "textvqa_val.jsonl"),
                     "--limit", "2", "--device", "cpu", "--no_progress")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (csv_path,) = (root / "output").glob("*/modeltest/tiny/precision_result/results/CPU/precision_test/textvqa/"
                                         "fp32/tiny/textvqa_pa_batch1_tp1_result.csv")  # fmt: skip
    assert csv_path.read_text().splitlines()[1].startswith("textvqa,0,2,")
