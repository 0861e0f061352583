"""task_type performance / performance_maxbs (modeltest/tasks/performance.py):

- on the tiny Qwen-VL (engine backend, CPU, loaded once): every request runs exactly In_seq prompt
  tokens (the image span counted) and Out_seq generated tokens, no prefix or image cache serves them,
  the batch runs at once; the seed's CSV columns, throughputs that follow from the times, the averages
  only in the last row; the JSON's percentiles consistent with the CSV's times;
- maxbs bisection against a stub backend whose non-first token time is its batch size in ms (and that
  runs out of memory above 40): the answer, and every probe in _round_result.csv;
- against `python -m engine.serve` on the tiny Qwen-VL (--backend openai): the endpoint counts exactly
  In_seq prompt tokens (chat template and image included) and streams Out_seq tokens, each timed; a case
  too short for the template and image is its row's error, one line, and the exit code says so; results
  under results/openai/... naming the endpoint, with the client's clock defined;
- history and compare on two performance runs: a slower candidate FAILs, one within --max_slowdown PASSes;
- --tp 2 under torchrun: rank 0's figures written, the ranks in lockstep (maxbs too);
- a second run on the same folder while one measures: refused, naming the holder;
- the history lists and plots performance runs, a maxbs run with no answer included;
- bad keys and backends: one line, exit 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from modeltest.backends.base import Backend, SampleError, TimedBatch
from modeltest.cli import main
from modeltest.config import ModelConfig, TaskConfig, from_dict
from modeltest.runner import RunOptions, run
from modeltest.tasks.performance import COLUMNS, FINAL_COLUMNS, ROUND_COLUMNS

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_yaml  # noqa: E402

SPAN = 258  # Qwen-VL's image span: <img>, 256 slots, </img>


def _task(**keys) -> TaskConfig:
    return from_dict(TaskConfig, {"task_type": "performance", "task_name": "synthetic", "warmup_rounds": 0, **keys})


def _model(path=None) -> ModelConfig:
    return ModelConfig(model_name="tiny", model_path=str(path) if path else None, data_type="fp32", block_size=16)


def _csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open(encoding="utf-8")))


def _files(out: Path, pattern: str) -> list[Path]:
    return sorted(out.glob(f"results/CPU/performance*_test/synthetic/fp32/tiny/{pattern}"))


@pytest.fixture(scope="module")
def engine_backend(qwen_vl_ckpt):
    from modeltest.backends.engine import EngineBackend

    backend = EngineBackend(_model(qwen_vl_ckpt), device="cpu", batch_size=2, progress=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def engine_run(engine_backend, tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    task = _task(case_pair=[[SPAN + 12, 4], [SPAN, 3]], batch_size=[1, 2], with_image=True)
    result = run(_model(), task, RunOptions(output_dir=str(out), device="cpu", progress=False), engine_backend)
    return out, result


def test_every_request_runs_the_exact_token_counts_at_once(engine_run):
    out, result = engine_run
    assert result.exit_code == 0
    for batch in (1, 2):
        summary = json.loads(_files(out, f"performance_pa_batch{batch}_tp1_result.json")[0].read_text())
        assert summary["kind"] == "performance" and summary["task"] == f"synthetic_batch{batch}"
        assert [(c["input_len"], c["output_len"]) for c in summary["cases"]] == [(SPAN + 12, 4), (SPAN, 3)]
        for case in summary["cases"]:
            assert case["error"] is None
            assert case["input_tokens"] == [case["input_len"]] * batch  # the image span counted
            assert case["output_tokens"] == [case["output_len"]] * batch  # ignore_eos: never shorter
            for engine in case["engine"]:  # all at once, and every prompt new to the caches
                assert engine["max_concurrent"] == batch and engine["preemptions"] == 0
                assert engine["prefix_cache_hit_tokens"] == 0 and engine["image_cache_hits"] == 0


def test_the_seeds_csv_and_its_arithmetic(engine_run):
    out, _ = engine_run
    for batch in (1, 2):
        header, *rows = _csv(_files(out, f"performance_pa_batch{batch}_tp1_result.csv")[0])
        assert header == COLUMNS
        assert [r[:4] for r in rows] == [["tiny", str(batch), str(SPAN + 12), "4"], ["tiny", str(batch), str(SPAN), "3"]]
        nft_tp, e2e_tp = [], []
        for r in rows:
            total, first, non_first = float(r[4]), float(r[5]), float(r[6])
            out_seq = int(r[3])
            assert 0 < first < total * 1000
            assert non_first == pytest.approx((total * 1000 - first) / (out_seq - 1), rel=1e-3)
            assert float(r[7]) == pytest.approx(batch / (non_first / 1000), rel=1e-3)
            assert float(r[8]) == pytest.approx(batch * out_seq / total, rel=1e-3)
            nft_tp.append(float(r[7]))
            e2e_tp.append(float(r[8]))
        assert rows[0][9:] == ["", ""]  # the averages: only in the last row
        assert float(rows[-1][9]) == pytest.approx(sum(nft_tp) / 2, rel=1e-3)
        assert float(rows[-1][10]) == pytest.approx(sum(e2e_tp) / 2, rel=1e-3)


def test_the_json_percentiles_agree_with_the_times(engine_run):
    out, _ = engine_run
    summary = json.loads(_files(out, "performance_pa_batch2_tp1_result.json")[0].read_text())
    assert summary["value"] == pytest.approx(sum(c["e2e_throughput"] for c in summary["cases"]) / 2)
    assert summary["device"] == "cpu" and summary["device_name"] and "torch" in summary["versions"]
    for case in summary["cases"]:
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
            s = case[name]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"], name
        # one round: the batch's first token time is the latest TTFT, its total time the latest E2E
        assert case["ttft_ms"]["p99"] <= case["first_token_time_ms"] + 1e-6
        assert case["e2e_latency_ms"]["p99"] <= case["total_time_s"] * 1000 + 1e-6
        # every request ran the same tokens: the mean gap between tokens is the mean time per output token
        assert case["itl_ms"]["mean"] == pytest.approx(case["tpot_ms"]["mean"], rel=1e-6)
        assert case["ttft_ms"]["mean"] < case["e2e_latency_ms"]["mean"]


def test_text_only_prompts_run_the_exact_length_too(engine_backend, tmp_path, monkeypatch):
    engine = engine_backend.llm.llm_engine
    asked, add = [], engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, prompt, params: asked.append(params) or add(rid, prompt, params))
    task = _task(case_pair=[[40, 5]], batch_size=[2], with_image=False)
    result = run(_model(), task, RunOptions(output_dir=str(tmp_path), device="cpu", progress=False), engine_backend)
    case = result.summary["cases"][0]
    assert result.exit_code == 0 and case["input_tokens"] == [40, 40] and case["output_tokens"] == [5, 5]
    # a random model seldom ends early by itself: that no end token can stop it is in what is asked
    assert [(p.ignore_eos, p.min_tokens, p.max_tokens) for p in asked] == [(True, 5, 5)] * 2


# ---- a stub backend: times made up, so the search and the gates have known answers ---------------------


class Stub(Backend):
    """Non-first token time = batch size x `ms_per_request` ms; first token 20 ms; a batch above
    `memory` requests is out of memory."""

    name = "stub"
    device = "cpu"
    times_tokens = True

    def __init__(self, ms_per_request: float = 1.0, memory: int = 40):
        self.ms, self.memory, self.calls = ms_per_request, memory, []

    def generate(self, requests):
        raise AssertionError("a performance run never calls generate")

    def image_span_tokens(self) -> int:
        return 10

    def run_timed(self, input_len, output_len, batch_size, with_image, seed):
        self.calls.append(batch_size)
        if batch_size > self.memory:
            raise SampleError("out of device memory")
        step = batch_size * self.ms / 1000
        times = [0.020 + k * step for k in range(output_len)]
        return TimedBatch(100.0, [input_len] * batch_size, [[100.0 + t for t in times] for _ in range(batch_size)])


def test_a_batch_the_engine_did_not_run_at_once_and_ignored_keys_are_said(tmp_path, capsys):
    class Crowded(Stub):
        def run_timed(self, *args):
            return dataclasses.replace(super().run_timed(*args), engine={"max_concurrent": 3})

    task = _task(case_pair=[[32, 5]], batch_size=[4], prompt="{question}", max_non_first_token_time_ms=5)
    run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), Crowded())
    err = capsys.readouterr().err
    assert "batch 4, 32 in / 5 out: the engine ran at most 3 of the batch's requests at once" in err
    assert "prompt: accuracy keys, ignored by task_type: performance" in err
    assert "max_non_first_token_time_ms is performance_maxbs's limit" in err


def test_maxbs_bisects_to_the_largest_batch_under_the_limit(tmp_path):
    stub = Stub()
    task = _task(task_type="performance_maxbs", case_pair=[[32, 5]], batch_size=[1, 64],
                 max_non_first_token_time_ms=10.5)  # fmt: skip
    result = run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), stub)
    # 1 passes, 64 fails (out of memory counts as over), then bisection between them
    assert stub.calls == [1, 64, 32, 16, 8, 12, 10, 11]
    header, *rows = _csv(_files(tmp_path, "performance_maxbs_pa_tp1_round_result.csv")[0])
    assert header == ROUND_COLUMNS
    assert [int(r[1]) for r in rows] == stub.calls
    assert [r[-1] for r in rows] == ["True", "False", "False", "False", "True", "False", "True", "False"]
    assert rows[1][4].startswith("error: ") and "out of device memory" in rows[1][4]
    assert float(rows[6][6]) == pytest.approx(10.0)
    header, final = _csv(_files(tmp_path, "performance_maxbs_pa_tp1_final_result.csv")[0])
    assert header == FINAL_COLUMNS and final[:4] == ["tiny", "32", "5", "10"]
    assert result.summary["cases"][0]["max_batch_size"] == 10


def test_compare_fails_a_smaller_max_batch_size(tmp_path):
    def search(out: Path, ms: float) -> Path:
        task = _task(task_type="performance_maxbs", case_pair=[[32, 5]], batch_size=[1, 64],
                     max_non_first_token_time_ms=10.5)  # fmt: skip
        run(_model(), task, RunOptions(output_dir=str(out), progress=False), Stub(ms))
        return out

    base = search(tmp_path / "base", 1.0)
    assert main(["compare", str(base), str(search(tmp_path / "same", 1.0))]) == 0
    slow = search(tmp_path / "slow", 2.0)  # answer 5 instead of 10
    assert main(["compare", str(base), str(slow)]) == 1
    (row,) = json.loads((slow / "compare.json").read_text())["tasks"][0]["cases"]
    assert (row["figure"], row["baseline"], row["candidate"], row["verdict"]) == ("max_batch_size", 10, 5, "FAIL")


@pytest.mark.parametrize(("limit", "answer", "calls"), [(0.5, None, [4]), (100.0, 9, [4, 9])])
def test_maxbs_ends_of_the_range(tmp_path, limit, answer, calls):
    stub = Stub()
    task = _task(task_type="performance_maxbs", case_pair=[[32, 5]], batch_size=[4, 9], max_non_first_token_time_ms=limit)
    result = run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), stub)
    assert stub.calls == calls and result.summary["cases"][0]["max_batch_size"] == answer


def _stub_run(out: Path, ms: float, db: Path | None = None) -> Path:
    task = _task(case_pair=[[32, 5], [64, 9]], batch_size=[2, 4], warmup_rounds=1, rounds=2)
    run(_model(), task, RunOptions(output_dir=str(out), history=str(db) if db else None, progress=False), Stub(ms))
    return out


def test_compare_fails_a_slower_candidate_and_passes_one_within_the_tolerance(tmp_path, capsys):
    base = _stub_run(tmp_path / "base", 1.0)
    assert main(["compare", str(base), str(_stub_run(tmp_path / "same", 1.05))]) == 0  # 5% < --max_slowdown 10%
    slow = _stub_run(tmp_path / "slow", 1.5)
    assert main(["compare", str(base), str(slow)]) == 1
    report = json.loads((slow / "compare.json").read_text())
    assert report["verdict"] == "FAIL" and {t["task"] for t in report["tasks"]} == {"synthetic_batch2", "synthetic_batch4"}
    cases = {(r["case"], r["figure"]): r for t in report["tasks"] for r in t["cases"]}
    worse = cases[("batch 4, 64 in / 9 out", "non_first_token_time_ms")]
    assert worse["slowdown"] == pytest.approx(0.5) and worse["verdict"] == "FAIL"
    assert cases[("batch 4, 64 in / 9 out", "first_token_time_ms")]["verdict"] == "PASS"  # unchanged: 20 ms
    assert main(["compare", str(base), str(slow), "--max_slowdown", "0.6"]) == 0
    assert "per case" in capsys.readouterr().out


def test_history_takes_the_baseline_and_records_the_verdict(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "runs.db"
    _stub_run(tmp_path / "night1", 1.0, db)
    slow = _stub_run(tmp_path / "night2", 1.5, db)
    assert main(["compare", "--history", str(db), str(slow)]) == 1
    rows = sqlite3.connect(db).execute("SELECT task, metric, verdict FROM runs ORDER BY id").fetchall()
    assert rows == [("synthetic_batch2", "e2e_throughput", None), ("synthetic_batch4", "e2e_throughput", None),
                    ("synthetic_batch2", "e2e_throughput", "FAIL"), ("synthetic_batch4", "e2e_throughput", "FAIL")]
    assert main(["history", "--db", str(db)]) == 0 and "synthetic_batch4" in capsys.readouterr().out


# ---- bad input: one line, exit 2 --------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "said"), [
    ({"case_pair": [256, 256]}, "key 'case_pair.0': expected a list, got 256"),
    ({"case_pair": [[256]]}, "is not [input tokens >= 1, output tokens >= 2]"),
    ({"case_pair": [[64, 1]]}, "at least 2 output tokens"),
    ({"case_pair": []}, "needs case_pair"),
    ({"batch_size": [0, 4]}, "every batch size must be a positive integer"),
    ({"task_type": "performance_maxbs", "batch_size": [1, 8]}, "needs max_non_first_token_time_ms"),
    ({"task_type": "performance_maxbs", "batch_size": [8], "max_non_first_token_time_ms": 5}, "[smallest, largest]"),
    ({"task_name": "textvqa"}, "runs task_name: synthetic"),
    ({"rounds": 0}, "rounds must be a positive integer"),
])  # fmt: skip
def test_bad_performance_keys(tmp_path, capsys, keys, said):
    task = write_yaml(tmp_path / "task.yaml", {"task_type": "performance", "task_name": "synthetic",
                                               "case_pair": [[300, 8]], **keys})  # fmt: skip
    model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "model_path": str(tmp_path)})
    assert main(["--model_config_path", str(model), "--task_config_path", str(task), "--output_dir",
                 str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and err.startswith("modeltest: error: ")


@pytest.mark.parametrize("backend", ["hf"])
def test_backends_that_cannot_time_tokens_are_refused(tmp_path, capsys, backend):
    task = write_yaml(tmp_path / "task.yaml", {"task_type": "performance", "task_name": "synthetic",
                                               "case_pair": [[300, 8]]})  # fmt: skip
    model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "model_path": str(tmp_path)})
    assert main(["--model_config_path", str(model), "--task_config_path", str(task), "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert f"not available on the {backend} backend" in err and len(err.splitlines()) == 1


def test_an_input_shorter_than_the_image_span_is_refused(qwen_vl_ckpt, tmp_path, capsys):
    task = write_yaml(tmp_path / "task.yaml", {"task_type": "performance", "task_name": "synthetic",
                                               "case_pair": [[SPAN + 2, 4], [64, 8]], "with_image": True})  # fmt: skip
    model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "model_path": str(qwen_vl_ckpt),
                                                 "data_type": "fp32", "block_size": 16})  # fmt: skip
    assert main(["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu",
                 "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 2  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modeltest")]
    assert err == [f"modeltest: error: case_pair: input length 64 (of [64, 8]) is shorter than one image's span of "
                   f"{SPAN} tokens (with_image: true); make every input at least {SPAN} tokens, or set with_image: "
                   "false"]  # fmt: skip
    assert not list((tmp_path / "out").rglob("*.csv"))  # refused before any case ran


def test_mm_run_runs_the_shipped_performance_task(qwen_vl_ckpt, tmp_path):
    """`bash scripts/mm_run.sh performance qwen_vl`: the shipped config loads, and its runs land in the
    seed's performance_test folders, one CSV per batch size (--check_only: nothing is measured)."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("MODELTEST_OUTPUT_DIR", None)
    done = subprocess.run(["bash", str(repo / "scripts/mm_run.sh"), "performance", "qwen_vl", "--check_only",
                           "--model_path", str(qwen_vl_ckpt), "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    shipped = yaml.safe_load((repo / "configs/task/performance.yaml").read_text())
    assert shipped["with_image"] and min(i for i, _ in shipped["case_pair"]) >= SPAN  # every case holds the image
    for batch in (1, 16):
        assert (f"modeltest/qwen_vl/performance_result/results/CPU/performance_test/synthetic/bf16/qwen_vl/"
                f"performance_pa_batch{batch}_tp1_result.csv") in done.stderr  # fmt: skip


def test_the_batch_size_flag_overrides_the_task_list(tmp_path, monkeypatch):
    """CLI flags override the YAML: --batch_size N measures N alone; without it the task's list counts."""
    import modeltest.runner

    seen = []
    monkeypatch.setattr(modeltest.runner, "run", lambda model, task, opts, *a, **k: seen.append(
        (task.batch_size, opts.batch_size)) or SimpleNamespace(exit_code=0))  # fmt: skip
    task = write_yaml(tmp_path / "task.yaml", {"task_type": "performance", "task_name": "synthetic",
                                               "case_pair": [[300, 8]], "batch_size": [1, 16]})  # fmt: skip
    model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "model_path": str(tmp_path)})
    args = ["--model_config_path", str(model), "--task_config_path", str(task)]
    assert main([*args, "--batch_size", "4"]) == 0 and main(args) == 0
    assert seen == [([4], 4), ([1, 16], 1)]


def test_tensor_parallel_under_torchrun_writes_what_rank_0_measured(qwen_vl_ckpt, tmp_path):
    """--tp 2 under torchrun (gloo, 2 processes): the ranks run the same batches in lockstep, rank 0 writes
    the seed's _tp2 files with the exact token counts; performance_maxbs decides every probe from rank 0's
    figures, so the ranks never part ways (a hang would time out)."""
    from dist_worker import torchrun

    model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "model_path": str(qwen_vl_ckpt),
                                                 "data_type": "fp32", "block_size": 16})  # fmt: skip
    perf = write_yaml(tmp_path / "perf.yaml", {"task_type": "performance", "task_name": "synthetic",
                                               "case_pair": [[SPAN + 12, 3]], "batch_size": [2]})  # fmt: skip
    maxbs = write_yaml(tmp_path / "maxbs.yaml", {"task_type": "performance_maxbs", "task_name": "synthetic",
                                                 "case_pair": [[SPAN + 4, 2]], "batch_size": [1, 3],
                                                 "max_non_first_token_time_ms": 1e6})  # fmt: skip
    for task in (perf, maxbs):
        done = torchrun(2, "-m", "modeltest", "--model_config_path", str(model), "--task_config_path", str(task),
                        "--tp", "2", "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--no_progress")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(_files(tmp_path / "out", "performance_pa_batch2_tp2_result.json")[0].read_text())
    [case] = summary["cases"]
    assert summary["tp"] == 2 and case["error"] is None
    assert case["input_tokens"] == [SPAN + 12] * 2 and case["output_tokens"] == [3] * 2
    rows = _csv(_files(tmp_path / "out", "performance_maxbs_pa_tp2_final_result.csv")[0])
    assert rows[1][3] == "3" and rows[1][-1] == "1 3"  # under the limit at 1, then at 3: the answer
    assert len(_csv(_files(tmp_path / "out", "performance_maxbs_pa_tp2_round_result.csv")[0])) == 3

def test_a_failed_case_is_a_row_the_run_goes_on_and_the_files_say_they_are_unfinished(tmp_path):
    """A case that cannot run (out of memory) is its row's error, the next case still runs, the exit code
    follows --max_error_rate; while the run goes, the JSON already written says complete: false."""
    seen = []

    class Watching(Stub):
        def run_timed(self, input_len, *args):
            for path in tmp_path.rglob("*_result.json"):  # what an earlier case left
                seen.append(json.loads(path.read_text())["complete"])
            return super().run_timed(input_len, *args)

    task = _task(case_pair=[[32, 5], [64, 5]], batch_size=[50], warmup_rounds=0)
    result = run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), Watching(memory=40))
    assert result.exit_code == 3  # both cases failed: above the default --max_error_rate 0
    header, *rows = _csv(_files(tmp_path, "performance_pa_batch50_tp1_result.csv")[0])
    assert [r[2] for r in rows] == ["32", "64"] and all(r[4].startswith("error: ") for r in rows)
    assert "out of device memory" in rows[0][4]
    assert seen and not any(seen)  # written after the first case, before the second: unfinished
    assert json.loads(_files(tmp_path, "performance_pa_batch50_tp1_result.json")[0].read_text())["complete"]
    ok = run(_model(), task, RunOptions(output_dir=str(tmp_path / "ok"), progress=False, max_error_rate=1.0),
             Stub(memory=40))  # fmt: skip
    assert ok.exit_code == 0


def test_an_endpoint_runs_the_exact_token_counts_streamed(qwen_vl_ckpt, tmp_path, capsys):
    import subprocess

    from test_openai_backend import _listening

    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", str(qwen_vl_ckpt), "--port", "0", "--device", "cpu",
                             "--dtype", "float32"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = _listening(proc, timeout_s=180)
        task = write_yaml(tmp_path / "task.yaml", {"task_type": "performance", "task_name": "synthetic",
                                                   "case_pair": [[SPAN + 40, 3], [SPAN + 8, 2], [SPAN + 90, 4]],
                                                   "batch_size": [2], "with_image": True, "warmup_rounds": 1})  # fmt: skip
        model = write_yaml(tmp_path / "model.yaml", {"model_name": "tiny", "backend": "openai", "base_url": f"{url}/v1"})
        code = main(["--model_config_path", str(model), "--task_config_path", str(task), "--output_dir",
                     str(tmp_path / "out"), "--no_progress"])  # fmt: skip
        short = write_yaml(tmp_path / "short.yaml", {"task_type": "performance", "task_name": "synthetic",
                                                     "case_pair": [[SPAN, 2]], "with_image": True})  # fmt: skip
        refused = main(["--model_config_path", str(model), "--task_config_path", str(short), "--output_dir",
                        str(tmp_path / "short"), "--no_progress", "--device", "cpu"])  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modeltest")]
    assert code == 3  # the short case failed (--max_error_rate 0)
    [found] = list((tmp_path / "out").glob("results/openai/performance_test/synthetic/*/performance_batch2_result.json"))
    summary = json.loads(found.read_text())
    assert summary["endpoint"] == {"base_url": f"{url}/v1", "served_model": str(qwen_vl_ckpt)}
    assert summary["device"] is None and "streamed chunk" in summary["definitions"]["clock"]
    ran = [c for c in summary["cases"] if c["error"] is None]
    assert [(c["input_len"], c["output_len"]) for c in ran] == [(SPAN + 40, 3), (SPAN + 90, 4)]
    for case in ran:
        assert case["input_tokens"] == [case["input_len"]] * 2 and case["output_tokens"] == [case["output_len"]] * 2
        assert 0 < case["first_token_time_ms"] and case["ttft_ms"]["p99"] <= case["first_token_time_ms"] + 1e-6
        assert case["itl_ms"]["mean"] > 0
    short = summary["cases"][1]
    assert "cannot hold this endpoint's chat template and image" in short["error"]
    assert [line for line in err if "failed" in line] == [
        f"modeltest: performance: batch 2, {SPAN + 8} in / 2 out: failed: {short['error']}",
        "modeltest: 1 of 3 cases failed (more than --max_error_rate 0.0)"]  # fmt: skip
    rows = _csv(found.with_suffix(".csv"))
    assert rows[0] == COLUMNS and rows[2][4] == f"error: {short['error']}"
    # the endpoint's image takes more than its span: Picture 1:, <img>, 256 slots, </img> and a newline
    assert err[-2] == "modeltest: note: --device does not apply on the openai backend: the endpoint runs the model"
    span = int(re.search(r"one image's span of (\d+) tokens", err[-1])[1])
    assert refused == 2 and span > SPAN and not list((tmp_path / "short").rglob("*.csv"))


def test_a_second_run_on_the_same_folder_is_refused_while_one_measures(tmp_path):
    from modeltest.errors import ModelTestError
    from modeltest.parallel import RunLock

    task = _task(case_pair=[[32, 5]], batch_size=[2])
    held = RunLock(tmp_path / "debug/CPU/performance_test/synthetic/fp32/tiny").acquire()
    try:
        with pytest.raises(ModelTestError, match=r"is being written by pid \d+ on .*; wait for that run to end"):
            run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), Stub())
        assert not list(tmp_path.rglob("*.csv"))
    finally:
        held.release()
    assert run(_model(), task, RunOptions(output_dir=str(tmp_path), progress=False), Stub()).exit_code == 0


def test_the_history_plots_performance_runs_and_a_maxbs_run_without_an_answer(tmp_path, capsys):
    db = tmp_path / "runs.db"
    for name, limit in (("found", 10.5), ("none", 0.5)):  # 0.5 ms: even batch 1 is over, no answer
        task = _task(task_type="performance_maxbs", case_pair=[[32, 5]], batch_size=[1, 64],
                     max_non_first_token_time_ms=limit)  # fmt: skip
        run(_model(), task, RunOptions(output_dir=str(tmp_path / name), history=str(db), progress=False), Stub())
    _stub_run(tmp_path / "sizes", 1.0, db)
    plot, page = tmp_path / "p.png", tmp_path / "r.html"
    assert main(["history", "--db", str(db), "--plot", str(plot), "--html", str(page)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and "synthetic_maxbs" in page.read_text()
    listed = capsys.readouterr().out
    assert listed.count("synthetic_maxbs") == 2 and "synthetic_batch4" in listed
    import sqlite3

    scores = sqlite3.connect(db).execute("SELECT score FROM runs WHERE task = 'synthetic_maxbs' ORDER BY id").fetchall()
    assert scores == [(10,), (None,)]
