"""Protects the run history and the reference figures:

- runs recorded with --history (SQLite): the table, the trend plot (a PNG that opens) and the
  self-contained HTML report (it parses, embeds the plot, lists the runs and the latest comparison);
- `modeltest compare --history DB CANDIDATE`: the first run becomes the baseline; later runs are
  compared with the latest PASS (else the first) run of the same task, model and data, and every
  verdict is kept (a FAIL is marked in the report);
- `modeltest compare --reference FILE CANDIDATE`: the one-sided gate documented in
  modeltest/references.py, an unmatched run refused listing the entries; a finished run prints how far
  it is from a matching reference; the shipped reference files load.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from modeltest.cli import main
from modeltest.config import ModelConfig, load_task_config
from modeltest.references import REFERENCE_DIR, gate, load
from modeltest.runner import RunOptions, run

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import ANSWERS, TableBackend  # noqa: E402

IDS = [34602 + i for i in range(8)]


def _score_only(task_yaml, out: Path, answers: dict[int, str], db: Path | None = None) -> int:
    preds = out.parent / f"{out.name}.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q, "answer": a}) + "\n" for q, a in answers.items()))
    args = ["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir", str(out), "--no_progress"]
    return main([*args, *(["--history", str(db)] if db else [])])


def _answers(wrong: int) -> dict[int, str]:
    """The table's answers, the first `wrong` of them replaced by a wrong one."""
    return {q: ("nonsense" if i < wrong else ANSWERS[i][0]) for i, q in enumerate(IDS)}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_history_compare_plot_and_report(task_yaml, tmp_path, capsys):
    db = tmp_path / "runs.db"
    outs = {}
    for name, wrong in (("first", 0), ("second", 0), ("worse", 3), ("after", 0)):
        outs[name] = tmp_path / name
        assert _score_only(task_yaml, outs[name], _answers(wrong), db if name != "after" else None) == 0
        assert "history: run" in capsys.readouterr().out or name == "after"
    verdicts = []
    for name in ("first", "second", "worse", "after"):
        code = main(["compare", "--history", str(db), str(outs[name]), "--output", str(tmp_path / f"cmp-{name}")])
        result = json.loads((tmp_path / f"cmp-{name}" / "compare.json").read_text())
        verdicts.append((code, result["verdict"], result["tasks"][0].get("baseline_run")))
    # first: no baseline; second: against the first; worse: against the second (latest PASS) and FAILs;
    # after (not recorded by its run: recorded now): against the second again, the latest PASS
    assert verdicts == [(0, "PASS", None), (0, "PASS", 1), (1, "FAIL", 2), (0, "PASS", 2)]
    con = sqlite3.connect(db)
    assert [r[0] for r in con.execute("SELECT verdict FROM runs ORDER BY id")] == ["PASS", "PASS", "FAIL", "PASS"]
    assert con.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 4
    row = con.execute("SELECT task, model, n, score, stderr, dataset_fingerprint, tp, dp FROM runs WHERE id = 3").fetchone()
    assert row[:3] == ("textvqa", "predictions", 8) and row[3] < 0.8 and row[4] > 0 and len(row[5]) == 64

    capsys.readouterr()
    png, page = tmp_path / "trend.png", tmp_path / "report.html"
    assert main(["history", "--db", str(db), "--task", "textvqa", "--plot", str(png), "--html", str(page)]) == 0
    table = capsys.readouterr().out
    assert table.count("textvqa") == 4 and "FAIL" in table
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    parser = _Page()
    parser.feed(page.read_text())
    assert parser.images and parser.images[0].startswith("data:image/png;base64,") and "table" in parser.tags
    text = page.read_text()
    assert text.count("<tr><td>") >= 4 and "Latest comparison" in text and "class='pass'" in text
    assert "class='fail'" in text  # the FAIL run is marked
    assert main(["history", "--db", str(db), "--last", "2"]) == 0
    assert capsys.readouterr().out.count("textvqa") == 2
    assert main(["history", "--db", str(tmp_path / "none.db")]) == 2


def test_reference_gate(task_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert _score_only(task_yaml, out, _answers(0)) == 0
    summary = json.loads(next(out.rglob("*_result.json")).read_text())
    ref = tmp_path / "predictions.yaml"

    def write(score: float, tolerance: float, evaluator: str = "evalai", dtypes=("bf16",)) -> None:
        ref.write_text(yaml.safe_dump({"model": "predictions", "references": [
            {"task": "textvqa", "metric": "vqa_accuracy", "evaluator": evaluator, "dtype": dtype,
             "score": score, "tolerance": tolerance, "source": "measured here (test)"} for dtype in dtypes]}))  # fmt: skip

    value, stderr = summary["value"], summary["stderr"]
    write(value + 0.05, 0.01)  # 4 points above the floor... below it by more than its noise? see the gate
    expected = gate(load(ref)[0], value, stderr)
    code = main(["compare", "--reference", str(ref), str(out), "--output", str(tmp_path / "c1")])
    result = json.loads((tmp_path / "c1" / "compare.json").read_text())["tasks"][0]
    assert result["verdict"] == expected["verdict"] and code == {"PASS": 0, "FAIL": 1}[expected["verdict"]]
    assert result["floor"] == pytest.approx(value + 0.04) and result["p_value"] == pytest.approx(expected["p_value"])
    write(value + 0.5, 0.0)  # far above this run: certainly below the floor
    assert main(["compare", "--reference", str(ref), str(out), "--output", str(tmp_path / "c2")]) == 1
    write(value, 0.01)
    assert main(["compare", "--reference", str(ref), str(out), "--output", str(tmp_path / "c3")]) == 0
    write(value, 0.01, evaluator="vqaeval")
    capsys.readouterr()
    assert main(["compare", "--reference", str(ref), str(out)]) == 2
    err = capsys.readouterr().err
    assert "no reference for this run" in err and "evaluator 'evalai'" in err and "textvqa/vqa_accuracy/vqaeval/bf16" in err
    # a score-only run names no dtype: the one entry of its task matches whatever its dtype, two do not
    assert summary["dtype"] is None
    write(value, 0.01, dtypes=("fp16",))
    assert main(["compare", "--reference", str(ref), str(out), "--output", str(tmp_path / "c4")]) == 0
    write(value, 0.01, dtypes=("fp16", "bf16"))
    assert main(["compare", "--reference", str(ref), str(out)]) == 2
    err = capsys.readouterr().err
    assert "dtype None) (score-only: the predictions name no dtype" in err


def test_gate_formula():
    from modeltest.references import Reference
    from modeltest.stats import normal_cdf

    ref = Reference("m", "t", "acc", "e", "bf16", score=0.60, tolerance=0.02, source="s", file=Path("f"))
    g = gate(ref, 0.57, 0.01)
    assert g["floor"] == pytest.approx(0.58) and g["p_value"] == pytest.approx(normal_cdf(-1.0))
    assert g["verdict"] == "PASS"  # one standard error below the floor: not significant at 0.05
    assert gate(ref, 0.55, 0.01)["verdict"] == "FAIL"  # three below: significant
    assert gate(ref, 0.579, 0.0)["verdict"] == "FAIL" and gate(ref, 0.58, 0.0)["verdict"] == "PASS"


def test_a_finished_run_says_how_far_it_is_from_its_reference(task_yaml, tmp_path, monkeypatch, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "tiny.yaml").write_text(yaml.safe_dump({"model": "tiny", "references": [
        {"task": "textvqa", "metric": "vqa_accuracy", "evaluator": "evalai", "dtype": "bf16", "score": 0.9,
         "tolerance": 0.05, "source": "test"}]}))  # fmt: skip
    monkeypatch.setenv("MODELTEST_REFERENCES", str(refs))
    res = run(ModelConfig(model_name="tiny"), load_task_config(task_yaml),
              RunOptions(output_dir=str(tmp_path / "o"), backend="hf", device="cpu", progress=False),
              backend=TableBackend())  # fmt: skip
    out = capsys.readouterr().out
    assert f"reference: 0.9000 (tolerance 0.05; tiny.yaml); this run {res.value:.4f}" in out
    assert f"{res.value - 0.9:+.4f}" in out


def test_the_shipped_references_load():
    files = sorted(REFERENCE_DIR.glob("*.yaml"))
    assert files
    for f in files:
        for r in load(f):
            assert r.model == f.stem and 0 < r.score <= 1 and r.tolerance > 0 and len(r.source) > 40


@pytest.mark.parametrize("broken", ["reference", "history"])
def test_a_finished_run_keeps_its_results_when_the_history_or_reference_fails(task_yaml, tmp_path, monkeypatch,
                                                                               capsys, broken):  # fmt: skip
    """One line, the results written, the run's own exit code kept (3: too many failed samples) or 2."""
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "predictions.yaml").write_text("model: predictions\nreferences: [{task: textvqa}]\n" if broken ==
                                           "reference" else "model: predictions\nreferences: []\n")  # fmt: skip
    monkeypatch.setenv("MODELTEST_REFERENCES", str(refs))
    db = tmp_path / "a-file"
    db.write_text("not a database")
    code = _score_only(task_yaml, tmp_path / "run", _answers(0), db if broken == "history" else None)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the run's results are written" in err
    assert ("predictions.yaml" if broken == "reference" else "cannot open the history database") in err
    summary = json.loads(next((tmp_path / "run").rglob("*_result.json")).read_text())
    assert summary["complete"] is True and summary["total"] == len(IDS)
    if broken == "reference":  # too many failed samples (exit 3) and a broken reference: 3 stays
        from modeltest.backends.base import Backend, Generation

        class Fails(Backend):
            def generate(self, requests):
                return [Generation(error="broken on purpose") for _ in requests]

        (refs / "tiny.yaml").write_text("model: tiny\nreferences: [{task: textvqa}]\n")
        res = run(ModelConfig(model_name="tiny"), load_task_config(task_yaml),
                  RunOptions(output_dir=str(tmp_path / "o"), backend="hf", device="cpu", progress=False),
                  backend=Fails())  # fmt: skip
        assert res.exit_code == 3 and "tiny.yaml" in capsys.readouterr().err


def test_the_baseline_is_scored_with_the_same_evaluator(task_yaml, tmp_path, capsys):
    """A run scored with another normalizer is not compared with the earlier runs (its numbers mean
    something else): it is the first of its kind. A history written before the evaluator column
    existed gains it."""
    db = tmp_path / "runs.db"
    with sqlite3.connect(db) as con:  # the first schema, without `evaluator`
        con.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, finished_at TEXT NOT NULL, task TEXT NOT NULL, "
                    "model TEXT NOT NULL, backend TEXT, device TEXT, dtype TEXT, tp INTEGER, dp INTEGER, git_commit "
                    "TEXT, versions TEXT, dataset_fingerprint TEXT, n INTEGER, metric TEXT, score REAL, stderr REAL, "
                    "errors INTEGER, duration_s REAL, output_dir TEXT, result_json TEXT UNIQUE, verdict TEXT)")  # fmt: skip
    assert _score_only(task_yaml, tmp_path / "evalai", _answers(0), db) == 0
    other = tmp_path / "vqaeval.yaml"
    cfg = yaml.safe_load(task_yaml.read_text())
    other.write_text(yaml.safe_dump({**cfg, "metric": {**cfg.get("metric", {}), "normalizer": "vqaeval"}}))
    assert _score_only(other, tmp_path / "vqaeval", _answers(4), db) == 0
    assert main(["compare", "--history", str(db), str(tmp_path / "vqaeval"), "--output", str(tmp_path / "c")]) == 0
    (task,) = json.loads((tmp_path / "c" / "compare.json").read_text())["tasks"]
    assert task["baseline"] is None and "the first run of its task" in task["note"]
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT evaluator FROM runs ORDER BY id")] == ["evalai", "vqaeval"]
