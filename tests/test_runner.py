"""Protects the evaluation loop: output layout and numbers, resume after an interruption (same
results as an uninterrupted run), refusal of a changed config, per-sample failures with exit 3,
and score-only mode - all through a backend that answers from a table."""

import csv
import json

import pytest

from modeltest.backends.base import Backend, Generation, open_image
from modeltest.cli import main
from modeltest.config import load_task_config
from modeltest.errors import ModelTestError
from modeltest.runner import RunOptions, run

# What the fake model answers per question_id (offset from 34602), and the VQA accuracy (evalai)
# that answer earns against tests/conftest.py QUESTIONS.
ANSWERS = {0: ("Dakota.", 1.0), 1: ("twenty-two", 0.6), 2: ("STOP<|endoftext|>x", 1.0), 3: ("blue", 1.0),
           4: ("dakota digital", 0.9), 5: ("2", 1.0), 6: ("go", 0.0), 7: ("white", 1.0)}  # fmt: skip
EXPECTED = sum(s for _, s in ANSWERS.values()) / len(ANSWERS)


class TableBackend(Backend):
    name = "table"

    def __init__(self, fail_ids=(), interrupt_after=None):
        self.calls = []
        self.fail_ids = set(fail_ids)
        self.interrupt_after = interrupt_after

    def generate(self, requests):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append([r.id for r in requests])
        if any(r.id in self.fail_ids for r in requests):
            raise RuntimeError("device fell over")
        out = []
        for r in requests:
            try:
                open_image(r.images[0])
            except Exception as e:
                out.append(Generation(error=str(e)))
                continue
            out.append(Generation(text=ANSWERS[r.id - 34602][0], prompt="P", input_tokens=7, output_tokens=2, e2e_time=0.01))
        return out


def _run(task_yaml, out, backend, **kw):
    return run(None, load_task_config(task_yaml), RunOptions(output_dir=str(out), backend="hf", device="cpu",
                                                           progress=False, **kw), backend=backend)  # fmt: skip


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_outputs_layout_and_numbers(task_yaml, tmp_path):
    res = _run(task_yaml, tmp_path / "out", TableBackend(), batch_size=3)
    assert res.exit_code == 0 and res.errors == 0
    assert res.value == pytest.approx(EXPECTED, abs=1e-12)
    csv_path = tmp_path / "out/results/CPU/precision_test/textvqa/bf16/predictions/textvqa_pa_batch3_tp1_result.csv"
    assert res.paths.result_csv == csv_path
    rows = _csv(csv_path)
    assert rows[0] == ["Tasks", "N-Shot", "Total", "Pass", "Metric", "Value"]
    assert rows[1][:3] == ["textvqa", "0", "8"] and float(rows[1][3]) == pytest.approx(EXPECTED * 8)
    assert float(rows[1][5]) == pytest.approx(float(rows[1][3]) / 8, abs=1e-6)
    assert len(rows) == 2  # one subject: no second row repeating the task row's numbers
    summary = json.loads(res.paths.result_json.read_text())
    assert summary["value"] == pytest.approx(EXPECTED) and summary["errors"] == 0
    assert {"config", "versions", "git_commit", "device", "timings"} <= summary.keys()
    lines = [json.loads(x) for x in res.paths.samples.read_text().splitlines()]
    assert [r["id"] for r in lines] == list(range(34602, 34610))
    first = lines[2]
    assert first["prediction"] == "STOP" and first["score"] == 1.0 and first["error"] is None
    assert {"prompt", "image", "references", "input_tokens", "output_tokens", "e2e_time"} <= first.keys()
    assert len(first["references"]) == 10


def test_resume_gives_the_uninterrupted_result(task_yaml, tmp_path):
    full = _run(task_yaml, tmp_path / "a", TableBackend(), batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        _run(task_yaml, tmp_path / "b", TableBackend(interrupt_after=2), batch_size=2)
    partial = tmp_path / "b/debug/CPU/precision_test/textvqa/bf16/predictions/textvqa_pa_batch2_tp1/samples.jsonl"
    assert len(partial.read_text().splitlines()) == 4  # two batches were written as they finished
    with open(partial, "a") as f:
        f.write('{"id": 34606, "pred')  # a line torn by SIGKILL mid-write
    again = TableBackend()
    resumed = _run(task_yaml, tmp_path / "b", again, batch_size=2)
    assert again.calls == [[34606, 34607], [34608, 34609]]  # only what was missing
    assert resumed.value == full.value and resumed.rows == full.rows
    assert _csv(resumed.paths.result_csv) == _csv(full.paths.result_csv)
    ids = [json.loads(x)["id"] for x in partial.read_text().splitlines()]
    assert ids == list(range(34602, 34610))
    nothing = TableBackend()
    assert _run(task_yaml, tmp_path / "b", nothing, batch_size=2).value == full.value and nothing.calls == []


def test_changed_config_is_refused_unless_overwrite(task_yaml, tmp_path):
    _run(task_yaml, tmp_path / "o", TableBackend(), limit=2)
    cfg = task_yaml.read_text().replace("normalizer: evalai", "normalizer: official")
    task_yaml.write_text(cfg)
    with pytest.raises(ModelTestError, match=r"different configuration.*task.metric.normalizer.*--overwrite"):
        _run(task_yaml, tmp_path / "o", TableBackend(), limit=2)
    backend = TableBackend()
    _run(task_yaml, tmp_path / "o", backend, limit=2, overwrite=True)
    assert backend.calls == [[34602], [34603]]


def test_per_sample_failures_are_recorded_and_gate_the_exit_code(task_yaml, textvqa, tmp_path):
    (textvqa.parent / "train_images" / "camera.png").unlink()  # the image of 34603 and 34609
    (textvqa.parent / "train_images" / "chelsea.jpg").write_bytes(b"not a jpeg")  # 34604
    backend = TableBackend(fail_ids={34608})
    res = _run(task_yaml, tmp_path / "e", backend, batch_size=4)
    assert res.exit_code == 3 and res.errors == 4 and res.total == 8
    recs = {json.loads(x)["id"]: json.loads(x) for x in res.paths.samples.read_text().splitlines()}
    assert "image not found" in recs[34603]["error"] and recs[34603]["score"] == 0.0
    assert "image not found" in recs[34609]["error"]
    assert "image unreadable" in recs[34604]["error"]
    assert recs[34608]["error"] == "RuntimeError: device fell over"
    assert recs[34607]["error"] is None and recs[34607]["score"] == 1.0  # its batch-mates were retried alone
    assert backend.calls[-4:] == [[34606], [34607], [34608], [34609]]
    ok = sum(s for i, (_, s) in ANSWERS.items() if 34602 + i not in (34603, 34604, 34608, 34609))
    assert res.value == pytest.approx(ok / 8)
    assert json.loads(res.paths.result_json.read_text())["errors"] == 4
    assert _run(task_yaml, tmp_path / "e", TableBackend(), batch_size=4, max_error_rate=0.5).exit_code == 0


def _predictions(tmp_path, fmt):
    rows = [{"question_id": 34602 + i, "answer": a} for i, (a, _) in ANSWERS.items()]
    if fmt == "json":
        path = tmp_path / "textvqa_val_240101.json"
        path.write_text(json.dumps(rows))
    else:
        path = tmp_path / "preds.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_score_only_mode(task_yaml, tmp_path, fmt, capsys):
    preds = _predictions(tmp_path, fmt)
    code = main(["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir",
                 str(tmp_path / "s"), "--no_progress"])  # fmt: skip
    assert code == 0
    csv_path = tmp_path / f"s/results/predictions/precision_test/textvqa/{preds.stem}/textvqa_result.csv"
    assert float(_csv(csv_path)[1][5]) == pytest.approx(EXPECTED, abs=1e-6)
    assert "textvqa" in capsys.readouterr().out


def test_score_only_rejects_unknown_question_ids(task_yaml, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"question_id": 34602, "answer": "dakota"}\n{"question_id": 999, "answer": "x"}\n')
    code = main(["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "1 question_id(s) are not in the dataset: 999" in err and "Traceback" not in err
    preds.write_text('{"question_id": 34602}\n')
    assert main(["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir", str(tmp_path)]) == 2
    assert "p.jsonl: record 1" in capsys.readouterr().err


def test_save_debug_writes_seed_outputs_txt(task_yaml, tmp_path):
    res = _run(task_yaml, tmp_path / "d", TableBackend(), limit=3, save_debug=True)
    (txt,) = res.paths.debug_dir.glob("outputs_*.txt")
    lines = [json.loads(x) for x in txt.read_text().splitlines()]
    assert len(lines) == 3 and lines[0][:2] == ["Dakota.", "P"] and isinstance(lines[0][2], float)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, task_yaml, capsys):
    assert main(["--task_config_path", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found" in err
    assert main(["--task_config_path", str(task_yaml)]) == 2
    assert "--model_config_path is required" in capsys.readouterr().err
    model = tmp_path / "m.yaml"
    model.write_text(f"model_name: m\nmodel_path: {tmp_path / 'no-weights'}\nbackend: hf\n")
    assert main(["--task_config_path", str(task_yaml), "--model_config_path", str(model), "--output_dir", str(tmp_path)]) == 2
    assert "model_path does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("debug/**/*")), "nothing is written before the inputs are checked"


class StreamingBackend(TableBackend):
    """Finishes requests out of order, reporting each as it goes, and falls over mid-window."""

    streams = True
    window = 8

    def generate(self, requests, on_result=None):
        if len(requests) == 1:  # a retry: answered like the table backend (which logs the call)
            return super().generate(requests)
        self.calls.append([r.id for r in requests])
        for i in reversed(range(len(requests))):
            if requests[i].id == 34604:
                raise RuntimeError("device fell over")
            on_result(i, Generation(text=ANSWERS[requests[i].id - 34602][0], output_tokens=2))
        raise AssertionError("unreachable")


def test_streaming_backend_saves_each_result_as_it_finishes(task_yaml, tmp_path):
    backend = StreamingBackend(fail_ids={34604})
    res = _run(task_yaml, tmp_path / "s", backend, batch_size=2)
    assert backend.calls[0] == list(range(34602, 34610))  # one window, not batches of --batch_size 2
    # streamed in completion order; after the failure only the requests without a result are retried
    lines = [json.loads(x) for x in res.paths.samples.read_text().splitlines()]
    assert [r["id"] for r in lines[:5]] == [34609, 34608, 34607, 34606, 34605]
    assert backend.calls[1:] == [[34602], [34603], [34604]]
    assert {r["id"]: r["error"] for r in lines}[34604] == "RuntimeError: device fell over"
    assert res.total == 8 and res.errors == 1


class PeekingBackend(TableBackend):
    """Before answering each batch, reads samples.jsonl from disk through a handle of its own: what a
    SIGKILL at that moment would leave behind."""

    def __init__(self, root):
        super().__init__()
        self.root, self.on_disk = root, []

    def generate(self, requests):
        files = list(self.root.rglob("samples.jsonl"))
        self.on_disk.append(len(files[0].read_bytes().splitlines()) if files else 0)
        return super().generate(requests)


def test_each_sample_is_on_disk_before_the_next_batch_runs(task_yaml, tmp_path):
    backend = PeekingBackend(tmp_path / "p")
    _run(task_yaml, tmp_path / "p", backend, batch_size=1, limit=4)
    assert backend.on_disk == [0, 1, 2, 3]  # not held in a write buffer until the file closes
