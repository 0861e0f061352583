"""Metric registry: a metric is a per-sample function plus an aggregation, registered by name, and
declares which way is better.

`get_metric(name, normalizer)` returns a `Metric` whose `score(prediction, references)` gives one
sample's score in [0, 1] and whose `aggregate(scores)` gives the corpus value. Corpus metrics that
need every prediction at once (BLEU, CIDEr, ...) are a task's aggregation (`Task.corpus_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ..errors import unknown_name
from . import caption, vqa


def mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores) if scores else 0.0


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[str, Sequence], float]
    aggregate: Callable[[Sequence[float]], float] = mean
    higher_is_better: bool = True  # comparisons (modeltest compare) read a drop in this direction
    evaluator: str | None = None  # the answer processing it follows (vqa.evaluator), for metrics that have one


# evalai (mmf's EvalAI processor), vqaeval (GT-Vision-Lab vqaEval.py, current), qwen_vl (Qwen-VL's
# eval_mm copy of the pre-2021 vqaEval.py) and official (an alias of qwen_vl): see metrics/vqa.py.
NORMALIZERS = vqa.NORMALIZERS

_VQA = vqa.VQA_ACCURACY
_METRICS: dict[str, Callable[[str], Metric]] = {
    "vqa_accuracy": lambda norm: Metric("vqa_accuracy", _VQA[norm], evaluator=vqa.evaluator(norm)),
    "exact_match": lambda norm: Metric("exact_match", partial(vqa.exact_match, normalizer=norm),
                                       evaluator=vqa.evaluator(norm)),  # fmt: skip
    "non_empty": lambda norm: Metric("non_empty", caption.non_empty),
}


def get_metric(name: str, normalizer: str = "evalai") -> Metric:
    if name not in _METRICS:
        raise unknown_name("metric", name, _METRICS)
    if normalizer not in NORMALIZERS:
        raise unknown_name("normalizer", normalizer, NORMALIZERS)
    return _METRICS[name](normalizer)


def available_metrics() -> list[str]:
    return sorted(_METRICS)


def evaluator_of(summary: dict) -> str | None:
    """The evaluator a result JSON's score was computed with (None: its metric has none)."""
    name, normalizer = summary.get("metric"), summary.get("normalizer") or "evalai"
    if name not in _METRICS or normalizer not in NORMALIZERS:
        return None
    return get_metric(name, normalizer).evaluator
