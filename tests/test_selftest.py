"""Protects `modeltest selftest` for a new user: it runs on a plain install (no scikit-image: its photos
are matplotlib's sample photos), a temporary work folder (~150 MB) is removed at the end whether the
selftest passed, failed or raised, and says so; --dir and --keep keep it; a missing sample photo is one
error line, exit 2."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from modeltest import selftest
from modeltest.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """tempfile's folder, here: what a run leaves behind in it is visible to the test."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def no_skimage(monkeypatch):
    """scikit-image as on a plain `pip install modeltest` (only the test extra installs it)."""
    for name in [m for m in sys.modules if m == "skimage" or m.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skimage", None)  # None in sys.modules: `import skimage` raises ImportError
    with pytest.raises(ImportError):
        import skimage  # noqa: F401


def test_runs_without_scikit_image_and_removes_its_temporary_folder(temp_root, no_skimage, capsys):
    assert selftest.main(["--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "selftest: OK" in out and "2 samples, 0 failed" in out
    (removed,) = [line for line in out.splitlines() if line.startswith("selftest: removed the work folder")]
    assert str(temp_root) in removed and " MB" in removed
    size_mb = float(removed.split("(")[1].split(" MB")[0])
    assert size_mb > 50  # the tiny model alone is ~150 MB: what used to be left behind on every run
    assert list(temp_root.iterdir()) == []


def fake_pipeline(monkeypatch, error: str | None = None):
    """The selftest's own steps with the model write and the run faked (seconds, not a 150 MB model): the
    run writes a per-sample log with `error` on its one sample."""
    import engine
    import modeltest.runner as runner
    from modeltest.output import RunPaths

    monkeypatch.setattr(engine, "write_random_checkpoint", lambda path, *a, **k: Path(path).mkdir(parents=True))

    def run(model_cfg, task_cfg, opts, backend=None):
        out = Path(opts.output_dir)
        paths = RunPaths(out / "result.csv", out / "result.json", out / "debug")
        paths.debug_dir.mkdir(parents=True)
        paths.samples.write_text(json.dumps({"id": 1, "error": error}) + "\n", encoding="utf-8")
        return SimpleNamespace(total=1, errors=int(error is not None), value=0.0, paths=paths)

    monkeypatch.setattr(runner, "run", run)


def test_a_failed_selftest_removes_its_folder_and_shows_the_first_error(temp_root, monkeypatch, capsys):
    fake_pipeline(monkeypatch, error="RuntimeError: the engine broke\nsecond line")
    assert selftest.main(["--samples", "1"]) == 1
    out = capsys.readouterr().out
    assert "selftest: FAILED: 1 sample(s) failed; first: RuntimeError: the engine broke" in out
    assert "second line" not in out and "selftest: removed the work folder" in out
    assert list(temp_root.iterdir()) == []


def test_a_selftest_that_raises_removes_its_folder(temp_root, monkeypatch, capsys):
    import engine

    def broken(path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "write_random_checkpoint", broken)
    assert cli_main(["selftest", "--samples", "1"]) == 130
    assert "selftest: removed the work folder" in capsys.readouterr().out
    assert list(temp_root.iterdir()) == []


def test_keep_and_dir_keep_the_folder(tmp_path, temp_root, monkeypatch, capsys):
    fake_pipeline(monkeypatch)
    assert selftest.main(["--samples", "2", "--keep"]) == 0
    out = capsys.readouterr().out
    (kept,) = temp_root.iterdir()
    assert "(temporary, kept: --keep)" in out and "removed" not in out
    assert f"dataset                  {kept / 'textvqa' / 'textvqa_val.jsonl'}" in out
    images = sorted(p.name for p in (kept / "textvqa" / "train_images").iterdir())
    assert images == sorted(selftest.PHOTOS)  # the real photos, copied as matplotlib ships them

    work = tmp_path / "work"
    assert selftest.main(["--samples", "1", "--dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "removed" not in out and (work / "textvqa" / "textvqa_val.jsonl").is_file()
    assert "selftest: FAILED" not in out and "selftest: OK" in out


def test_missing_sample_photos_are_one_error_line(temp_root, monkeypatch, capsys):
    monkeypatch.setattr(selftest, "PHOTOS", ("grace_hopper.jpg", "no_such_photo.png"))
    assert cli_main(["selftest", "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("modeltest: error: ") and "no_such_photo.png" in err
    assert "pip install --force-reinstall matplotlib" in err
    assert list(temp_root.iterdir()) == []  # nothing written before it, nothing left behind


def test_bad_samples_is_one_error_line(temp_root, capsys):
    assert cli_main(["selftest", "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert list(temp_root.iterdir()) == []
