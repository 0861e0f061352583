"""Protects what a new user reads first (issue 14):

- the results CSV, JSON rows and printed table hold one row per subject only when there are several
  (one subject's row would repeat the task row's numbers);
- score-only mode (--predictions) names no device or dtype in its paths and JSON, and writes captions
  back under the input's device prefix (gpu_coco_rst.json stays gpu_...), or a neutral name;
- a resumed run says how many samples it reuses, from where, and how many failed ones it retries.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from modeltest.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import ANSWERS, EXPECTED, TableBackend, _run  # noqa: E402

pytest_plugins = ["pytester"]  # test_big_files_of_passing_tests_are_removed runs a session of its own

COCO_TASK = Path(__file__).resolve().parent.parent / "configs/task/coco_caption.yaml"


def _csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _rewrite(samples: Path, change) -> None:
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps(change(r)) + "\n" for r in recs))


# ---- subject rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["textvqa", "TextVQA val"])
def test_one_subject_gives_only_the_task_row(task_yaml, tmp_path, capsys, subject):
    """Also when the subject is named otherwise: its numbers are the task row's; the JSON names it."""
    cfg = yaml.safe_load(task_yaml.read_text())
    cfg["subject_mapping"] = {"textvqa": {"name": subject}}
    task_yaml.write_text(yaml.safe_dump(cfg))
    res = _run(task_yaml, tmp_path / "o", TableBackend())
    rows = _csv(res.paths.result_csv)
    assert [r[0] for r in rows] == ["Tasks", "textvqa"]
    summary = json.loads(res.paths.result_json.read_text())
    assert len(summary["rows"]) == 1 and summary["subjects"] == [subject]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 and "textvqa" in table[1]  # header + the task


def test_several_subjects_get_a_row_each(task_yaml, tmp_path, capsys):
    out = tmp_path / "o"
    first = _run(task_yaml, out, TableBackend())
    # records of two subjects (as a task mapping several would make); the rerun reuses them all
    _rewrite(first.paths.samples, lambda r: {**r, "subject": "even" if r["id"] % 2 == 0 else "odd"})
    capsys.readouterr()
    res = _run(task_yaml, out, TableBackend())
    rows = _csv(res.paths.result_csv)
    assert [r[0] for r in rows] == ["Tasks", "textvqa", "even", "odd"]
    even = [s for i, (_, s) in ANSWERS.items() if i % 2 == 0]
    assert rows[2][2] == "4" and float(rows[2][5]) == pytest.approx(sum(even) / 4, abs=1e-6)
    assert float(rows[1][5]) == pytest.approx(EXPECTED, abs=1e-6)
    summary = json.loads(res.paths.result_json.read_text())
    assert [r["Tasks"] for r in summary["rows"]] == ["textvqa", "even", "odd"]
    assert summary["subjects"] == ["even", "odd"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 4


# ---- score-only mode ----------------------------------------------------------------------------


def _textvqa_predictions(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question_id": 34602 + i, "answer": a}) + "\n" for i, (a, _) in ANSWERS.items()))
    return path


def test_score_only_claims_no_device_or_dtype(task_yaml, tmp_path):
    preds = _textvqa_predictions(tmp_path / "gpu_answers.jsonl")
    out = tmp_path / "s"
    assert main(["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir", str(out),
                 "--no_progress"]) == 0  # fmt: skip
    csv_path = out / "results/predictions/precision_test/textvqa/gpu_answers/textvqa_result.csv"
    assert float(_csv(csv_path)[1][5]) == pytest.approx(EXPECTED, abs=1e-6)
    assert (out / "debug/predictions/precision_test/textvqa/gpu_answers/textvqa/samples.jsonl").is_file()
    for path in out.rglob("*"):  # no folder or file name claims a device, a dtype, a batch size or tp
        rel = str(path.relative_to(out))
        assert not any(word in rel for word in ("CPU", "GPU", "bf16", "fp16", "_pa_", "batch", "tp1")), rel
    summary = json.loads(csv_path.with_suffix(".json").read_text())
    assert summary["device"] is None and summary["dtype"] is None and summary["model"] == "predictions"


def _coco(tmp_path: Path, photo_dir: Path) -> Path:
    import shutil

    folder = tmp_path / "coco"
    shutil.copytree(photo_dir, folder)
    return folder


def _score_captions(task: Path, coco: Path, preds: Path, out: Path) -> int:
    return main(["--task_config_path", str(task), "--dataset_path", str(coco), "--predictions", str(preds),
                 "--output_dir", str(out), "--no_progress"])  # fmt: skip


def test_score_only_captions_keep_the_inputs_device_prefix(photo_dir, tmp_path):
    """The seed's workflow: the GPU's and the NPU's captions scored into one --output_dir, side by side;
    each written back under its own name, never cpu_coco_rst.json."""
    coco = _coco(tmp_path, photo_dir)
    out = tmp_path / "out"
    base = out / "results/predictions/precision_test/coco_caption"
    made = {}
    for device, caption in (("gpu", "A photo."), ("npu", "A picture.")):
        made[device] = {"astronaut.jpg": caption, "coffee.png": ""}
        preds = tmp_path / f"{device}_coco_rst.json"
        preds.write_text(json.dumps(made[device]))
        assert _score_captions(COCO_TASK, coco, preds, out) == 0
        rst = base / f"{device}_coco_rst" / f"{device}_coco_rst.json"
        assert json.loads(rst.read_text()) == made[device]
        summary = json.loads((base / f"{device}_coco_rst/coco_caption_result.json").read_text())
        assert summary["paths"]["captions"] == str(rst) and summary["device"] is None
    assert sorted(p.name for p in out.rglob("*_coco_rst.json")) == ["gpu_coco_rst.json", "npu_coco_rst.json"]
    # a file whose name names no device: a neutral name
    plain = tmp_path / "captions.json"
    plain.write_text(json.dumps(made["gpu"]))
    assert _score_captions(COCO_TASK, coco, plain, out) == 0
    assert json.loads((base / "captions/predictions_coco_rst.json").read_text()) == made["gpu"]


def test_real_runs_keep_the_seeds_layout(task_yaml, tmp_path):
    res = _run(task_yaml, tmp_path / "o", TableBackend(), batch_size=2)
    assert res.paths.result_csv == tmp_path / "o/results/CPU/precision_test/textvqa/bf16/predictions/textvqa_pa_batch2_tp1_result.csv"
    summary = json.loads(res.paths.result_json.read_text())
    assert summary["device"] == "cpu" and summary["dtype"] == "bf16"


# ---- the resume line ----------------------------------------------------------------------------


def _resume_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "resuming" in line]


def test_a_resumed_run_says_what_it_reuses(task_yaml, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        _run(task_yaml, out, TableBackend(interrupt_after=2), batch_size=2)
    assert _resume_lines(capsys.readouterr().err) == []  # a fresh run reuses nothing
    res = _run(task_yaml, out, TableBackend(), batch_size=2)
    assert _resume_lines(capsys.readouterr().err) == [
        f"modeltest: resuming: 4 of 8 samples already done in {res.paths.samples}; 4 to go"
    ]
    _run(task_yaml, out, TableBackend(), batch_size=2, limit=3)  # counted over this run's samples
    assert _resume_lines(capsys.readouterr().err) == [
        f"modeltest: resuming: 3 of 3 samples already done in {res.paths.samples}; 0 to go"
    ]
    _run(task_yaml, out, TableBackend(), batch_size=2, overwrite=True)  # started over: nothing reused
    assert _resume_lines(capsys.readouterr().err) == []


def test_the_resume_line_counts_failed_samples(task_yaml, tmp_path, capsys):
    out = tmp_path / "f"
    _run(task_yaml, out, TableBackend(fail_ids={34603, 34605}), max_error_rate=1.0)
    capsys.readouterr()
    res = _run(task_yaml, out, TableBackend(fail_ids={34603, 34605}), max_error_rate=1.0, retry_errors=False)
    assert _resume_lines(capsys.readouterr().err) == [
        f"modeltest: resuming: 8 of 8 samples already done in {res.paths.samples}; 0 to go "
        "(2 of them failed and are kept: --no_retry_errors)"
    ]
    _run(task_yaml, out, TableBackend(), max_error_rate=1.0)
    assert _resume_lines(capsys.readouterr().err) == [
        f"modeltest: resuming: 6 of 8 samples already done in {res.paths.samples}; 2 to go "
        "(2 that failed before are retried)"
    ]



# ---- the suite's disk use --------------------------------------------------------------------------


def test_big_files_of_passing_tests_are_removed(pytester):
    """tests/conftest.py: what a passing test wrote of BIG_FILE bytes or more in its tmp_path (through a
    fixture too) is gone after it; small files stay, and a failed test keeps everything."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_disk="""
        import pytest

        @pytest.fixture
        def made(tmp_path):
            (tmp_path / "ckpt").mkdir()
            (tmp_path / "ckpt" / "model.safetensors").write_bytes(bytes(2 << 20))
            (tmp_path / "result.csv").write_text("Tasks")
            return tmp_path

        def test_passes(made):
            pass

        def test_fails(made):
            assert False
    """)  # fmt: skip
    base = pytester.path / "tmp"
    pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--basetemp={base}").assert_outcomes(passed=1, failed=1)
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) == [
        "test_fails0/ckpt/model.safetensors", "test_fails0/result.csv", "test_passes0/result.csv"]  # fmt: skip
