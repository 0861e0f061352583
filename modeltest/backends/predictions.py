"""Score-only mode: answers made elsewhere, looked up by question_id; no model is loaded.

Accepted files: JSONL with one {"question_id": .., "answer": ..} per line, the JSON list
[{"question_id", "answer"}, ...] that the official Qwen-VL evaluation scripts write, or a caption
file keyed by image - the seed's {image file name: caption} (gpu_coco_rst.json / npu_coco_rst.json)
or its older {"image_file": [...], "model_answer": [...]} - whose image names are the ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelTestError
from ..tasks.base import read_json, read_jsonl
from .base import Backend, Generation, Request


def load_predictions(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelTestError(f"predictions file not found: {path}")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("{") and _is_caption_map(path):
        from ..clip_score import read_captions

        return {e.image: e.caption for e in read_captions(path)}
    if head.startswith("["):
        rows = read_json(path)
        where = [f"{path}: entry {i}" for i in range(len(rows))]
    else:
        rows = read_jsonl(path)
        where = [f"{path}: record {i + 1}" for i in range(len(rows))]
    out = {}
    for loc, row in zip(where, rows, strict=True):
        if not isinstance(row, dict) or "question_id" not in row or "answer" not in row:
            raise ModelTestError(f"{loc}: expected {{\"question_id\": .., \"answer\": ..}}, got {json.dumps(row)[:120]}")
        if not isinstance(row["answer"], str):
            raise ModelTestError(f"{loc}: 'answer' must be text, got {type(row['answer']).__name__}")
        qid = row["question_id"]
        if qid in out:
            raise ModelTestError(f"{loc}: question_id {qid!r} appears more than once")
        out[qid] = row["answer"]
    if not out:
        raise ModelTestError(f"{path}: no predictions in the file")
    return out


def _is_caption_map(path: Path) -> bool:
    """One JSON object that is not a single {question_id, ...} record (a one-line JSONL file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # JSONL, or broken: the JSONL reader names the line
    return isinstance(data, dict) and "question_id" not in data


class PredictionsBackend(Backend):
    name = "predictions"

    def __init__(self, predictions: dict):
        self.predictions = predictions

    def generate(self, requests: list[Request]) -> list[Generation]:
        return [Generation(text=self.predictions[str(r.id)]) for r in requests]
