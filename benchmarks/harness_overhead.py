"""Harness overhead: the runner end to end (load, prompt, score, log, results) with a backend that
answers instantly, on TextVQA data in the seed's format. Target: >= 2,000 samples/s on 2 CPU cores.

    python benchmarks/harness_overhead.py [--samples 5000] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from modeltest.backends.base import Backend, Generation
from modeltest.config import MetricConfig, TaskConfig
from modeltest.runner import RunOptions, run

WORDS = ["dakota", "stop", "22", "coca cola", "white", "the yellow one", "nokia", "3:45", "no", "1,000"]


class InstantBackend(Backend):
    name = "instant"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def generate(self, requests):
        return [Generation(text=self.rng.choice(WORDS) + "<|endoftext|>", output_tokens=3) for _ in requests]


def make_dataset(root: Path, n: int, rng: random.Random) -> Path:
    (root / "train_images").mkdir(parents=True)
    rows, anns = [], []
    for i in range(n):
        qid = 100000 + i
        rows.append({"image": f"train_images/{i % 500:05d}.jpg", "question": f"what is written on sign {i}?",
                     "question_id": qid, "answer": "stop"})  # fmt: skip
        answers = [rng.choice(WORDS) for _ in range(10)]
        anns.append({"question_id": qid, "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    path = root / "textvqa_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": anns}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--batch_size", type=int, default=8)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "textvqa", args.samples, rng)
        for normalizer in ("evalai", "official"):
            cfg = TaskConfig(task_name="textvqa", local_dataset_path=str(data), metric=MetricConfig("vqa_accuracy", normalizer))
            opts = RunOptions(output_dir=str(Path(tmp) / f"out-{normalizer}"), backend="hf", device="cpu",
                              batch_size=args.batch_size, progress=True)  # fmt: skip
            start = time.perf_counter()
            res = run(None, cfg, opts, backend=InstantBackend(rng))
            elapsed = time.perf_counter() - start
            print(f"[{normalizer}] {res.total} samples in {elapsed:.2f} s end to end: "
                  f"{res.total / elapsed:,.0f} samples/s (target >= 2,000)")  # fmt: skip


if __name__ == "__main__":
    main()
