"""Protects how `bash scripts/mm_run.sh <task> <model> [flags]` lays out a run, without loading a model:
processes per node from the visible devices (Ascend before CUDA, an empty variable as unset) or
NPROC_PER_NODE, the world over NNODES nodes, TP and DP from --tp/--dp (both spellings, passed to modeltest
once) over the TP/DP variables over the defaults (TP = the node, DP = world / TP), the torchrun command
(`$PYTHON -m torch.distributed.run` with the multi-node flags) after a one-process `--check_only`
pre-flight whose failure stops the launch with its exit code, a plain `$PYTHON -m modeltest` for a world
of one, and every bad layout refused with exit 2 and one line on stderr before anything starts.

`PYTHON` points at a fake interpreter (a bash script) that logs each call's argv and a few variables it
saw, and exits with FAKE_RC."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# variables of the layout that a developer's shell may have set: each test starts without them
LAYOUT_VARS = ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "NNODES", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TP", "DP", "WORLD_SIZE", "RANK", "LOCAL_RANK",
               "LOCAL_WORLD_SIZE", "MODELTEST_OUTPUT_DIR", "MODELTEST_CONFIG_DIR", "FAKE_RC")  # fmt: skip
SEEN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONHASHSEED", "HCCL_DETERMINISTIC")

FAKE_PYTHON = f"""#!/usr/bin/env bash
# argv, one arg a line, then '===' and the variables it saw
{{
    printf '%s\\n' "$@"
    printf '==='
    for v in {" ".join(SEEN_VARS)}; do printf ' %s=%s' "$v" "${{!v-unset}}"; done
    echo
}} >> "$FAKE_LOG"
exit "${{FAKE_RC:-0}}"
"""


class Run:
    def __init__(self, root: Path, res: subprocess.CompletedProcess, log: Path):
        self.root, self.res, self.calls, self.seen = root, res, [], []
        lines = log.read_text().splitlines() if log.exists() else []
        argv: list[str] = []
        for line in lines:
            if line.startswith("==="):
                self.calls.append(argv)
                self.seen.append(dict(kv.split("=", 1) for kv in line[3:].split()))
                argv = []
            else:
                argv.append(line)

    def modeltest_args(self, *, task: str = "textvqa", model: str = "qwen_vl", tp: int, dp: int,
                       output_dir: str = "out dir", extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
        """What mm_run.sh should pass after `-m modeltest`."""
        return ["--model_config_path", str(self.root / f"configs/model/{model}.yaml"),
                "--task_config_path", str(self.root / f"configs/task/{task}.yaml"),
                "--tp", str(tp), "--dp", str(dp), "--output_dir", output_dir, *extra]  # fmt: skip


def _mm_run(tmp_path: Path, *args: str, output_dir: str | None = "out dir", **env: str) -> Run:
    """Run a copy of scripts/mm_run.sh + configs/ (from a folder whose path has spaces) with the fake
    interpreter as PYTHON and the layout variables in `env` only."""
    root = tmp_path / "my repo copy"
    fake = tmp_path / "fake bin" / "python"
    if not root.exists():
        shutil.copytree(REPO / "scripts", root / "scripts")
        shutil.copytree(REPO / "configs", root / "configs")
        fake.parent.mkdir()
        fake.write_text(FAKE_PYTHON)
        fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    full = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
    full.update(env, PYTHON=str(fake), FAKE_LOG=str(log))
    if output_dir is not None:
        full["MODELTEST_OUTPUT_DIR"] = output_dir
    res = subprocess.run(["bash", str(root / "scripts/mm_run.sh"), *args], env=full, cwd=root,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return Run(root, res, log)


def _torchrun(nproc: int, nnodes: int = 1, node_rank: int = 0, addr: str = "127.0.0.1", port: int = 20050):
    return ["-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", addr, "--master_port", str(port),
            "-m", "modeltest"]  # fmt: skip


def _assert_launched(run: Run, torchrun: list[str], modeltest: list[str]) -> None:
    """A pre-flight in one process, then torchrun with the same modeltest arguments."""
    assert run.res.returncode == 0, run.res.stderr
    assert run.calls == [["-m", "modeltest", *modeltest, "--check_only"], [*torchrun, *modeltest]]


def test_ascend_devices_win_over_cuda(tmp_path):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", "--limit", "5",
                  ASCEND_RT_VISIBLE_DEVICES="4,5,6,7", CUDA_VISIBLE_DEVICES="0,1")  # fmt: skip
    _assert_launched(run, _torchrun(4), run.modeltest_args(tp=4, dp=1, extra=("--limit", "5")))


def test_cuda_devices_when_ascend_is_empty(tmp_path):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", ASCEND_RT_VISIBLE_DEVICES="", CUDA_VISIBLE_DEVICES="0,1",
                  NPROC_PER_NODE="8")  # fmt: skip
    _assert_launched(run, _torchrun(2), run.modeltest_args(tp=2, dp=1))


def test_nproc_per_node_on_cpu(tmp_path):
    run = _mm_run(tmp_path, "coco_caption", "qwen2_vl_hf", CUDA_VISIBLE_DEVICES="", NPROC_PER_NODE="3")
    _assert_launched(
        run, _torchrun(3), run.modeltest_args(task="coco_caption", model="qwen2_vl_hf", tp=3, dp=1)
    )
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", NPROC_PER_NODE="08")  # decimal, not octal
    _assert_launched(run, _torchrun(8), run.modeltest_args(tp=8, dp=1))


def test_defaults_tp_is_the_node_and_dp_the_nodes(tmp_path):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", CUDA_VISIBLE_DEVICES="0,1,2,3", NNODES="2")
    _assert_launched(run, _torchrun(4, nnodes=2), run.modeltest_args(tp=4, dp=2))


@pytest.mark.parametrize(
    "env, tp, dp",
    [
        ({"TP": "2"}, 2, 2),
        ({"DP": "4"}, 1, 4),
        ({"TP": "1", "DP": "4"}, 1, 4),
        ({"TP": "4", "DP": "1"}, 4, 1),
    ],
)
def test_tp_and_dp_from_the_environment(tmp_path, env, tp, dp):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", CUDA_VISIBLE_DEVICES="0,1,2,3", **env)
    _assert_launched(run, _torchrun(4), run.modeltest_args(tp=tp, dp=dp))


@pytest.mark.parametrize(
    "flags, tp, dp",
    [
        (["--tp", "1", "--dp", "4"], 1, 4),
        (["--tp=1", "--dp=4"], 1, 4),
        (["--dp=2", "--tp", "2"], 2, 2),
        (["--tp", "2"], 2, 2),  # the flag wins over TP; DP is the world / TP
        (["--tp=4", "--tp=2"], 2, 2),  # the last one wins, as in argparse
    ],
)
def test_flags_override_the_environment_and_are_passed_once(tmp_path, flags, tp, dp):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", "--limit", "5", *flags, "--batch_size", "2",
                  CUDA_VISIBLE_DEVICES="0,1,2,3", TP="4")  # fmt: skip
    _assert_launched(
        run, _torchrun(4), run.modeltest_args(tp=tp, dp=dp, extra=("--limit", "5", "--batch_size", "2"))
    )
    for argv in run.calls:
        assert [a for a in argv if a.startswith(("--tp", "--dp"))] == ["--tp", "--dp"]


def test_multi_node_flags_reach_torchrun(tmp_path):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", "--tp", "2", NPROC_PER_NODE="2", NNODES="3", NODE_RANK="1",
                  MASTER_ADDR="10.1.2.3", MASTER_PORT="29500")  # fmt: skip
    _assert_launched(run, _torchrun(2, nnodes=3, node_rank=1, addr="10.1.2.3", port=29500),
                     run.modeltest_args(tp=2, dp=3))  # fmt: skip
    # one process a node; an empty MASTER_PORT is the default
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", NNODES="2", NODE_RANK="1", MASTER_PORT="")
    _assert_launched(run, _torchrun(1, nnodes=2, node_rank=1), run.modeltest_args(tp=1, dp=2))


def test_world_of_one_runs_modeltest_directly(tmp_path):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", "--limit", "2", output_dir=None, FAKE_RC="3",
                  CUDA_VISIBLE_DEVICES="", WORLD_SIZE="4", RANK="2", LOCAL_RANK="2")  # fmt: skip
    assert run.res.returncode == 3  # exec: modeltest's exit code
    (argv,) = run.calls  # no pre-flight, no torchrun
    out = argv[argv.index("--output_dir") + 1]
    assert re.fullmatch(r"output/\d{4}-\d\d-\d\d/modeltest/qwen_vl/precision_result/", out), out
    expected = run.modeltest_args(tp=1, dp=1, output_dir=out, extra=("--limit", "2"))
    assert argv == ["-m", "modeltest", *expected]
    # inherited torchrun variables are cleared; the determinism switches are exported
    assert run.seen == [{"WORLD_SIZE": "unset", "RANK": "unset", "LOCAL_RANK": "unset", "PYTHONHASHSEED": "0",
                         "HCCL_DETERMINISTIC": "true"}]  # fmt: skip
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", "--tp=1", DP="1", CUDA_VISIBLE_DEVICES="3")
    assert run.res.returncode == 0 and run.calls == [["-m", "modeltest", *run.modeltest_args(tp=1, dp=1)]]


@pytest.mark.parametrize("rc", [2, 1])
def test_failing_preflight_stops_the_launch(tmp_path, rc):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", CUDA_VISIBLE_DEVICES="0,1", FAKE_RC=str(rc))
    assert run.res.returncode == rc
    assert run.calls == [["-m", "modeltest", *run.modeltest_args(tp=2, dp=1), "--check_only"]]
    assert run.seen[0]["WORLD_SIZE"] == "unset"  # the pre-flight is one process


FOUR = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ["--tp", "3"],
            FOUR,
            "TP 3 (from --tp) does not divide the world of 4 = 4 visible devices in "
            "CUDA_VISIBLE_DEVICES x 1 node",
        ),
        (
            [],
            {**FOUR, "DP": "3"},
            "DP 3 (from DP) does not divide the world of 4 = 4 visible devices in "
            "CUDA_VISIBLE_DEVICES x 1 node",
        ),
        (
            [],
            {"NPROC_PER_NODE": "3", "NNODES": "2", "TP": "4"},
            "TP 4 (from TP) does not divide the world of 6 = NPROC_PER_NODE=3 x 2 nodes in NNODES",
        ),
        (
            [],
            {**FOUR, "TP": "2", "DP": "3"},
            "TP 2 (from TP) x DP 3 (from DP) = 6, but the world is 4 = 4 "
            "visible devices in CUDA_VISIBLE_DEVICES x 1 node",
        ),
        (
            ["--tp=2", "--dp=1"],
            {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"},
            "TP 2 (from --tp) x DP 1 (from --dp) = "
            "2, but the world is 4 = 4 visible devices in ASCEND_RT_VISIBLE_DEVICES x 1 node",
        ),
        (
            ["--tp", "2"],
            {},
            "TP 2 (from --tp) does not divide the world of 1 = 1 process per node: no visible "
            "devices, no NPROC_PER_NODE x 1 node",
        ),
        ([], {**FOUR, "TP": "two"}, "TP must be a positive integer, got 'two' (from TP)"),
        (["--dp=1.5"], FOUR, "DP must be a positive integer, got '1.5' (from --dp)"),
        (["--tp="], FOUR, "TP must be a positive integer, got '' (from --tp)"),
        (["--tp", "0"], FOUR, "TP must be a positive integer, got '0' (from --tp)"),
        ([], {**FOUR, "DP": "-1"}, "DP must be a positive integer, got '-1' (from DP)"),
        (["--limit", "5", "--tp"], FOUR, "--tp needs a value"),
        ([], {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer, got '0'"),
        ([], {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a positive integer, got 'two'"),
        ([], {"NNODES": "0"}, "NNODES must be a positive integer, got '0'"),
        ([], {"NNODES": "2x"}, "NNODES must be a positive integer, got '2x'"),
        ([], {"NNODES": "2", "NODE_RANK": "-1"}, "NODE_RANK must be a non-negative integer, got '-1'"),
        ([], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK 2 must be below NNODES 2 (ranks count from 0)"),
        ([], {"NODE_RANK": "1"}, "NODE_RANK 1 must be below NNODES 1 (ranks count from 0)"),
        ([], {**FOUR, "MASTER_PORT": "port"}, "MASTER_PORT must be a positive integer, got 'port'"),
        ([], {**FOUR, "MASTER_PORT": "70000"}, "MASTER_PORT must be at most 65535, got 70000"),
        ([], {"CUDA_VISIBLE_DEVICES": ","}, "CUDA_VISIBLE_DEVICES=',' lists no device"),
    ],
)
def test_bad_layouts_exit_2_with_one_line_before_anything_starts(tmp_path, args, env, message):
    run = _mm_run(tmp_path, "textvqa", "qwen_vl", *args, **env)
    assert run.res.returncode == 2
    assert run.res.stderr.splitlines() == [f"mm_run.sh: {message}"]
    assert run.calls == []  # the fake interpreter was never called
