"""Where a run writes, and the writers: results CSV + JSON, samples.jsonl, the seed's debug txt.

Layout (the seed's, with a real CSV):
  <output_dir>/results/<NPU|GPU|CPU>/<task_type>_test/<task>/<data_type>/<model>/
      <task>_<model_type>_batch<bs>_tp<tp>_result.csv   (+ _result.json)
  <output_dir>/debug/<same folders>/<task>_<model_type>_batch<bs>_tp<tp>/
      samples.jsonl   one JSON object per sample, appended and flushed as it finishes
      run_config.json what the samples were made with (a changed config is refused on resume)
      outputs_<timestamp>.txt   with --save_debug_enable: [output, model input, e2e_time] per line
Performance runs (task_type performance / performance_maxbs): output.performance_paths.
Score-only mode (--predictions) names no device or dtype (score_only_paths):
  <output_dir>/results/predictions/<task_type>_test/<task>/<predictions file stem>/<task>_result.csv
An OpenAI-compatible endpoint (--backend openai) is no device here either (endpoint_paths):
  <output_dir>/results/openai/<task_type>_test/<task>/<served model>/<task>_result.csv
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelTestError

CSV_COLUMNS = ["Tasks", "N-Shot", "Total", "Pass", "Metric", "Value"]


@dataclass(frozen=True)
class RunPaths:
    result_csv: Path
    result_json: Path
    debug_dir: Path

    @property
    def samples(self) -> Path:
        return self.debug_dir / "samples.jsonl"

    @property
    def run_config(self) -> Path:
        return self.debug_dir / "run_config.json"


SCORE_ONLY = "predictions"  # score-only mode's folder where a run has NPU/GPU/CPU


def device_family(device: str) -> str:
    """The seed's folder name for a device: NPU, GPU or CPU."""
    return {"npu": "NPU", "cuda": "GPU"}.get(device.split(":")[0], "CPU")


def predictions_family(path) -> str:
    """Score-only mode: the device a predictions file's name says made it - the seed's
    `gpu_coco_rst.json` / `npu_coco_rst.json` (`cpu_` too) - else PREDICTIONS. It names the captions
    file written back (`gpu_coco_rst.json` stays gpu_...), never a device this run used."""
    prefix = Path(path).name.split("_", 1)[0].lower()
    return {"npu": "NPU", "gpu": "GPU", "cpu": "CPU"}.get(prefix, SCORE_ONLY.upper())


def run_paths(output_dir, family, task_type, task, data_type, model, model_type, batch_size, tp) -> RunPaths:
    rel = Path(family, f"{task_type}_test", task, data_type, model)
    stem = f"{task}_{model_type}_batch{batch_size}_tp{tp}"
    return _paths(output_dir, rel, stem)


def performance_paths(output_dir, family, task_type, task, data_type, model, model_type, tp,
                      batch_size: int | None = None, suffix: str = "result") -> RunPaths:
    """The seed's performance files: per batch size
      <output_dir>/results/<NPU|GPU|CPU>/performance_test/<task>/<data_type>/<model>/
          performance_<model_type>_batch<bs>_tp<tp>_result.csv (+ .json)
    and for performance_maxbs (no batch size: it is the answer) performance_maxbs_<model_type>_tp<tp>_
    <suffix>.csv, suffix round_result (every probe) or final_result."""
    batch = f"_batch{batch_size}" if batch_size is not None else ""
    return _performance(output_dir, Path(family, f"{task_type}_test", task, data_type, model),
                        f"{task_type}_{model_type}{batch}_tp{tp}", suffix)  # fmt: skip


def endpoint_performance_paths(output_dir, task_type, task, served_model: str, batch_size: int | None = None,
                               suffix: str = "result") -> RunPaths:  # fmt: skip
    """performance_paths for an endpoint (--backend openai): no device, dtype, model type or tp of this
    machine, so none is named (as endpoint_paths)
      <output_dir>/results/openai/performance_test/<task>/<served model>/performance_batch<bs>_result.csv"""
    batch = f"_batch{batch_size}" if batch_size is not None else ""
    rel = Path(ENDPOINT, f"{task_type}_test", task, served_folder(served_model))
    return _performance(output_dir, rel, f"{task_type}{batch}", suffix)


def _performance(output_dir, rel: Path, stem: str, suffix: str) -> RunPaths:
    results = Path(output_dir, "results", rel)
    return RunPaths(results / f"{stem}_{suffix}.csv", results / f"{stem}_{suffix}.json",
                    Path(output_dir, "debug", rel, stem))  # fmt: skip


def score_only_paths(output_dir, task_type, task, predictions) -> RunPaths:
    """Score-only mode (--predictions): no device, dtype, model type, batch size or tp played a part,
    so the path names none; the predictions file's stem keeps two files scored into one --output_dir
    (gpu_coco_rst.json and npu_coco_rst.json) apart.
      <output_dir>/results/predictions/<task_type>_test/<task>/<predictions stem>/<task>_result.csv"""
    return _paths(output_dir, Path(SCORE_ONLY, f"{task_type}_test", task, Path(predictions).stem), task)


ENDPOINT = "openai"  # the folder of runs against an OpenAI-compatible endpoint, where a run has NPU/GPU/CPU


def endpoint_paths(output_dir, task_type, task, served_model: str) -> RunPaths:
    """A run against an endpoint (--backend openai): no device, dtype, model type, batch size or tp of this
    machine played a part, so the path names none; the served model's name does (made one safe folder
    name: vLLM serves a model under its path, e.g. /models/qwen-vl -> models_qwen-vl).
      <output_dir>/results/openai/<task_type>_test/<task>/<served model>/<task>_result.csv"""
    return _paths(output_dir, Path(ENDPOINT, f"{task_type}_test", task, served_folder(served_model)), task)


def served_folder(served_model: str) -> str:
    """A served model's name as one safe folder name (vLLM serves a model under its path)."""
    return re.sub(r"[^\w.-]+", "_", served_model).strip("._") or "model"


def _paths(output_dir, rel: Path, stem: str) -> RunPaths:
    results = Path(output_dir, "results", rel)
    return RunPaths(results / f"{stem}_result.csv", results / f"{stem}_result.json", Path(output_dir, "debug", rel, stem))


def probe_writable(folder: Path, create: bool) -> None:
    """Before any work: a file can be written in `folder` (a folder that is a file, read-only or on a
    full disk shows now, not after the run). A 4 KiB probe is written, synced and removed — in the
    folder, made first (`create`), or else in its nearest existing parent (nothing is made). OSError
    otherwise, naming where."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder
    else:
        target = next(p for p in (folder, *folder.absolute().parents) if p.exists() or p == p.parent)
        if not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(target))
    fd, probe = tempfile.mkstemp(dir=target, prefix=".modeltest-write-check-")
    try:
        os.write(fd, b"\0" * 4096)  # a few KB, like the outputs: a full disk refuses them now
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def dataset_fingerprint(records) -> str:
    """SHA-256 over the samples' ids, questions, image file names and references, in id order (not the
    rendered prompts: the same image has another path on another machine)."""
    items = sorted(
        ([str(r["id"]), r.get("question"), os.path.basename(str(r.get("image") or "")), r.get("references") or []]
         for r in records),
        key=lambda item: item[0],
    )  # fmt: skip
    return hashlib.sha256(json.dumps(items, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file or nothing: a killed run never leaves half a results file. The file gets the
    permissions `open(path, "w")` would give (0666 less the umask), so the team can read the results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`. Not tempfile.mkstemp: it creates files 0600 whatever the umask,
    and os.replace keeps that mode. Created here with mode 0666, so the kernel applies the umask (and a
    folder's default ACL) exactly as for open(path, "w")."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv(path: Path, rows: list[list], header: list[str] = CSV_COLUMNS) -> None:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


class JsonlAppender:
    """Append one JSON object per line; each line goes out in one write and is flushed at once,
    so a run killed at any moment loses at most the samples in flight."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# What every record in samples.jsonl has (runner._record writes them; resume, the results and the task's
# outputs read them): field -> (the JSON types it may take, how a message names them).
RECORD_FIELDS = {
    "id": ((int, str), "an integer or text"),
    "subject": ((str,), "text"),
    "prediction": ((str,), "text"),
    "score": ((int, float), "a number"),
    "error": ((str, type(None)), "text or null"),
}


def _record_problem(rec) -> str | None:
    """Why `rec` (a parsed line) is not a sample record, or None when it is one."""
    if not isinstance(rec, dict):
        return f"JSON {json.dumps(rec)[:40]}, not an object"
    missing = [k for k in RECORD_FIELDS if k not in rec]
    if missing:
        return f"a record without {', '.join(map(repr, missing))}"
    for key, (types, named) in RECORD_FIELDS.items():
        value = rec[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{key!r} is {json.dumps(value)[:40]}, not {named}"
    return None


def read_samples(path: Path, repair: bool = True) -> dict:
    """Records already written, by id. A torn last line (the run was killed mid-write: no newline, or
    not JSON) is left out, and with `repair` cut off so the next append starts on a clean line; a
    complete record that only lacks its newline is kept (and with `repair` given it). Any other line
    that is not a whole sample record (RECORD_FIELDS) is an error naming the file and line."""
    if not path.exists():
        return {}
    records = {}
    with open(path, "rb+" if repair else "rb") as f:
        lines = f.read().splitlines(keepends=True)
        good = 0
        for lineno, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                rec, problem = None, "not JSON"
            else:
                problem = _record_problem(rec)
            last = lineno == len(lines)
            if problem is None and last and not line.endswith(b"\n"):  # a whole record; only its newline is missing
                if repair:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
            elif problem is not None:
                if last and (problem == "not JSON" or not line.endswith(b"\n")):  # torn by a kill mid-write
                    if repair:
                        f.truncate(good)
                    break
                raise ModelTestError(f"{path}:{lineno}: not a sample record ({problem}); fix or delete that line, "
                                     "or rerun with --overwrite")  # fmt: skip
            records[rec["id"]] = rec
            good += len(line)
    return records
