"""Protects the harness across processes (torchrun on CPU, gloo, 2 processes; each run bounded in time):

- `--dp 2` and `--tp 2` give a single process's samples.jsonl records, CSV and summary value, under
  greedy fp32 on the tiny Qwen-VL through the engine backend; no shard file is left behind; the hf
  backend with `--dp 2` (a copy of the model per process) too;
- resume across world sizes: samples finished under dp 2 are not redone by a dp 1 run;
- SIGKILL of one rank: torchrun stops the other within a bounded time naming the dead rank, and the
  same command run again finishes with the uninterrupted run's results;
- two runs on one output folder: the second is refused, naming the holder of the lock; a resumed
  torchrun run says what it reuses once (rank 0);
- --tp / --dp that do not match the processes, and tensor parallel on the hf backend, are refused.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from modeltest.cli import main
from modeltest.parallel import RunLock

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa  # noqa: E402
from dist_worker import torchrun  # noqa: E402

SAMPLES = 12


def _task_yaml(path: Path, data: Path) -> Path:
    """The TextVQA task config both backends' runs here use."""
    path.write_text(yaml.safe_dump({
        "task_type": "precision", "task_name": "textvqa", "local_dataset_path": str(data),
        "metric": {"metric_type": "vqa_accuracy", "normalizer": "evalai"},
        "subject_mapping": {"textvqa": {"name": "textvqa"}},
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def setup(qwen_vl_ckpt, photo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    data = make_textvqa(root / "textvqa", photo_dir, n=SAMPLES)
    model = root / "tiny.yaml"
    model.write_text(yaml.safe_dump({
        "model_name": "tiny_qwen_vl", "model_path": str(qwen_vl_ckpt), "data_type": "fp32", "backend": "engine",
        "block_size": 16, "mm_model": {"infer_params": {"max_batch_size": 1, "max_output_length": 12}},
    }))  # fmt: skip
    task = _task_yaml(root / "textvqa.yaml", data)
    return root, ["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu",
                  "--no_progress"]  # fmt: skip


def run_cli(args: list[str], out: Path) -> int:
    return main([*args, "--output_dir", str(out)])


def run_torchrun(args: list[str], out: Path, *extra: str, wait: bool = True, env: dict | None = None):
    return torchrun(2, "-m", "modeltest", *args, "--output_dir", str(out), *extra, wait=wait, env=env)


def records(out: Path) -> dict:
    (path,) = out.glob("debug/**/samples.jsonl")
    keep = ("prediction", "raw_output", "score", "error", "input_tokens", "output_tokens")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == len({r["id"] for r in lines}), "a sample was written twice"
    return {r["id"]: {k: r[k] for k in keep} for r in lines}


def results(out: Path) -> tuple[list, float]:
    (path,) = out.glob("results/**/*_result.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows, json.loads(path.with_suffix(".json").read_text())["value"]


@pytest.fixture(scope="module")
def single(setup):
    root, args = setup
    assert run_cli(args, root / "single") == 0
    return records(root / "single"), results(root / "single")


@pytest.mark.parametrize("layout", [["--dp", "2"], ["--tp", "2"]], ids=["dp2", "tp2"])
def test_two_processes_write_what_one_writes(setup, single, layout):
    root, args = setup
    out = root / f"two-{layout[0][2:]}"
    done = run_torchrun(args, out, *layout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(out) == single[0]
    assert results(out) == single[1]
    (debug,) = out.glob("debug/**/samples.jsonl")
    assert not list(debug.parent.glob("samples.rank*.jsonl"))  # the shards were merged and removed
    summary = json.loads(next(out.glob("results/**/*_result.json")).read_text())
    assert (summary["tp"], summary["dp"]) == ((1, 2) if layout[0] == "--dp" else (2, 1))


def test_hf_backend_runs_a_copy_per_process(setup, tiny_qwen2vl, textvqa, tmp_path):
    root, _ = setup
    model = tmp_path / "hf.yaml"
    model.write_text(yaml.safe_dump({"model_name": "tiny_qwen2_vl", "model_path": str(tiny_qwen2vl),
                                     "data_type": "fp32", "backend": "hf",
                                     "mm_model": {"infer_params": {"max_output_length": 6}}}))  # fmt: skip
    task = _task_yaml(tmp_path / "task.yaml", textvqa)
    args = ["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu", "--no_progress"]
    assert run_cli(args, tmp_path / "one") == 0
    done = run_torchrun(args, tmp_path / "two", "--dp", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(tmp_path / "two") == records(tmp_path / "one")
    assert results(tmp_path / "two") == results(tmp_path / "one")


def test_resume_across_world_sizes_and_after_a_killed_rank(setup, single):
    root, args = setup
    out = root / "killed"
    proc = run_torchrun(args, out, "--dp", "2", wait=False, env={"MODELTEST_TEST_TAG": str(out)})
    shard = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob("debug/**/samples.rank1.jsonl"))
        if found and found[0].read_text().count("\n") >= 1:
            shard = found[0]
            break
        time.sleep(0.05)
    assert shard is not None, "rank 1 never wrote a sample"
    os.kill(_rank_pid(1, str(out)), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30  # the other rank did not hang
    assert proc.returncode != 0 and "rank      : 1" in stderr and "Signal 9" in stderr
    assert "modeltest (rank 0): stopped by torchrun (another process failed" in stderr
    partial = records_without_check(out)
    assert 1 <= len(partial) < SAMPLES  # some of each share were finished, not all
    first = 34602 + SAMPLES // 2  # the ids of group 1's share: the second half
    assert _ids(shard) and all(i >= first for i in _ids(shard))
    main_file = shard.with_name("samples.jsonl")
    assert all(i < first for i in (_ids(main_file) if main_file.exists() else []))

    assert run_cli(args, out) == 0  # dp 1 now: the shard is folded in, only the rest is computed
    assert records(out) == single[0] and results(out) == single[1]
    assert not list(shard.parent.glob("samples.rank*.jsonl"))
    summary = json.loads(next(out.glob("results/**/*_result.json")).read_text())
    assert summary["timings"]["resumed_samples"] == len(partial)


def records_without_check(out: Path) -> dict:
    """Every record on disk: samples.jsonl and the shards (a killed run leaves both)."""
    found = {}
    for path in out.glob("debug/**/samples*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line torn by the kill
                continue
            found[rec["id"]] = rec
    return found


def _ids(path: Path) -> list[int]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["id"])
        except ValueError:  # a line torn by the kill
            pass
    return out


def _rank_pid(rank: int, tag: str) -> int:
    """The process torchrun started as `rank` for the run tagged `tag`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("MODELTEST_TEST_TAG") == tag and env.get("RANK") == str(rank):
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank}")


def test_a_second_run_on_the_same_folder_is_refused(setup, single, capsys):
    root, args = setup
    out = root / "locked"
    assert run_cli([*args, "--limit", "2"], out) == 0
    (debug,) = out.glob("debug/**/samples.jsonl")
    capsys.readouterr()
    lock = RunLock(debug.parent).acquire()  # as if another job were writing the folder
    try:
        assert run_cli([*args, "--limit", "4"], out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is being written by pid {os.getpid()} on " in err
        assert run_cli([*args, "--limit", "4", "--check_only"], out) == 2  # the pre-flight sees it too
    finally:
        lock.release()
    before = {p: p.read_bytes() for p in debug.parent.iterdir()}
    with open(debug, "a") as f:
        f.write('{"id": 34605, "pred')  # a torn last line: a run would cut it off, a check leaves it
    before[debug] += b'{"id": 34605, "pred'
    assert run_cli([*args, "--limit", "4", "--check_only"], out) == 0
    assert {p: p.read_bytes() for p in debug.parent.iterdir()} == before  # the check changed nothing
    done = run_torchrun([*args, "--limit", "4"], out, "--dp", "2")  # resumed under torchrun: rank 0 says so, once
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "resuming" in line]
    assert said == [f"modeltest: resuming: 2 of 4 samples already done in {debug}; 2 to go"], done.stderr[-3000:]


def test_layouts_that_do_not_match_are_refused(setup, monkeypatch, capsys):
    root, args = setup
    assert run_cli([*args, "--dp", "2"], root / "bad") == 2
    assert "--dp 2 does not fit one process (no torchrun): tp x dp must equal" in capsys.readouterr().err
    assert run_cli([*args, "--tp", "2", "--dp", "2", "--check_only"], root / "bad") == 0  # the pre-flight: planned
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; --check_only joins no process group
    assert run_cli([*args, "--tp", "2", "--backend", "hf", "--check_only"], root / "bad") == 2
    assert "the hf backend does not run tensor parallel (--tp 2): use --backend engine, or --dp 2" in capsys.readouterr().err
    assert run_cli([*args, "--tp", "3", "--check_only"], root / "bad") == 2
    assert "--tp 3 does not fit the 2 processes torchrun started" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert run_cli([*args, "--tp", "8", "--check_only"], root / "bad") == 2  # 4 heads: 8 does not divide them
    assert "tensor_parallel_size=8 does not divide num_attention_heads 4" in capsys.readouterr().err
    assert run_cli([*args, "--tp", "4", "--dp", "2", "--check_only"], root / "bad") == 0
    assert not (root / "bad").exists()  # the checks wrote nothing
