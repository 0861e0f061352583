"""Protects what a new user reads in --help: `modeltest --help` lists the subcommands main() dispatches,
the accepted --predictions formats and when --tp works; every CLI's help ends with its exit codes; and
the CLIP scorer's usage line names the command as it was typed (console script or python -m)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modeltest import cli, clip_score, compare, history, selftest
from modeltest.errors import EXIT_BAD_INPUT, EXIT_TOO_MANY_ERRORS

REPO = Path(__file__).resolve().parent.parent


def help_of(argv: list[str], capsys, entry=cli.main) -> str:
    with pytest.raises(SystemExit) as done:
        entry(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def section(text: str, title: str) -> str:
    """The lines of an epilog section, up to the next blank line."""
    return text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]


def exit_codes(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^  (\d+) +(.+)$", section(text, "exit codes"), re.M)}


def test_modeltest_help_lists_every_subcommand_main_dispatches(capsys):
    text = help_of(["--help"], capsys)
    listed = re.findall(r"^  modeltest (\w+) +\S", section(text, "commands (each has its own --help)"), re.M)
    dispatched = re.findall(r'argv\[:1\] == \["(\w+)"\]', inspect.getsource(cli.main))
    assert dispatched and sorted(listed) == sorted(dispatched) == ["compare", "history", "selftest"]
    assert "modeltest {selftest,compare,history} ..." in text  # the usage line shows them too
    for command in listed:  # each one answers its own --help
        assert help_of([command, "--help"], capsys).startswith(f"usage: modeltest {command}")


def test_modeltest_help_exit_codes_and_flags(capsys):
    text = help_of(["--help"], capsys)
    codes = exit_codes(text)
    assert sorted(codes) == [0, EXIT_BAD_INPUT, EXIT_TOO_MANY_ERRORS, 130]
    assert "--max_error_rate" in codes[EXIT_TOO_MANY_ERRORS] and "usage" in codes[EXIT_BAD_INPUT]
    flat = " ".join(text.split())  # argparse wraps the help to the terminal's width
    predictions = flat.split("--predictions FILE", 1)[1].split("--save_debug_enable", 1)[0]
    for fmt in ('one {"question_id": .., "answer": ..} per line', "Qwen-VL's evaluate_vqa.py",
                "{question_id: answer} map", "{image file name: caption}", "*_coco_rst.json",
                '{"image_file": [...], "model_answer": [...]}'):  # fmt: skip
        assert fmt in predictions, fmt
    tp = flat.split("--tp TP", 1)[1].split("--dp DP", 1)[0]
    for fact in ("only under torchrun", "engine backend", "must divide the model's attention heads, vocabulary",
                 "'Several processes'"):  # fmt: skip
        assert fact in tp, fact


def test_every_cli_help_shows_its_exit_codes(capsys):
    assert exit_codes(help_of(["compare", "--help"], capsys)).keys() == {0, compare.EXIT_FAIL, EXIT_BAD_INPUT, 130}
    assert exit_codes(help_of(["compare", "--help"], capsys))[compare.EXIT_FAIL].startswith("FAIL")
    assert exit_codes(help_of(["history", "--help"], capsys)).keys() == {0, EXIT_BAD_INPUT, 130}
    codes = exit_codes(help_of(["selftest", "--help"], capsys))
    assert codes.keys() == {0, 1, EXIT_BAD_INPUT, 130} and "selftest: OK" in codes[0]
    text = help_of(["--help"], capsys, entry=clip_score.main)
    codes = exit_codes(text)
    assert codes.keys() == {0, clip_score.EXIT_FAIL, EXIT_BAD_INPUT, 130}
    assert "--reference" in codes[clip_score.EXIT_FAIL] and "--strict" in codes[EXIT_BAD_INPUT]
    assert "--keep" in selftest.build_parser().format_help()


@pytest.mark.parametrize(
    "argv0, prog",
    [
        ("/venv/bin/modeltest-clip-score", "modeltest-clip-score"),
        ("C:/venv/Scripts/modeltest-clip-score.exe", "modeltest-clip-score"),  # Windows' launcher
        (str(REPO / "modeltest" / "clip_score.py"), "python -m modeltest.clip_score"),  # what -m sets
        ("", "python -m modeltest.clip_score"),
    ],
)
def test_clip_score_usage_names_the_command_as_typed(monkeypatch, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert clip_score.build_parser().format_usage().startswith(f"usage: {prog} ")


def test_clip_score_help_from_the_real_entry_points():
    proc = subprocess.run([sys.executable, "-m", "modeltest.clip_score", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m modeltest.clip_score ")
    script = Path(sys.executable).parent / "modeltest-clip-score"
    if not script.exists():
        pytest.skip("the package is not installed here (no console script beside the interpreter)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: modeltest-clip-score ")


def test_history_and_compare_epilogs_leave_their_parsers_working():
    assert compare.build_parser().parse_args(["a", "b"]).runs == ["a", "b"]
    assert history.build_parser().parse_args(["--db", "x.db"]).db == "x.db"
