"""Where a run writes, and the writers: results CSV + JSON, samples.jsonl, the seed's debug txt.

Layout (the seed's, with a real CSV):
  <output_dir>/results/<NPU|GPU|CPU>/<task_type>_test/<task>/<data_type>/<model>/
      <task>_<model_type>_batch<bs>_tp<tp>_result.csv   (+ _result.json)
  <output_dir>/debug/<same folders>/<task>_<model_type>_batch<bs>_tp<tp>/
      samples.jsonl   one JSON object per sample, appended and flushed as it finishes
      run_config.json what the samples were made with (a changed config is refused on resume)
      outputs_<timestamp>.txt   with --save_debug_enable: [output, model input, e2e_time] per line
"""

from __future__ import annotations

import csv
import json
import os
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


def device_family(device: str) -> str:
    """The seed's folder name for a device: NPU, GPU or CPU."""
    return {"npu": "NPU", "cuda": "GPU"}.get(device.split(":")[0], "CPU")


def run_paths(output_dir, family, task_type, task, data_type, model, model_type, batch_size, tp) -> RunPaths:
    rel = Path(family, f"{task_type}_test", task, data_type, model)
    stem = f"{task}_{model_type}_batch{batch_size}_tp{tp}"
    results = Path(output_dir, "results", rel)
    return RunPaths(results / f"{stem}_result.csv", results / f"{stem}_result.json", Path(output_dir, "debug", rel, stem))


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file or nothing: a killed run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv(path: Path, rows: list[list]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
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


def read_samples(path: Path, repair: bool = True) -> dict:
    """Records already written, by id. A torn last line (the run was killed mid-write) is left out,
    and with `repair` cut off so the next append starts on a clean line; a bad line anywhere else is
    an error."""
    if not path.exists():
        return {}
    records = {}
    with open(path, "rb+" if repair else "rb") as f:
        lines = f.read().splitlines(keepends=True)
        good = 0
        for lineno, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                ok = line.endswith(b"\n") and isinstance(rec, dict) and "id" in rec
            except ValueError:
                ok = False
            if not ok:
                if lineno == len(lines):
                    if repair:
                        f.truncate(good)
                    break
                raise ModelTestError(
                    f"{path}:{lineno}: not a sample record; fix or delete that line, or rerun with --overwrite"
                )
            records[rec["id"]] = rec
            good += len(line)
    return records
