"""`python -m modeltest selftest`: proves an install works end to end without downloading anything.

Writes a tiny Qwen-VL with random weights in the original on-disk format (config.json, the real
qwen.tiktoken from the dashscope package, sharded safetensors with the original key names) and a
few TextVQA samples made from real photos (the ones matplotlib ships as sample data) in the seed's
layout, then runs the real pipeline on them — config loading, the engine backend, TextVQA scoring,
results and per-sample logs — on CPU, and prints what it did. The weights are random, so the answers
are gibberish and the accuracy is about 0: the point is that every stage runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelTestError

# Real photos that a plain install has: matplotlib (a dependency) ships them as sample data, so the
# selftest needs no test-only package. A camera JPEG and an RGBA PNG: both decoding paths run.
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
QUESTIONS = (
    ("what is written on the sign?", ["stop"] * 10),
    ("what color is the cup?", ["white"] * 6 + ["blue"] * 4),
)
EPILOG = """\
exit codes:
  0    every stage ran and no sample failed (selftest: OK)
  1    the pipeline ran but some samples failed (selftest: FAILED, with the first error)
  2    bad usage or input (one line on stderr)
  130  interrupted

Without --dir the work folder (about 150 MB, mostly the model) is a temporary folder removed at the
end, whether the selftest passed or not; --keep keeps it."""


def photo_files() -> list[Path]:
    """The sample photos in matplotlib's data folder; a trimmed matplotlib install is one error line."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    missing = [name for name in PHOTOS if not (folder / name).is_file()]
    if missing:
        raise ModelTestError(f"{folder}: matplotlib's sample photos {', '.join(missing)} are missing; reinstall "
                             "matplotlib (pip install --force-reinstall matplotlib)")  # fmt: skip
    return [folder / name for name in PHOTOS]


def write_textvqa(root: Path, n: int = 8) -> Path:
    """textvqa_val.jsonl + textvqa_val_annotations.json + train_images/ made from real photos."""
    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    photos = photo_files()
    rows, annotations = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        file = images / photo.name
        if not file.exists():
            shutil.copyfile(photo, file)  # as shipped: the engine decodes the original file
        question, answers = QUESTIONS[i % len(QUESTIONS)]
        qid = 34602 + i
        rows.append({"image": f"train_images/{file.name}", "question": question, "question_id": qid, "answer": answers[0]})
        annotations.append({"question_id": qid, "image_id": photo.stem,
                            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})  # fmt: skip
    jsonl = root / "textvqa_val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return jsonl


def folder_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modeltest selftest", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dir", help="work folder, kept (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (about 150 MB) to look at")
    p.add_argument("--samples", type=int, default=8, help="TextVQA samples to make (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        raise ModelTestError(f"--samples must be >= 1, got {args.samples}")
    if args.dir:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        return _selftest(root, args.samples)
    root = Path(tempfile.mkdtemp(prefix="modeltest-selftest-"))
    if args.keep:
        print(f"selftest: work folder {root} (temporary, kept: --keep)")
        return _selftest(root, args.samples)
    print(f"selftest: work folder {root} (temporary: removed at the end; --keep or --dir DIR keeps it)")
    try:
        return _selftest(root, args.samples, kept=False)
    finally:  # passed, failed, raised or interrupted: a temporary folder never outlives the selftest
        size = folder_size(root)
        shutil.rmtree(root, ignore_errors=True)
        print(f"selftest: removed the work folder {root} ({size / 1e6:.0f} MB: model, dataset, outputs)")


def _selftest(root: Path, samples: int = 8, kept: bool = True) -> int:
    import yaml

    from engine import EngineError, tiny_config, write_random_checkpoint

    started = time.perf_counter()
    print(f"selftest: writing a tiny random Qwen-VL and {samples} TextVQA samples to {root}")
    model_dir = root / "tiny-qwen-vl"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    dataset = write_textvqa(root / "textvqa", samples)  # first: a missing photo stops it before the model is written
    try:
        write_random_checkpoint(model_dir, tiny_config(), seed=0)
    except EngineError as e:
        raise ModelTestError(str(e)) from None
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
    if kept:
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
        # the log goes with a removed folder: its first error is shown here so the failure can be read
        where = f"see {result.paths.samples}" if kept else f"first: {_first_error(result.paths.samples)}"
        print(f"selftest: FAILED: {result.errors} sample(s) failed; {where}")
        return 1
    print("selftest: OK")
    return 0


def _first_error(samples: Path) -> str:
    try:
        for line in Path(samples).read_text(encoding="utf-8").splitlines():
            error = json.loads(line).get("error")
            if error:
                return str(error).splitlines()[0][:300]
    except (OSError, ValueError):
        pass
    return "(not recorded)"
