"""What a task is: data in, prompts out, predictions in, scores out."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.base import Request, render_qwen_prompt
from ..config import ModelConfig, TaskConfig, read_text
from ..errors import ModelTestError
from ..metrics import Metric, get_metric
from ..output import RunPaths

# Cut a prediction at the first of these (chat and base-model end markers of the usual families).
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|im_start|>", "</s>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def cut_at_end_marker(text: str) -> str:
    cut = len(text)
    for marker in END_MARKERS:
        pos = text.find(marker)
        if pos != -1 and pos < cut:
            cut = pos
    return text[:cut].strip()


@dataclass
class Sample:
    """One question. `parts` hold the image as the backend opens it (a path, PIL image, undecoded
    `datasets` cell or `ImageBytes`: encoded bytes decoded only by `open_image`); `image` is its name as
    text, what samples.jsonl records and the dataset fingerprint reads (its base name)."""

    id: Any
    parts: list[dict]
    references: list
    subject: str
    image: str
    extra: dict = field(default_factory=dict)


# Task config keys only some tasks read; a task that does not read one refuses it rather than ignore it.
OPTIONAL_KEYS = ("image_list", "annotations_path")


class Task:
    """A task loads its samples (all checks before inference), builds requests and scores answers."""

    name = "task"
    default_max_new_tokens = 32
    default_metric = "vqa_accuracy"
    metric_types: tuple[str, ...] = ("vqa_accuracy", "exact_match")  # the per-sample metrics that apply
    reads: tuple[str, ...] = ()  # which OPTIONAL_KEYS this task uses
    list_format = False  # render prompts as Qwen-VL's from_list_format ("Picture 1: <img>..</img>\n")

    def __init__(self, config: TaskConfig, model: ModelConfig | None = None):
        self.config = config
        self.model = model
        name = config.task_name
        for key in OPTIONAL_KEYS:
            if getattr(config, key) and key not in self.reads:
                raise ModelTestError(f"task {name} does not use {key} (set to {getattr(config, key)!r}); remove it")
        if config.metric.metric_type is None:
            config.metric.metric_type = self.default_metric  # resolved here so run_config.json records it
        if config.metric.metric_type not in self.metric_types:
            raise ModelTestError(f"task {name}: metric_type {config.metric.metric_type!r} does not apply; "
                                 f"use {' or '.join(self.metric_types)}")  # fmt: skip
        self.metric: Metric = get_metric(config.metric.metric_type, config.metric.normalizer)
        subjects = list(config.subject_mapping)
        self.subject = str(config.subject_mapping[subjects[0]].get("name", subjects[0])) if subjects else name

    # -- data ---------------------------------------------------------------------------------
    def load(self, dataset_path: str | None = None, limit: int | None = None) -> list[Sample]:
        raise NotImplementedError

    def select(self, samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
        """The samples `--limit N` evaluates: here the first N (a task may draw them with `seed`)."""
        return samples[:limit] if limit else samples

    def dataset_path(self, override: str | None) -> str:
        path = override or self.config.local_dataset_path
        if not path:
            raise ModelTestError(
                f"task {self.config.task_name}: no dataset path; set local_dataset_path in the task config "
                "or pass --dataset_path"
            )
        if not os.path.exists(path):
            raise ModelTestError(f"dataset not found: {path} (set local_dataset_path or --dataset_path)")
        return path

    # -- prompts ------------------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        if self.model and self.model.mm_model.infer_params.max_output_length:
            return self.model.mm_model.infer_params.max_output_length
        return self.config.requested_max_output_length or self.default_max_new_tokens

    def request(self, sample: Sample) -> Request:
        model = self.model
        min_new = model.mm_model.infer_params.min_output_length if model else 0
        chat = bool(model and (model.use_chat_template or model.mm_model.infer_params.is_chat_model))
        return Request(sample.id, sample.parts, self.max_new_tokens, min_new, list_format=self.list_format, chat=chat,
                       max_input_tokens=self.config.requested_max_input_length,
                       truncate_input=self.config.need_truncate_input)  # fmt: skip

    def render(self, sample: Sample) -> str:
        """The model input in Qwen-VL's raw query format, for logs when a backend reports none."""
        return render_qwen_prompt(sample.parts, self.list_format)

    # -- scoring ------------------------------------------------------------------------------
    def postprocess(self, text: str) -> str:
        return cut_at_end_marker(text)

    def score(self, prediction: str, sample: Sample) -> float:
        return self.metric.score(prediction, sample.references)

    def record_fields(self, prediction: str) -> dict:
        """Extra fields for the sample's line in samples.jsonl."""
        return {}

    def corpus_metrics(self, records: list[dict]) -> list[tuple[str, int, float]]:
        """(metric name, samples scored, value) for metrics over the whole set of predictions: the
        aggregations that are not a mean of per-sample scores. Computed from `records` (the
        samples.jsonl lines of this run's samples, resumed ones included)."""
        return []

    # -- task-specific output files -----------------------------------------------------------
    def check_outputs(self, paths: RunPaths, family: str, done: dict, overwrite: bool) -> None:
        """Before the model loads: refuse to run when an output file could not be written."""

    def write_outputs(self, records: list[dict], paths: RunPaths, family: str) -> dict[str, Path]:
        """After scoring: write the task's own files; returns {label: path} to print."""
        return {}


# ---------------------------------------------------------------------------------------------
# Reading the user's JSON: every file goes through config.read_text (UTF-8, one clear error naming the
# file and line), and every shape check names the file and the line or entry.
# ---------------------------------------------------------------------------------------------


def json_type(value) -> str:
    """A JSON value's kind in JSON's words, for messages ("got null", not "got NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def show_json(value, width: int = 60) -> str:
    """`value` as it is written in the file (cut to `width`) and its kind."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    if value is None or isinstance(value, bool):
        return text  # null, true, false: the text says the kind
    return f"{text if len(text) <= width else text[: width - 3] + '...'} ({json_type(value)})"


def check_id(value, where: str, key: str = "question_id"):
    """An id must be an integer or text: they are dictionary keys and are matched as text (str(id)) against
    predictions, so a list or object cannot be one, and true, 1.0 and 1 would all be the same id."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ModelTestError(f"{where}: {key} must be an integer or text, got {show_json(value)}")
    return value


def add_unique_id(seen: dict, qid, where: str, label: str = "", fix: str = "keep one") -> str:
    """Record `qid` in `seen` (str(id) -> (label, the id as written)) and return its text. Ids are
    matched as text (predictions files, resumed samples), so 1000 and "1000" are one id: a repeat in
    either form is an error at `where`, naming where the first one was (`label`) and how it was written."""
    key = str(qid)
    if key in seen:
        first, other = seen[key]
        at = f" (first in {first})" if first else ""
        if type(other) is type(qid):
            raise ModelTestError(f"{where}: question_id {qid!r} appears more than once{at}; {fix}")
        raise ModelTestError(f"{where}: question_id {key} appears twice: as {other!r}{at} and as {qid!r}; ids are "
                             f"matched as text, so {fix}")  # fmt: skip
    seen[key] = (label, qid)
    return key


def loads_json(text: str, path, lineno: int | None = None):
    """json.loads that refuses a key twice in one object (json keeps the last one silently); JSONDecodeError
    and RecursionError pass through for the caller to place. `lineno`: the line `text` is (JSON lines)."""

    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                where = f":{lineno}" if lineno is not None else _key_line(text, key)
                raise ModelTestError(f"{path}{where}: key {key!r} appears twice in one JSON object (JSON readers "
                                     "keep only the last); keep one")  # fmt: skip
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def _key_line(text: str, key: str) -> str:
    """':LINE' of a key found twice in one object of a whole file: its second occurrence's line when the
    key is written exactly twice in the file (json does not say where the object was; else '')."""
    for spelled in dict.fromkeys((json.dumps(key, ensure_ascii=False), json.dumps(key))):
        found = list(re.finditer(re.escape(spelled) + r"\s*:", text))
        if len(found) == 2:
            line = text.count("\n", 0, found[1].start()) + 1
            return f":{line}"
    return ""


def parse_json(text: str, path):
    """A whole JSON document read from `path`; invalid JSON is an error naming the file, line and column."""
    try:
        return loads_json(text, path)
    except json.JSONDecodeError as e:
        raise ModelTestError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ModelTestError(f"{path}: JSON nested too deeply") from None


def read_json(path: str | Path, what: str = "JSON file"):
    """A whole JSON file: UTF-8, valid, no key twice in one object; else one error naming file and line."""
    return parse_json(read_text(path, what), path)


def read_jsonl_lines(path: str | Path, what: str = "JSON-lines file", shape: str = "a JSON object {...}",
                     ) -> list[tuple[int, dict]]:  # fmt: skip
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not valid JSON or
    not an object (`shape` says which) is an error naming the file and line."""
    text = read_text(path, what)
    rows = []
    # split on "\n" only: str.splitlines would also split inside a string holding U+2028 or \x1c
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = loads_json(line, path, lineno)
        except json.JSONDecodeError as e:
            raise ModelTestError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line") from None
        except RecursionError:
            raise ModelTestError(f"{path}:{lineno}: JSON nested too deeply; fix or remove that line") from None
        if not isinstance(row, dict):
            raise ModelTestError(f"{path}:{lineno}: expected {shape}, got {show_json(row)}")
        rows.append((lineno, row))
    return rows


def read_jsonl(path: str | Path, what: str = "JSON-lines file") -> list[dict]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line number."""
    return [row for _, row in read_jsonl_lines(path, what)]
