"""`modeltest compare BASELINE CANDIDATE`: is the candidate run as accurate as the baseline?

BASELINE and CANDIDATE are run output folders (as --output_dir wrote them; each task in them is
compared with the same task in the other), result JSON files (`*_result.json`), or CLIP score
summaries (`*_clip_score.json`, compared on their per-image cosine). Samples are paired by id.
Two runs over different data are refused with the differences listed, unless --allow_different
(then the shared samples are compared and the rest counted). The data's fingerprint is a SHA-256
over the samples' ids, questions, image file names and references (not the rendered prompts: the
same image has another path on another machine).

Per task (formulas in modeltest/stats.py): both scores, the paired difference (candidate -
baseline), its standard error, 95% intervals (paired bootstrap over samples, seeded; and the closed
form), a one-sided p-value that the candidate is worse, the samples improved / regressed / unchanged,
the share whose prediction text changed at all, and the most regressed samples. Verdict: FAIL when
the drop (in the metric's direction) is more than --max_drop; with --gate stat, only when the drop is
also significant at --alpha. Exit codes: 0 PASS, 1 FAIL, 2 bad input.

Performance runs (task_type performance: one result JSON per batch size, task <task>_batch<bs>) have
no per-sample scores: each case's first token, non-first token and total time is gated against the
baseline's with a relative tolerance - FAIL when any is more than --max_slowdown slower (default 0.1:
10%), or a case the baseline ran is missing or failed in the candidate; performance_maxbs runs, when a
case's largest batch size under the limit drops by more than that share.

Writes compare.json and compare.csv (one row per sample whose prediction or score changed) to
--output (default: the candidate's folder).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelTestError
from .metrics import evaluator_of
from .output import dataset_fingerprint, write_json
from .stats import paired, verdict

EXIT_FAIL = 1
TOP = 10


@dataclass
class TaskRun:
    """One task's finished run: its per-sample records and what describes them."""

    task: str
    metric: str
    higher_is_better: bool
    source: Path  # the JSON it was read from
    records: dict  # id -> {"score", "prediction", "question", "image", "references", "error"}
    summary: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.source.parent


def higher_is_better(metric: str) -> bool:
    """As the metric declares it (the corpus metrics and clip_score, outside the registry, are all
    higher-is-better; a performance figure as metrics/latency.py says)."""
    from .metrics import available_metrics, get_metric
    from .metrics.latency import FIGURES

    if metric in FIGURES:
        return FIGURES[metric]
    return get_metric(metric).higher_is_better if metric in available_metrics() else True


# ---- reading runs -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    from .tasks.base import json_type, read_json

    data = read_json(path, "result JSON")  # UTF-8 and JSON checked, the file named
    if not isinstance(data, dict):
        raise ModelTestError(f"{path}: expected a JSON object, got {json_type(data)}")
    return data


def _samples_path(result_json: Path, summary: dict) -> Path:
    """samples.jsonl of a run: beside its results file, where the layout puts it
    (<out>/results/<rel>/<stem>_result.json -> <out>/debug/<rel>/<stem>/samples.jsonl), so that a copied
    folder reads its own records; else (the debug folder kept elsewhere) where the summary says."""
    parts = result_json.parts
    if "results" in parts:
        i = len(parts) - 1 - parts[::-1].index("results")
        stem = result_json.name.removesuffix("_result.json")
        derived = Path(*parts[:i], "debug", *parts[i + 1 : -1], stem, "samples.jsonl")
        if derived.is_file():
            return derived
    paths = summary.get("paths")
    stated = Path(str(paths.get("samples") or "")) if isinstance(paths, dict) else None
    if stated is not None and stated.is_file():
        return stated
    raise ModelTestError(f"{result_json}: its samples.jsonl is neither beside the results folder nor at {stated}")


def _read_samples(path: Path) -> dict:
    """A run's sample records, checked as a resume checks them (a torn last line left out; the file is
    not changed)."""
    from .output import read_samples

    return read_samples(path, repair=False)


def load_result(path: Path) -> TaskRun:
    summary = _read_json(path)
    if "comparison" in summary or path.name.endswith("_clip_score.json"):
        return _load_clip(path, summary)
    if _is_performance(summary):
        return _load_performance(path, summary)
    for key in ("task", "metric"):
        if key not in summary:
            raise ModelTestError(f"{path}: not a modeltest result JSON (no {key!r})")
    if summary.get("complete") is False:
        raise ModelTestError(f"{path}: the run has not finished (\"complete\": false: the results so far of a run "
                             "still going or stopped); rerun its command to finish it, then compare")  # fmt: skip
    records = _read_samples(_samples_path(path, summary))
    return TaskRun(summary["task"], summary["metric"], higher_is_better(summary["metric"]), path, records, summary)


def _load_clip(path: Path, summary: dict) -> TaskRun:
    """A clip_score summary: the per-image cosine from its CSV (beside it, else where it says) is the
    sample score."""
    from .config import read_text

    outputs = summary.get("outputs")
    stated = outputs.get("csv") if isinstance(outputs, dict) else None
    candidates = [path.with_name(path.name.removesuffix(".json") + ".csv"), *([Path(str(stated))] if stated else [])]
    table = next((c for c in candidates if c.is_file()), None)
    if table is None:
        raise ModelTestError(f"{path}: its per-image CSV ({candidates[0].name}) is not beside it")
    records = {}
    rows = csv.DictReader(io.StringIO(read_text(table, "CLIP score CSV")))
    for line, row in enumerate(rows, start=2):
        try:
            records[row["image"]] = {"id": row["image"], "score": float(row["cos"]), "prediction": row["caption"],
                                     "image": row["image"], "references": [], "question": None}  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise ModelTestError(f"{table}:{line}: not a clip_score row (columns image, caption, cos; cos a number): "
                                 f"{dict(row)!r:.120}") from None  # fmt: skip
    return TaskRun("clip_score", "clip_score", True, path, records, summary)


def _is_performance(summary: dict) -> bool:
    return str(summary.get("kind") or "").startswith("performance")


def _case_key(case: dict) -> str:
    batch = f"batch {case['batch_size']}, " if "batch_size" in case else ""
    return f"{batch}{case['input_len']} in / {case['output_len']} out"


def _load_performance(path: Path, summary: dict) -> TaskRun:
    """A performance run's result JSON: its cases (by batch size and token counts) stand for samples."""
    cases = summary.get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "input_len" in c for c in cases):
        raise ModelTestError(f"{path}: a performance result JSON without its cases")
    if summary.get("complete") is False:
        raise ModelTestError(f"{path}: the run has not finished (\"complete\": false); rerun its command to finish "
                             "it, then compare")  # fmt: skip
    metric = str(summary.get("metric"))
    return TaskRun(str(summary.get("task")), metric, higher_is_better(metric), path,
                   {_case_key(c): c for c in cases}, summary)  # fmt: skip


def load_runs(path: str | Path) -> dict[str, TaskRun]:
    """The task runs in a folder (every result JSON below it) or in one JSON file, by task."""
    path = Path(path)
    if path.is_file():
        run = load_result(path)
        return {run.task: run}
    if not path.is_dir():
        raise ModelTestError(f"{path}: no such run folder or result JSON")
    files = sorted(path.glob("results/**/*_result.json")) + sorted(path.glob("**/*_clip_score.json"))
    if not files:
        raise ModelTestError(f"{path}: no results/**/*_result.json or *_clip_score.json below it")
    runs: dict[str, TaskRun] = {}
    for f in files:
        run = load_result(f)
        if run.task in runs:
            raise ModelTestError(
                f"{path} holds two runs of {run.task} ({runs[run.task].source} and {f}); give the result JSON files "
                "to compare instead of the folder"
            )
        runs[run.task] = run
    return runs


# ---- comparing ---------------------------------------------------------------------------------------


@dataclass
class Options:
    max_drop: float = 0.01
    gate: str = "abs"
    alpha: float = 0.05
    allow_different: bool = False
    top: int = TOP
    logits: bool = False
    max_slowdown: float = 0.1  # performance runs: the largest relative slowdown of a case's figure that passes


# the seed's "simplified" logits rule
KL_MAX = 1e-3  # the greatest per-token KL divergence allowed
KL_HIGH = 1e-4  # a token above this counts as high ...
KL_HIGH_SHARE = 0.005  # ... and at most this share of the tokens may be high


def _load_logits(run: TaskRun, rec: dict):
    """(token ids [T], log-probabilities [T, vocab]) a run stored for a sample, or None."""
    name = rec.get("logits")
    if not name:
        return None
    path = _samples_dir(run) / name
    if not path.is_file():
        raise ModelTestError(f"{run.source}: sample {rec['id']!r} names {name}, which is not in {path.parent}")
    from safetensors.torch import load_file

    data = load_file(str(path))
    return data["token_ids"], data["logprobs"]


def _samples_dir(run: TaskRun) -> Path:
    return _samples_path(run.source, run.summary).parent


def kl_divergence(base_logp, cand_logp):
    """KL(baseline || candidate) of each row, in float64: sum_v p_b(v) (log p_b(v) - log p_c(v))."""
    import torch

    b, c = base_logp.double(), cand_logp.double()
    p = b.exp()
    terms = torch.where(p > 0, p * (b - c), torch.zeros_like(p))  # 0 log 0 = 0, also where log p_c = -inf
    return terms.sum(dim=-1)


def compare_logits(base: TaskRun, cand: TaskRun, ids: list) -> dict:
    """Per-token KL divergence on the positions where both runs had generated the same tokens so far
    (position t compares the distributions of token t given the same prefix), for the samples both
    runs stored; where each sample first diverges; and the seed's rule."""
    samples, kls = [], []
    for i in ids:
        b, c = _load_logits(base, base.records[i]), _load_logits(cand, cand.records[i])
        if b is None or c is None:
            continue
        (bt, bl), (ct, cl) = b, c
        n = min(len(bt), len(ct))
        same = int((bt[:n] == ct[:n]).long().cumprod(0).sum())  # tokens equal so far
        upto = min(n, same + 1)  # the first differing token's distribution still has the same prefix
        kl = kl_divergence(bl[:upto], cl[:upto]) if upto else None
        values = [] if kl is None else kl.tolist()
        kls += values
        samples.append({"id": i, "tokens_compared": upto, "first_divergence": same if same < n else None,
                        "max_kl": max(values) if values else 0.0, "kl": values})  # fmt: skip
    if not samples:
        raise ModelTestError(f"{base.task}: --logits: no sample has stored log-probabilities in both runs "
                             "(run with need_logits: true in the task config)")  # fmt: skip
    return {"samples": samples, **logits_rule(kls)}


def logits_rule(kls: list[float]) -> dict:
    """The seed's rule over per-token KL values: the greatest and the share of high ones, and a verdict."""
    worst = max(kls) if kls else 0.0
    share = sum(1 for k in kls if k > KL_HIGH) / len(kls) if kls else 0.0
    return {"tokens": len(kls), "max_kl": worst, "high_kl_share": share,
            "rule": f"max KL <= {KL_MAX:g} and the share of tokens with KL > {KL_HIGH:g} <= {KL_HIGH_SHARE:.1%}",
            "verdict": "PASS" if worst <= KL_MAX and share <= KL_HIGH_SHARE else "FAIL"}  # fmt: skip


def _differences(base: TaskRun, cand: TaskRun) -> list[str]:
    only_b = sorted(set(base.records) - set(cand.records), key=str)
    only_c = sorted(set(cand.records) - set(base.records), key=str)
    out = []
    for label, ids in (("only in the baseline", only_b), ("only in the candidate", only_c)):
        if ids:
            out.append(f"{len(ids)} sample(s) {label} (e.g. {', '.join(map(repr, ids[:3]))})")
    changed = [
        i for i in base.records.keys() & cand.records.keys()
        if dataset_fingerprint([base.records[i]]) != dataset_fingerprint([cand.records[i]])
    ]  # fmt: skip
    if changed:
        changed.sort(key=str)
        out.append(f"{len(changed)} sample(s) with another question, image or references "
                   f"(e.g. {', '.join(map(repr, changed[:3]))})")  # fmt: skip
    return out


def compare_performance(base: TaskRun, cand: TaskRun, opts: Options) -> dict:
    """Two performance runs, case by case: each gated figure's relative slowdown against --max_slowdown.
    A case the baseline ran that the candidate lacks or failed FAILs; one the baseline failed is not
    compared. Runs of other cases, batch sizes or hardware (the fingerprint) are refused unless
    --allow_different."""
    from .metrics.latency import GATED, slowdown

    kinds = base.summary.get("kind"), cand.summary.get("kind")
    if kinds[0] != kinds[1]:
        raise ModelTestError(f"{base.task}: the baseline is a {kinds[0]} run, the candidate a {kinds[1]} run")
    same = base.summary.get("dataset_fingerprint") == cand.summary.get("dataset_fingerprint")
    if not same and not opts.allow_different:
        raise ModelTestError(f"{base.task}: the runs measured different cases, batch sizes or hardware (device "
                             f"{base.summary.get('device')} vs {cand.summary.get('device')}); pass --allow_different to "
                             "compare the cases they share")  # fmt: skip
    figures = ("max_batch_size",) if kinds[0] == "performance_maxbs" else GATED
    rows, problems = [], []
    for key, b in base.records.items():
        c = cand.records.get(key)
        if b.get("error"):
            continue
        if c is None or c.get("error"):
            problems.append(f"{key}: {'missing in the candidate' if c is None else 'failed: ' + str(c['error'])}")
            continue
        for figure in figures:
            if b.get(figure) is None:
                continue
            worse = slowdown(figure, b[figure], c[figure]) if c.get(figure) is not None else float("inf")
            rows.append({"case": key, "figure": figure, "baseline": b[figure], "candidate": c.get(figure),
                         "slowdown": worse, "verdict": "FAIL" if worse > opts.max_slowdown else "PASS"})  # fmt: skip
    failed = problems or any(r["verdict"] == "FAIL" for r in rows)
    bv, cv = base.summary.get("value"), cand.summary.get("value")
    return {
        "task": base.task,
        "metric": base.metric,
        "higher_is_better": base.higher_is_better,
        "baseline": bv,
        "candidate": cv,
        "diff": None if bv is None or cv is None else cv - bv,
        "p_value": None,
        "n": len(base.records),
        "cases": rows,
        "worst_slowdown": max((r["slowdown"] for r in rows), default=None),
        "not_compared": [*problems, *([] if same else ["the runs' cases, batch sizes or hardware differ"])],
        "verdict": "FAIL" if failed else "PASS",
        "max_slowdown": opts.max_slowdown,
        "note": "performance: each case's figures against the baseline's, FAIL above --max_slowdown "
                f"({opts.max_slowdown:.0%}) slower; no paired statistics (a performance run has no per-sample scores)",
        "baseline_source": str(base.source),
        "candidate_source": str(cand.source),
        "dataset_fingerprint": cand.summary.get("dataset_fingerprint"),
    }  # fmt: skip


def compare_task(base: TaskRun, cand: TaskRun, opts: Options) -> dict:
    if _is_performance(base.summary) or _is_performance(cand.summary):
        return compare_performance(base, cand, opts)
    if base.metric != cand.metric:
        raise ModelTestError(f"{base.task}: the baseline is scored with {base.metric}, the candidate with {cand.metric}")
    evaluators = evaluator_of(base.summary), evaluator_of(cand.summary)
    if evaluators[0] != evaluators[1]:
        raise ModelTestError(f"{base.task}: the baseline's {base.metric} follows the {evaluators[0]} evaluator, the "
                             f"candidate's {evaluators[1]} (metric.normalizer): their scores differ on the same "
                             "answers; compare runs scored the same way")  # fmt: skip
    differences = _differences(base, cand)
    if differences and not opts.allow_different:
        raise ModelTestError(f"{base.task}: the runs are over different data: {'; '.join(differences)}; rerun on the "
                             "same samples, or pass --allow_different to compare the shared ones")  # fmt: skip
    ids = sorted(base.records.keys() & cand.records.keys(), key=str)
    if not ids:
        raise ModelTestError(f"{base.task}: the runs share no sample")
    b = [float(base.records[i]["score"]) for i in ids]
    c = [float(cand.records[i]["score"]) for i in ids]
    stats = paired(b, c, base.higher_is_better)
    score_verdict = verdict(stats, opts.max_drop, opts.gate, opts.alpha)
    logits = compare_logits(base, cand, ids) if opts.logits else None
    sign = 1 if base.higher_is_better else -1
    gain = {i: sign * (cb - bb) for i, bb, cb in zip(ids, b, c, strict=True)}
    changed = {i for i in ids if base.records[i].get("prediction") != cand.records[i].get("prediction")}
    worst = sorted((i for i in ids if gain[i] < 0), key=lambda i: (gain[i], str(i)))[: opts.top]
    return {
        "task": base.task,
        "metric": base.metric,
        "higher_is_better": base.higher_is_better,
        "baseline": stats.baseline,
        "candidate": stats.candidate,
        "diff": stats.diff,
        "stderr": stats.stderr,
        "ci95": list(stats.ci95),
        "ci95_normal": list(stats.ci95_normal),
        "p_value": stats.p_value,
        "n": stats.n,
        "improved": [i for i in ids if gain[i] > 0],
        "regressed": [i for i in ids if gain[i] < 0],
        "unchanged": stats.unchanged,
        "changed_predictions": len(changed),
        "changed_predictions_share": len(changed) / len(ids),
        "errors": {"baseline": _errors(base, ids), "candidate": _errors(cand, ids)},
        "not_compared": differences,
        "top_regressed": [_sample_row(base, cand, i, gain[i]) for i in worst],
        "verdict": "FAIL" if score_verdict == "FAIL" or (logits and logits["verdict"] == "FAIL") else "PASS",
        "score_verdict": score_verdict,
        "logits": logits,
        "max_drop": opts.max_drop,
        "gate": opts.gate,
        "alpha": opts.alpha,
        "baseline_source": str(base.source),
        "candidate_source": str(cand.source),
        "dataset_fingerprint": dataset_fingerprint(base.records[i] for i in ids),
        "_changed_rows": [_sample_row(base, cand, i, gain[i]) for i in ids if i in changed or gain[i] != 0],
        "_stats": stats,
    }


def _errors(run: TaskRun, ids: list) -> int:
    return sum(1 for i in ids if run.records[i].get("error"))


def _sample_row(base: TaskRun, cand: TaskRun, i, gain: float) -> dict:
    rb, rc = base.records[i], cand.records[i]
    refs = list(rb.get("references") or [])  # text: the runner records the answers' text
    return {"id": i, "question": rb.get("question"), "image": os.path.basename(str(rb.get("image") or "")),
            "baseline_prediction": rb.get("prediction"), "candidate_prediction": rc.get("prediction"),
            "baseline_score": rb["score"], "candidate_score": rc["score"], "gain": gain, "references": refs}  # fmt: skip


def compare(baseline: str | Path, candidate: str | Path, opts: Options) -> dict:
    base_runs, cand_runs = load_runs(baseline), load_runs(candidate)
    shared = [t for t in cand_runs if t in base_runs]
    if not shared:
        raise ModelTestError(f"{baseline} and {candidate} have no task in common "
                             f"(baseline: {', '.join(base_runs)}; candidate: {', '.join(cand_runs)})")  # fmt: skip
    tasks = [compare_task(base_runs[t], cand_runs[t], opts) for t in shared]
    missing = sorted(set(base_runs) - set(cand_runs))
    return {
        "verdict": "FAIL" if any(t["verdict"] == "FAIL" for t in tasks) or missing else "PASS",
        "tasks": tasks,
        "missing_in_candidate": missing,
        "baseline": str(baseline),
        "candidate": str(candidate),
    }


# ---- output ------------------------------------------------------------------------------------------


def write(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(task=t["task"], **r) for t in result["tasks"] for r in t.get("_changed_rows", [])]
    clean = {**result, "tasks": [{k: v for k, v in t.items() if not k.startswith("_")} for t in result["tasks"]]}
    json_path, csv_path = out / "compare.json", out / "compare.csv"
    write_json(json_path, clean)
    buf = io.StringIO()
    cols = ["task", "id", "question", "image", "baseline_prediction", "candidate_prediction", "baseline_score",
            "candidate_score", "gain", "references"]  # fmt: skip
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({**row, "references": json.dumps(row["references"], ensure_ascii=False)})
    from .output import atomic_write

    atomic_write(csv_path, buf.getvalue())
    return json_path, csv_path


def print_report(result: dict, top: int) -> None:
    from tabulate import tabulate
    from termcolor import colored

    def num(value, fmt=".4f") -> str:
        return "—" if value is None else format(value, fmt)

    rows = []
    for t in result["tasks"]:
        ci = t.get("ci95")
        diff = num(t.get("diff"), "+.4f") + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and "_stats" in t else "")
        counts = f"{len(t['improved'])}/{len(t['regressed'])}/{t['unchanged']}" if "improved" in t else "—"
        changed = (f"{t['changed_predictions']} ({100 * t['changed_predictions_share']:.1f}%)"
                   if "changed_predictions" in t else "—")  # fmt: skip
        rows.append([t["task"], t["metric"], num(t.get("baseline")), num(t.get("candidate")), diff,
                     num(t.get("stderr")), num(t.get("p_value"), ".3g"), counts, changed,
                     colored(t["verdict"], "green" if t["verdict"] == "PASS" else "red")])  # fmt: skip
    baseline = "reference" if "reference" in result else "baseline"
    print(tabulate(rows, headers=["task", "metric", baseline, "candidate", "diff [95% CI]", "stderr", "p (worse)",
                                  "better/worse/same", "changed preds", "verdict"],
                   tablefmt="github", disable_numparse=True))  # fmt: skip
    for t in result["tasks"]:
        for key in ("note", "source"):
            if t.get(key):
                print(f"{t['task']}: {t[key]}")
        if t.get("logits"):
            lg = t["logits"]
            diverged = [s for s in lg["samples"] if s["first_divergence"] is not None]
            print(f"{t['task']}: logits over {lg['tokens']} tokens of {len(lg['samples'])} samples: max KL "
                  f"{lg['max_kl']:.3g}, {100 * lg['high_kl_share']:.2f}% of tokens above {KL_HIGH:g}, "
                  f"{len(diverged)} samples diverge ({lg['rule']}): {lg['verdict']}")  # fmt: skip
        if t.get("not_compared"):
            print(f"{t['task']}: not compared: {'; '.join(t['not_compared'])}")
        if t.get("cases"):
            table = [[r["case"], r["figure"], num(r["baseline"]), num(r["candidate"]), f"{r['slowdown']:+.1%}",
                      colored(r["verdict"], "green" if r["verdict"] == "PASS" else "red")] for r in t["cases"]]  # fmt: skip
            print(f"\n{t['task']}: per case (slowdown: worse by; FAIL above {t['max_slowdown']:.0%})")
            print(tabulate(table, headers=["case", "figure", "baseline", "candidate", "slowdown", "verdict"],
                           tablefmt="github", disable_numparse=True))  # fmt: skip
        if t.get("top_regressed", [])[:top]:
            print(f"\n{t['task']}: most regressed samples")
            table = [[r["id"], _short(r["baseline_prediction"]), _short(r["candidate_prediction"]),
                      f"{r['gain']:+.3f}", _short(", ".join(map(str, r["references"][:3])))]
                     for r in t["top_regressed"][:top]]  # fmt: skip
            print(tabulate(table, headers=["id", "baseline", "candidate", "score", "references"], tablefmt="github"))
    if result["missing_in_candidate"]:
        print(f"missing in the candidate: {', '.join(result['missing_in_candidate'])} (FAIL)")
    verdict_text = colored(result["verdict"], "green" if result["verdict"] == "PASS" else "red")
    print(f"\nverdict: {verdict_text}")


def _short(text, width: int = 40) -> str:
    text = "" if text is None else str(text).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modeltest compare", description=__doc__.split("\n\n")[0],
                                usage="modeltest compare [BASELINE] CANDIDATE [options]",
                                epilog="exit codes:\n  0    PASS\n  1    FAIL: a task dropped more than --max_drop "
                                "(with --gate stat: significantly)\n  2    bad input or usage (an error line on "
                                "stderr)\n  130  interrupted",
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog's lines  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="BASELINE CANDIDATE (output folders or result JSONs); only CANDIDATE with --history or "
                        "--reference")  # fmt: skip
    p.add_argument("--history", help="take the baseline from this history database (the latest PASS, else the "
                   "first run of the same task, model, data and evaluator) and record the verdict")  # fmt: skip
    p.add_argument("--reference", help="gate against the reference figures in this YAML "
                   "(results/references/<model>.yaml) instead of a baseline run")  # fmt: skip
    p.add_argument("--max_drop", type=float, default=0.01, help="the largest drop that passes, absolute (default 0.01)")
    p.add_argument("--gate", choices=("abs", "stat"), default="abs",
                   help="abs: FAIL when the drop exceeds --max_drop; stat: only when it is also significant")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of --gate stat (default 0.05)")
    p.add_argument("--max_slowdown", type=float, default=0.1, help="performance runs: the largest relative slowdown "
                   "of a case's first token, non-first token or total time that passes (default 0.1: 10%%)")  # fmt: skip
    p.add_argument("--allow_different", action="store_true", help="compare the shared samples of runs over different data")
    p.add_argument("--top", type=int, default=TOP, help=f"most regressed samples shown per task (default {TOP})")
    p.add_argument("--logits", action="store_true", help="also compare the output distributions the runs stored "
                   "(need_logits: true): per-token KL divergence and the seed's rule")  # fmt: skip
    p.add_argument("--output", help="folder for compare.json and compare.csv (default: the candidate's folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.max_drop >= 0 and math.isfinite(args.max_drop)):
        raise ModelTestError(f"--max_drop must be a finite number >= 0, got {args.max_drop}")
    if not 0 < args.alpha < 1:
        raise ModelTestError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if not (args.max_slowdown >= 0 and math.isfinite(args.max_slowdown)):
        raise ModelTestError(f"--max_slowdown must be a finite number >= 0, got {args.max_slowdown}")
    single = bool(args.history or args.reference)
    if args.history and args.reference:
        raise ModelTestError("--history and --reference choose the baseline two ways: give one")
    if len(args.runs) != (1 if single else 2):
        want = "one run (CANDIDATE)" if single else "two runs (BASELINE CANDIDATE)"
        raise ModelTestError(f"modeltest compare takes {want}{' with --history / --reference' if single else ''}; "
                             f"got {len(args.runs)}")  # fmt: skip
    opts = Options(args.max_drop, args.gate, args.alpha, args.allow_different, args.top, args.logits,
                   args.max_slowdown)  # fmt: skip
    candidate = Path(args.runs[-1])
    if args.reference:
        result = compare_reference(args.reference, candidate, opts)
    elif args.history:
        result = compare_history(args.history, candidate, opts)
    else:
        result = compare(args.runs[0], candidate, opts)
    out = Path(args.output) if args.output else (candidate if candidate.is_dir() else candidate.parent)
    json_path, csv_path = write(result, out)
    print_report(result, args.top)
    print(f"compare.json: {json_path}\ncompare.csv:  {csv_path}", file=sys.stderr)
    return 0 if result["verdict"] == "PASS" else EXIT_FAIL


def compare_reference(reference: str | Path, candidate: Path, opts: Options) -> dict:
    """Each task of the candidate against the matching entry of a reference file (modeltest/references.py)."""
    from . import references

    refs = references.load(reference)
    tasks = []
    for run in load_runs(candidate).values():
        ref = references.match(refs, run.summary)
        if ref is None:
            described = references.describe(run.summary)
            want = ", ".join(f"{k} {v!r}" for k, v in described.items())
            why = "" if described["dtype"] else " (score-only: the predictions name no dtype, so one entry must match without it)"
            raise ModelTestError(f"{reference}: no reference for this run ({want}){why}; entries: "
                                 + "; ".join(f"{r.task}/{r.metric}/{r.evaluator}/{r.dtype}" for r in refs))  # fmt: skip
        gated = references.gate(ref, run.summary["value"], run.summary["stderr"], opts.alpha)  # as the run printed it
        tasks.append({"task": run.task, "metric": run.metric, "baseline": ref.score, "n": len(run.records),
                      "ci95": run.summary.get("ci95"), **gated, "candidate_source": str(run.source)})  # fmt: skip
    return {"verdict": "FAIL" if any(t["verdict"] == "FAIL" for t in tasks) else "PASS", "tasks": tasks,
            "reference": str(reference), "candidate": str(candidate), "missing_in_candidate": []}  # fmt: skip


def compare_history(db: str | Path, candidate: Path, opts: Options) -> dict:
    """Each task of the candidate against its baseline in the history; the verdicts are recorded."""
    from . import history

    con = history.connect(db)
    tasks = []
    for run in load_runs(candidate).values():
        if run.task == "clip_score":  # a CLIP summary beside a caption run: gated by clip_score --reference
            if not candidate.is_dir():
                raise ModelTestError(f"{run.source}: the history keeps modeltest runs; compare CLIP scores file to file")
            continue
        row = history.find_run(con, run.source)
        if row is None:  # a run made without --history: recorded now
            history.record_run(db, run.summary, run.source, candidate if candidate.is_dir() else run.folder)
            row = history.find_run(con, run.source)
        base = history.baseline_for(con, row)
        if base is None:
            task = {"task": run.task, "metric": run.metric, "verdict": "PASS", "baseline": None,
                    "candidate": run.summary.get("value"), "n": len(run.records), "diff": None, "p_value": None,
                    "note": "the first run of its task, model and data: the baseline from now on"}  # fmt: skip
        else:
            task = compare_task(load_result(Path(base["result_json"])), run, opts)
            task["baseline_run"] = base["id"]
        task["candidate_run"] = row["id"]
        history.record_comparison(con, {k: v for k, v in task.items() if not k.startswith("_")},
                                  None if base is None else base["id"], row["id"], row["model"])  # fmt: skip
        tasks.append(task)
    return {"verdict": "FAIL" if any(t["verdict"] == "FAIL" for t in tasks) else "PASS", "tasks": tasks,
            "history": str(db), "candidate": str(candidate), "missing_in_candidate": []}  # fmt: skip
