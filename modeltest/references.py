"""Reference figures (results/references/<model>.yaml): the score a run is checked against when there is
no baseline run yet, as TensorRT-LLM and vLLM keep per-model accuracy references.

A file holds `model` and `references`, a list of entries with `task`, `metric`, `evaluator` (the
task's metric.normalizer, `official` read as `qwen_vl`; `none` for a metric without one), `dtype`, `score` and `tolerance` (fractions) and `source` (where the figure
comes from: a publication with the prompt, token budget and evaluator that produced it, or a
measurement here with its machine and commit). A run matches an entry when its model, task, metric,
evaluator and dtype are the entry's; a score-only run (--predictions) names no dtype, so it matches
the one entry of its model, task, metric and evaluator whatever that entry's dtype (several: none).

The gate is one-sided: with the run's score s, its standard error se over samples and the floor
f = score - tolerance, the run FAILs when it is significantly below the floor at alpha (default 0.05):
Φ((s - f) / se) < alpha, i.e. s + z·se < f with z = Φ⁻¹(1 - alpha) (1.645 at 0.05). With se = 0 it
FAILs when s < f. A run above the floor, or below it by less than its own noise, PASSes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelTestError
from .stats import normal_cdf

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "references"


@dataclass(frozen=True)
class Reference:
    model: str
    task: str
    metric: str
    evaluator: str
    dtype: str
    score: float
    tolerance: float
    source: str
    file: Path


def load(path: str | Path) -> list[Reference]:
    from .config import load_yaml

    path = Path(path)
    data, _ = load_yaml(path)
    model, entries = data.get("model"), data.get("references")
    if not isinstance(model, str) or not isinstance(entries, list):
        raise ModelTestError(f"{path}: a reference file needs 'model' (text) and 'references' (a list)")
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: references[{i}]"
        if not isinstance(e, dict):
            raise ModelTestError(f"{where}: expected a mapping, got {e!r}")
        missing = [k for k in ("task", "metric", "evaluator", "dtype", "score", "tolerance", "source") if k not in e]
        if missing:
            raise ModelTestError(f"{where}: missing {', '.join(missing)}")
        for key in ("score", "tolerance"):
            value = e[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ModelTestError(f"{where}: {key} must be a number >= 0 (a fraction: 0.638 = 63.8%), got {value!r}")
        out.append(Reference(model, str(e["task"]), str(e["metric"]), str(e["evaluator"]), str(e["dtype"]),
                             float(e["score"]), float(e["tolerance"]), str(e["source"]).strip(), path))  # fmt: skip
    return out


def describe(summary: dict) -> dict:
    """What a run's result JSON says about the keys references are matched on."""
    from .metrics import evaluator_of

    model_cfg = (summary.get("config") or {}).get("model") or {}
    return {"model": summary.get("model"), "task": summary.get("task"), "metric": summary.get("metric"),
            "evaluator": evaluator_of(summary) or "none",  # official is an alias of qwen_vl
            "dtype": summary.get("dtype") or model_cfg.get("data_type")}  # fmt: skip


def match(refs: list[Reference], summary: dict) -> Reference | None:
    want = describe(summary)
    if want["dtype"] is None:  # score-only: made elsewhere, in a dtype nothing here records
        keys = tuple(v for k, v in want.items() if k != "dtype")
        found = [r for r in refs if (r.model, r.task, r.metric, r.evaluator) == keys]
        return found[0] if len(found) == 1 else None
    for r in refs:
        if (r.model, r.task, r.metric, r.evaluator, r.dtype) == tuple(want.values()):
            return r
    return None


def gate(ref: Reference, score: float, stderr: float, alpha: float = 0.05) -> dict:
    floor = ref.score - ref.tolerance
    p = normal_cdf((score - floor) / stderr) if stderr > 0 else (0.0 if score < floor else 1.0)
    return {"reference": ref.score, "tolerance": ref.tolerance, "floor": floor, "candidate": score, "stderr": stderr,
            "diff": score - ref.score, "p_value": p, "alpha": alpha, "verdict": "FAIL" if p < alpha else "PASS",
            "source": ref.source, "file": str(ref.file)}  # fmt: skip


def for_model(model: str | None) -> list[Reference]:
    """The references kept for a model name: <folder>/<model>.yaml, the folder being $MODELTEST_REFERENCES
    or the repository's results/references/."""
    path = Path(os.environ.get("MODELTEST_REFERENCES") or REFERENCE_DIR) / f"{model}.yaml"
    return load(path) if model and path.is_file() else []
