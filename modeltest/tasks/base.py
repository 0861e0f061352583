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


class Task:
    """A task loads its samples (all checks before inference), builds requests and scores answers."""

    name = "task"
    default_max_new_tokens = 32

    def __init__(self, config: TaskConfig, model: ModelConfig | None = None):
        self.config = config
        self.model = model
        self.metric: Metric = get_metric(config.metric.metric_type, config.metric.normalizer)
        subjects = list(config.subject_mapping)
        self.subject = str(config.subject_mapping[subjects[0]].get("name", subjects[0])) if subjects else config.task_name

    # -- data ---------------------------------------------------------------------------------
    def load(self, dataset_path: str | None = None, limit: int | None = None) -> list[Sample]:
        raise NotImplementedError

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
        return Request(sample.id, sample.parts, self.max_new_tokens, min_new)

    def render(self, sample: Sample) -> str:
        """The model input in Qwen-VL's raw query format, for logs when a backend reports none."""
        return render_qwen_prompt(sample.parts)

    # -- scoring ------------------------------------------------------------------------------
    def postprocess(self, text: str) -> str:
        return cut_at_end_marker(text)

    def score(self, prediction: str, sample: Sample) -> float:
        return self.metric.score(prediction, sample.references)


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
