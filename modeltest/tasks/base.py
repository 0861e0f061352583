"""What a task is: data in, prompts out, predictions in, scores out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.base import Request, render_qwen_prompt
from ..config import ModelConfig, TaskConfig
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
        min_new = self.model.mm_model.infer_params.min_output_length if self.model else 0
        return Request(sample.id, sample.parts, self.max_new_tokens, min_new, list_format=self.list_format)

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


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ModelTestError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ModelTestError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json(path: str | Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelTestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise ModelTestError(f"cannot read {path}: {e.strerror}") from None
