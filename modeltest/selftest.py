"""`python -m modeltest selftest`: proves an install works end to end without downloading anything.

Writes a tiny Qwen-VL with random weights in the original on-disk format (config.json, the real
qwen.tiktoken from the dashscope package, sharded safetensors with the original key names) and a
few TextVQA samples made from real photos (scikit-image) in the seed's layout, then runs the real
pipeline on them — config loading, the engine backend, TextVQA scoring, results and per-sample
logs — on CPU, and prints where everything is. The weights are random, so the answers are
gibberish and the accuracy is about 0: the point is that every stage runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelTestError

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
QUESTIONS = (
    ("what is written on the sign?", ["stop"] * 10),
    ("what color is the cup?", ["white"] * 6 + ["blue"] * 4),
)


def write_textvqa(root: Path, n: int = 8) -> Path:
    """textvqa_val.jsonl + textvqa_val_annotations.json + train_images/ made from real photos."""
    import numpy as np
    import skimage.data
    from PIL import Image

    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    rows, annotations = [], []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        file = images / f"{name}.jpg"
        if not file.exists():
            arr = getattr(skimage.data, name)()
            Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, -1)).convert("RGB").save(file)
        question, answers = QUESTIONS[i % len(QUESTIONS)]
        qid = 34602 + i
        rows.append({"image": f"train_images/{file.name}", "question": question, "question_id": qid, "answer": answers[0]})
        annotations.append({"question_id": qid, "image_id": name,
                            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})  # fmt: skip
    jsonl = root / "textvqa_val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return jsonl


def main(argv: list[str] | None = None) -> int:
    import yaml

    from engine import EngineError, tiny_config, write_random_checkpoint

    p = argparse.ArgumentParser(prog="modeltest selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="work folder (default: a new temporary folder, kept so you can look)")
    p.add_argument("--samples", type=int, default=8, help="TextVQA samples to make (default 8)")
    args = p.parse_args(argv)
    if args.samples < 1:
        raise ModelTestError(f"--samples must be >= 1, got {args.samples}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="modeltest-selftest-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print(f"selftest: writing a tiny random Qwen-VL and {args.samples} TextVQA samples to {root}")
    model_dir = root / "tiny-qwen-vl"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    try:
        write_random_checkpoint(model_dir, tiny_config(), seed=0)
    except EngineError as e:
        raise ModelTestError(str(e)) from None
    dataset = write_textvqa(root / "textvqa", args.samples)
    cfg = root / "configs"
    cfg.mkdir(exist_ok=True)
    model_yaml = cfg / "tiny_qwen_vl.yaml"
    model_yaml.write_text(yaml.safe_dump({
        "model_name": "tiny_qwen_vl", "model_path": str(model_dir), "data_type": "fp32", "backend": "engine",
        "mm_model": {"infer_params": {"max_batch_size": 4}},
    }, sort_keys=False), encoding="utf-8")  # fmt: skip
    task_yaml = cfg / "textvqa.yaml"
    task_yaml.write_text(yaml.safe_dump({
        "task_type": "precision", "task_name": "textvqa", "local_dataset_path": str(dataset),
        "prompt": "{question} Answer:", "requested_max_output_length": 10,
        "metric": {"metric_type": "vqa_accuracy", "normalizer": "evalai"},
        "subject_mapping": {"textvqa": {"name": "textvqa"}},
    }, sort_keys=False), encoding="utf-8")  # fmt: skip

    from .config import load_model_config, load_task_config
    from .runner import RunOptions, run

    out_dir = root / "output"
    result = run(
        load_model_config(str(model_yaml)),
        load_task_config(str(task_yaml)),
        RunOptions(output_dir=str(out_dir), device="cpu", batch_size=4, overwrite=True, progress=False),
    )
    elapsed = time.perf_counter() - started
    print(f"selftest: {result.total} samples, {result.errors} failed, accuracy {result.value:.2f} "
          f"(random weights: about 0 is expected) in {elapsed:.1f} s")  # fmt: skip
    for label, path in (
        ("results CSV", result.paths.result_csv),
        ("summary JSON", result.paths.result_json),
        ("per-sample log", result.paths.samples),
        ("model (original format)", model_dir),
        ("dataset", dataset),
        ("configs", cfg),
    ):
        print(f"  {label:24s} {path}")
    if result.errors:
        print(f"selftest: FAILED: {result.errors} sample(s) failed; see {result.paths.samples}")
        return 1
    print("selftest: OK")
    return 0
