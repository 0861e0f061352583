"""Score-only mode: answers made elsewhere, looked up by question_id; no model is loaded.

Accepted files: JSONL with one {"question_id": .., "answer": ..} per line, the JSON list
[{"question_id", "answer"}, ...] that the official Qwen-VL evaluation scripts write, or a caption
file keyed by image - the seed's {image file name: caption} (gpu_coco_rst.json / npu_coco_rst.json)
or its older {"image_file": [...], "model_answer": [...]} - whose image names are the ids (the same
{id: answer} map keyed by question_id works for TextVQA).

The file is read once as UTF-8 and its kind decided from its content; every error names the file and
the line or entry and speaks of what that kind of file holds (question_id and answer, or images and
captions). Ids are matched as text, so 1000 and "1000" in one file are the same question: an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelTestError
from ..tasks.base import (
    add_unique_id,
    check_id,
    loads_json,
    parse_json,
    read_jsonl_lines,
    read_text,
    show_json,
)
from .base import Backend, Generation, Request

RECORD = '{"question_id": .., "answer": ..}'


def load_predictions(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelTestError(f"predictions file not found: {path}")
    text = read_text(path, "predictions file")
    head = text.lstrip()
    if head.startswith("["):
        rows = parse_json(text, path)
        if not isinstance(rows, list):  # "[..] [..]": not one JSON value
            raise ModelTestError(f"{path}: expected a JSON list of {RECORD}")
        located = [(f"{path}: entry {i}", row) for i, row in enumerate(rows)]
    elif head.startswith("{") and (whole := _whole_object(text, path)) is not None:
        if "question_id" in whole or "answer" in whole:  # one record, alone or pretty-printed
            line = text[: len(text) - len(head)].count("\n") + 1
            located = [(f"{path}: record 1 at line {line}", whole)]
        else:
            return _id_map(whole, path)
    else:
        lines = read_jsonl_lines(path, "predictions file", RECORD)
        located = [(f"{path}: record {n} at line {lineno}", row) for n, (lineno, row) in enumerate(lines, 1)]
    return _records(located, path)


def _whole_object(text: str, path: Path) -> dict | None:
    """The file as one JSON object, or None when it is JSON lines (its first line is a whole value).
    A file that is neither is reported with the whole-file parser's line and column."""
    try:
        data = loads_json(text, path)
    except (json.JSONDecodeError, RecursionError):
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
        except (json.JSONDecodeError, RecursionError):
            parse_json(text, path)  # a broken multi-line object: its own error, line and column
        return None  # JSON lines: the JSONL reader names the line
    return data if isinstance(data, dict) else None


def _records(located: list[tuple[str, object]], path: Path) -> dict:
    """{question_id: answer} from {question_id, answer} records; ids are compared as text."""
    out: dict = {}
    first: dict[str, tuple[str, object]] = {}  # str(id) -> (where, the id as written)
    for loc, row in located:
        if not isinstance(row, dict):
            raise ModelTestError(f"{loc}: expected {RECORD}, got {show_json(row)}")
        missing = [k for k in ("question_id", "answer") if k not in row]
        if missing:
            raise ModelTestError(f"{loc}: expected {RECORD}; {' and '.join(map(repr, missing))} missing in "
                                 f"{show_json(row, 100)}")  # fmt: skip
        qid = check_id(row["question_id"], loc)
        if not isinstance(row["answer"], str):
            raise ModelTestError(f"{loc}: 'answer' must be text, got {show_json(row['answer'])}")
        add_unique_id(first, qid, loc, loc.removeprefix(f"{path}: "), fix="keep one answer per question")
        out[qid] = row["answer"]
    if not out:
        raise ModelTestError(f"{path}: no predictions in the file")
    return out


def _id_map(data: dict, path: Path) -> dict:
    """A JSON object keyed by id: the seed's caption files ({image: caption} or {"image_file": [...],
    "model_answer": [...]}), or {question_id: answer}. Its messages speak of captions only when its keys
    name images."""
    from ..clip_score import OLD_FORMAT, captions_from_json
    from ..tasks.coco_caption import IMAGE_EXTENSIONS

    if set(data) == set(OLD_FORMAT) or any(str(k).lower().endswith(tuple(IMAGE_EXTENSIONS)) for k in data):
        return {e.image: e.caption for e in captions_from_json(data, path)}
    for key, answer in data.items():
        if not isinstance(answer, str):
            raise ModelTestError(f"{path}: the answer for question_id {key!r} must be text, got "
                                 f"{show_json(answer)} (in a {{question_id: answer}} map)")  # fmt: skip
    if not data:
        raise ModelTestError(f"{path}: no predictions in the file")
    return dict(data)


class PredictionsBackend(Backend):
    name = "predictions"

    def __init__(self, predictions: dict):
        self.predictions = predictions

    def generate(self, requests: list[Request]) -> list[Generation]:
        return [Generation(text=self.predictions[str(r.id)]) for r in requests]

