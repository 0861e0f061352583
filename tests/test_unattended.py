"""Protects what an unattended (nightly) run needs from the runner, through a backend that answers from
a table: results carry their uncertainty (stderr, 95% CI; the table shows value ± stderr) and the
data's fingerprint; the results are refreshed while the run goes (marked incomplete); samples that
failed are done again by a rerun (unless --no_retry_errors), keeping one record per sample; a run that
failed before its first sample does not block the corrected rerun; broken resume state, a
WORLD_SIZE that is not a number and an --output_dir that cannot be written are one line and exit 2,
before any work."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

import modeltest.runner as runner
from modeltest.cli import main
from modeltest.output import dataset_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import ANSWERS, TableBackend, _run  # noqa: E402


def test_results_carry_their_uncertainty_and_the_datas_fingerprint(task_yaml, tmp_path, capsys):
    res = _run(task_yaml, tmp_path / "u", TableBackend(), batch_size=4)
    scores = [s for _, s in ANSWERS.values()]
    mean = sum(scores) / len(scores)
    stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) / len(scores))
    summary = json.loads(res.paths.result_json.read_text())
    assert summary["value"] == pytest.approx(mean) and summary["stderr"] == pytest.approx(stderr)
    assert summary["ci95"] == pytest.approx([mean - 1.959964 * stderr, mean + 1.959964 * stderr], abs=1e-6)
    assert summary["rows"][0]["stderr"] == pytest.approx(stderr) and summary["complete"] is True
    records = [json.loads(x) for x in res.paths.samples.read_text().splitlines()]
    assert summary["dataset_fingerprint"] == dataset_fingerprint(records)
    assert f"{mean:.4f} ± {stderr:.4f}" in capsys.readouterr().out
    assert res.paths.result_csv.read_text().splitlines()[0] == "Tasks,N-Shot,Total,Pass,Metric,Value"  # the seed's


class PeekingBackend(TableBackend):
    """Reads the results JSON each time it is called: what someone watching the run would see."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.seen = root, []

    def generate(self, requests):
        found = list(self.root.rglob("*_result.json"))
        self.seen.append(json.loads(found[0].read_text()) if found else None)
        return super().generate(requests)


def test_results_are_refreshed_while_the_run_goes(task_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "REFRESH_S", 0.0)
    backend = PeekingBackend(tmp_path / "r")
    _run(task_yaml, tmp_path / "r", backend, batch_size=2)
    partial = [s for s in backend.seen if s is not None]
    assert [s["total"] for s in partial] == [2, 4, 6] and all(s["complete"] is False for s in partial)
    assert partial[0]["value"] == pytest.approx((ANSWERS[0][1] + ANSWERS[1][1]) / 2)
    assert json.loads(next((tmp_path / "r").rglob("*_result.json")).read_text())["complete"] is True


def test_failed_samples_are_retried_by_a_rerun(task_yaml, textvqa, tmp_path):
    image = textvqa.parent / "train_images" / "camera.png"  # the image of 34603 and 34609
    kept = tmp_path / "camera.png"
    shutil.move(image, kept)
    first = _run(task_yaml, tmp_path / "e", TableBackend(), batch_size=4)
    assert first.errors == 2
    shutil.move(kept, image)  # restored overnight

    keep = TableBackend()
    assert _run(task_yaml, tmp_path / "e", keep, batch_size=4, retry_errors=False).errors == 2
    assert keep.calls == []  # --no_retry_errors: nothing to do

    again = TableBackend()
    rerun = _run(task_yaml, tmp_path / "e", again, batch_size=4)
    assert again.calls == [[34603, 34609]] and rerun.errors == 0
    ids = [json.loads(x)["id"] for x in rerun.paths.samples.read_text().splitlines()]
    assert sorted(ids) == list(range(34602, 34610))  # one record per sample: the failed ones replaced
    assert rerun.value == _run(task_yaml, tmp_path / "clean", TableBackend()).value


def test_a_run_that_failed_before_its_first_sample_blocks_nothing(task_yaml, tmp_path):
    res = _run(task_yaml, tmp_path / "f", TableBackend(), limit=2)
    res.paths.samples.unlink()  # as if the model had failed to load: the configuration, no sample
    stored = json.loads(res.paths.run_config.read_text())
    stored["backend"] = "engine"
    res.paths.run_config.write_text(json.dumps(stored))
    backend = TableBackend()
    assert _run(task_yaml, tmp_path / "f", backend, limit=2).total == 2 and backend.calls
    assert json.loads(res.paths.run_config.read_text())["backend"] == "hf"  # the new configuration


@pytest.mark.parametrize("content", ["", "null", "[1, 2]", "{broken", b"\xff\xfe"])
def test_broken_resume_state_is_one_line(task_yaml, tmp_path, capsys, content):
    args = ["--task_config_path", str(task_yaml), "--predictions", str(_predictions(tmp_path)), "--output_dir",
            str(tmp_path / "s2")]  # fmt: skip
    assert main([*args, "--limit", "2"]) == 0
    (config,) = (tmp_path / "s2").rglob("run_config.json")
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    capsys.readouterr()
    assert main([*args, "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{config}: not a run configuration" in err and "--overwrite" in err


def _predictions(tmp_path: Path) -> Path:
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"question_id": 34602 + i, "answer": a}) + "\n" for i, (a, _) in ANSWERS.items()))
    return path


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_world_size_that_is_not_a_number(task_yaml, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    args = ["--task_config_path", str(task_yaml), "--predictions", str(_predictions(tmp_path)), "--output_dir",
            str(tmp_path / "w")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"WORLD_SIZE={value!r} is not a whole number" in err


def test_an_output_dir_that_cannot_be_written(task_yaml, tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    args = ["--task_config_path", str(task_yaml), "--predictions", str(_predictions(tmp_path))]
    for out in (blocker, blocker / "below"):
        assert main([*args, "--output_dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write the run's outputs under" in err and "--output_dir" in err
        assert main([*args, "--output_dir", str(out), "--check_only"]) == 2  # the pre-flight sees it too
        assert "cannot write the run's outputs" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        assert main([*args, "--output_dir", str(locked)]) == 2
        assert "cannot write the run's outputs" in capsys.readouterr().err
