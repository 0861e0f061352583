"""Protects the project's rule for bad input, one test per family of bad input found by the campaign:
files that are not UTF-8, JSON of the wrong shape, ambiguous ids in score-only mode, clip_score's output
folder, unreadable resume state, file permissions under the umask, images whose pixels a plain
convert("RGB") would destroy, and YAML that expands without bound.

Each bad input must end in exit code 2 with exactly one line on stderr that names the file (and the
line, entry or key where there is one), no traceback, and before any expensive work; a per-sample
problem (an image) is recorded for that sample and the run goes on."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modeltest.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_yaml  # noqa: E402

LATIN1 = "caf\xe9".encode("latin-1")  # b"caf\xe9": valid Latin-1, invalid UTF-8


def one_line_error(capsys, *needles: str, prog: str = "modeltest") -> str:
    """stderr is exactly one `<prog>: error: ...` line containing every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def score_only(task_yaml: Path, predictions: Path, out: Path, *extra: str) -> int:
    return main(["--task_config_path", str(task_yaml), "--predictions", str(predictions), "--output_dir", str(out),
                 "--no_progress", *extra])  # fmt: skip


def good_predictions(tmp_path: Path) -> Path:
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"question_id": 34602 + i, "answer": "dakota"}) + "\n" for i in range(8)))
    return path


def coco_yaml(tmp_path: Path, photo_dir: Path, **keys) -> Path:
    return write_yaml(tmp_path / "cfg" / "coco.yaml", {"task_name": "coco_caption",
                                                       "local_dataset_path": str(photo_dir), **keys})  # fmt: skip


def coco_annotations(path: Path, **replaced) -> Path:
    """COCO caption annotations for coffee.png, with `replaced` top-level keys."""
    data = {"images": [{"id": 1, "file_name": "coffee.png"}], "annotations": [{"image_id": 1, "caption": "a cup"}]}
    path.write_text(json.dumps({**data, **replaced}))
    return path


# ---------------------------------------------------------------- 1. not UTF-8


def _insert_latin1(path: Path, line: int) -> None:
    """Put a Latin-1 byte inside a string on `line` (1-based) of a text file, keeping it otherwise valid."""
    lines = path.read_bytes().split(b"\n")
    target = lines[line - 1]
    quote = target.find(b'"', target.find(b'"') + 1)  # the end of the first string on the line
    lines[line - 1] = target[:quote] + b"\xe9" + target[quote:] if quote > 0 else target + b" # \xe9"
    path.write_bytes(b"\n".join(lines))


def _task_yaml_case(tmp_path, task_yaml, photo_dir):
    _insert_latin1(task_yaml, 2)
    return "cli", ["--task_config_path", str(task_yaml), "--predictions", str(good_predictions(tmp_path))], task_yaml, 2


def _model_yaml_case(tmp_path, task_yaml, photo_dir):
    model = tmp_path / "m.yaml"
    model.write_bytes(b"model_name: m\nmodel_path: /models/" + LATIN1 + b"\nbackend: hf\n")
    return "cli", ["--task_config_path", str(task_yaml), "--model_config_path", str(model)], model, 2


def _dataset_case(tmp_path, task_yaml, photo_dir):
    dataset = tmp_path / "textvqa" / "textvqa_val.jsonl"
    _insert_latin1(dataset, 3)
    return "cli", ["--task_config_path", str(task_yaml), "--predictions", str(good_predictions(tmp_path))], dataset, 3


def _annotations_case(tmp_path, task_yaml, photo_dir):
    ann = tmp_path / "textvqa" / "textvqa_val_annotations.json"
    ann.write_bytes(ann.read_bytes().replace(b'"dakota"', b'"dakota\xe9"', 1))
    return "cli", ["--task_config_path", str(task_yaml), "--predictions", str(good_predictions(tmp_path))], ann, 1


def _predictions_case(tmp_path, task_yaml, photo_dir):
    preds = good_predictions(tmp_path)  # the bad byte within the first 4 KB, where the format is sniffed
    _insert_latin1(preds, 2)
    return "cli", ["--task_config_path", str(task_yaml), "--predictions", str(preds)], preds, 2


def _image_list_case(tmp_path, task_yaml, photo_dir):
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"coffee.png\n# caf\xe9 pictures\nrocket.png\n")
    cfg = coco_yaml(tmp_path, photo_dir, image_list=str(listing))
    return "cli", ["--task_config_path", str(cfg), "--predictions", str(tmp_path / "unused.json")], listing, 2


def _coco_annotations_case(tmp_path, task_yaml, photo_dir):
    ann = coco_annotations(tmp_path / "captions.json")
    ann.write_bytes(ann.read_bytes().replace(b"a cup", b"a caf\xe9 cup"))
    cfg = coco_yaml(tmp_path, photo_dir, annotations_path=str(ann))
    return "cli", ["--task_config_path", str(cfg), "--predictions", str(tmp_path / "unused.json")], ann, 1


def _captions_case(tmp_path, task_yaml, photo_dir):
    caps = tmp_path / "caps.json"
    caps.write_bytes(b'{\n  "coffee.png": "a ' + LATIN1 + b'"\n}\n')
    return "clip", ["--image_info", str(caps), "--dataset_path", str(photo_dir)], caps, 2


def _reference_case(tmp_path, task_yaml, photo_dir):
    caps = tmp_path / "caps.json"
    caps.write_text('{"coffee.png": "a cup"}')
    ref = tmp_path / "ref.json"
    ref.write_bytes(b"\xff\xfe" + '{"coffee.png": "a cup"}'.encode("utf-16-le"))  # PowerShell's `>`
    return "clip", ["--image_info", str(caps), "--dataset_path", str(photo_dir), "--reference", str(ref)], ref, 1


@pytest.mark.parametrize("case", [_task_yaml_case, _model_yaml_case, _dataset_case, _annotations_case,
                                  _predictions_case, _image_list_case, _coco_annotations_case, _captions_case,
                                  _reference_case], ids=lambda c: c.__name__.strip("_").removesuffix("_case"))  # fmt: skip
def test_files_that_are_not_utf8(tmp_path, task_yaml, photo_dir, capsys, case):
    tool, argv, bad, line = case(tmp_path, task_yaml, photo_dir)
    if tool == "cli":
        code = main([*argv, "--output_dir", str(tmp_path / "out")])
    else:
        from modeltest.clip_score import main as clip_main

        code = clip_main([*argv, "--model_weights_path", str(tmp_path / "w.bin"), "--device", "cpu"])
    assert code == 2
    one_line_error(capsys, f"{bad}:{line}: not UTF-8 text", prog="modeltest" if tool == "cli" else "clip_score")
    assert not (tmp_path / "out").exists()  # found before anything was written


# ---------------------------------------------------------------- 2. JSON of the wrong shape


def _rewrite_jsonl(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _row(**changes) -> str:
    return json.dumps({"image": "train_images/astronaut.jpg", "question": "q?", "question_id": 34604, **changes})


SHAPES = {
    # name: (how the textvqa data folder is spoiled, the file that must be named, what else the line says)
    "annotations-null": (lambda d: (d / "textvqa_val_annotations.json").write_text("null"),
                         "textvqa_val_annotations.json", "got null"),
    "annotations-number": (lambda d: (d / "textvqa_val_annotations.json").write_text("12"),
                           "textvqa_val_annotations.json", "got an integer"),
    "annotations-entry-text": (lambda d: (d / "textvqa_val_annotations.json").write_text('{"annotations": ["x"]}'),
                               "textvqa_val_annotations.json: annotations[0]", "got \"x\" (text)"),
    "annotations-entry-null": (lambda d: (d / "textvqa_val_annotations.json").write_text('{"annotations": [null]}'),
                               "textvqa_val_annotations.json: annotations[0]", "got null"),
    "annotations-list-id": (lambda d: (d / "textvqa_val_annotations.json").write_text(
        '{"annotations": [{"question_id": [1], "answers": ["a"]}]}'),
        "textvqa_val_annotations.json: annotations[0]", "question_id must be an integer or text, got [1]"),
    "annotations-answer-number": (lambda d: (d / "textvqa_val_annotations.json").write_text(
        '{"annotations": [{"question_id": 1, "answers": [{"answer": 7}]}]}'),
        "textvqa_val_annotations.json: annotations[0]", "each answer must be text"),
    "annotations-deep": (lambda d: (d / "textvqa_val_annotations.json").write_text("[" * 100_000),
                         "textvqa_val_annotations.json", "nested too deeply"),
    "line-number": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, "5"), "textvqa_val.jsonl:3",
                    "expected a JSON object"),
    "line-string": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, '"row"'), "textvqa_val.jsonl:3",
                    "expected a JSON object"),
    "id-dict": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question_id={"n": 1})),
                "textvqa_val.jsonl:3", "question_id must be an integer or text"),
    "id-list": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question_id=[34604])),
                "textvqa_val.jsonl:3", "question_id must be an integer or text"),
    "id-bool": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question_id=True)),
                "textvqa_val.jsonl:3", "got true"),
    "id-float": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question_id=34604.0)),
                 "textvqa_val.jsonl:3", "got 34604.0 (a number)"),
    "id-int-and-text": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question_id="34602")),
                        "textvqa_val.jsonl", "question_id 34602 appears twice: as 34602 and as '34602'"),
    "image-number": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(image=7)),
                     "textvqa_val.jsonl:3", "'image' must be non-empty text"),
    "question-list": (lambda d: _rewrite_jsonl(d / "textvqa_val.jsonl", 3, _row(question=["q"])),
                      "textvqa_val.jsonl:3", "'question' must be non-empty text"),
}  # fmt: skip

PREDICTION_SHAPES = {
    "list-null-entry": ("p.json", "[null]", "p.json: entry 0", "got null"),
    "list-number-entry": ("p.json", "[3]", "p.json: entry 0", "got 3"),
    "top-null": ("p.json", "null", 'p.json:1: expected {"question_id": .., "answer": ..}', "got null"),
    "top-string": ("p.json", '"answers"', "p.json:1: expected", "got \"answers\" (text)"),
    "id-list": ("p.jsonl", '{"question_id": [34602], "answer": "a"}\n', "p.jsonl: record 1 at line 1",
                "question_id must be an integer or text, got [34602] (a list)"),
    "id-dict": ("p.jsonl", '{"question_id": 34602, "answer": "a"}\n{"question_id": {"id": 1}, "answer": "a"}\n',
                "p.jsonl: record 2 at line 2", "question_id must be an integer or text"),
    "id-float": ("p.json", '[{"question_id": 34602.0, "answer": "a"}]', "p.json: entry 0", "got 34602.0"),
    "answer-number": ("p.jsonl", '{"question_id": 34602, "answer": 3}\n', "p.jsonl: record 1 at line 1",
                      "'answer' must be text, got 3"),
}  # fmt: skip

OTHER_SHAPES = {
    # the coco_caption annotations file: ids that cannot be ids, names that are not text
    "coco-list-id": ("images", [{"id": [1], "file_name": "coffee.png"}], "captions.json: images[0]",
                     "id must be an integer or text"),
    "coco-file-name-number": ("images", [{"id": 1, "file_name": 5}], "captions.json: images[0]",
                              "'file_name' must be non-empty text"),
    "coco-dict-image-id": ("annotations", [{"image_id": {"id": 1}, "caption": "a cup"}],
                           "captions.json: annotations[0]", "image_id must be an integer or text"),
    "coco-images-null": ("images", None, "captions.json", "'images' must be a list"),
}  # fmt: skip

CAPTION_SHAPES = {
    "caption-object": ('{"coffee.png": {"text": "a cup"}}', "caps.json", "caption for 'coffee.png' must be text"),
    "caption-list": ('{"coffee.png": ["a cup"]}', "caps.json", "caption for 'coffee.png' must be text"),
    "old-format-list-image": ('{"image_file": [["coffee.png"]], "model_answer": ["a cup"]}', "caps.json: entry 0",
                              "the image must be a non-empty file name"),
    "top-list": ('["coffee.png"]', "caps.json", "expected a JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("name", [*SHAPES, *(f"predictions-{k}" for k in PREDICTION_SHAPES), *OTHER_SHAPES,
                                  *(f"clip-{k}" for k in CAPTION_SHAPES)])  # fmt: skip
def test_json_of_the_wrong_shape(tmp_path, task_yaml, photo_dir, capsys, name):
    if name in SHAPES:
        spoil, file, says = SHAPES[name]
        spoil(tmp_path / "textvqa")
        code = score_only(task_yaml, good_predictions(tmp_path), tmp_path / "out")
    elif name.startswith("predictions-"):
        fname, text, file, says = PREDICTION_SHAPES[name.removeprefix("predictions-")]
        (tmp_path / fname).write_text(text)
        code = score_only(task_yaml, tmp_path / fname, tmp_path / "out")
    elif name in OTHER_SHAPES:
        key, value, file, says = OTHER_SHAPES[name]
        ann = coco_annotations(tmp_path / "captions.json", **{key: value})
        cfg = coco_yaml(tmp_path, photo_dir, annotations_path=str(ann))
        code = score_only(cfg, tmp_path / "unused.json", tmp_path / "out")
    else:
        from modeltest.clip_score import main as clip_main

        text, file, says = CAPTION_SHAPES[name.removeprefix("clip-")]
        (tmp_path / "caps.json").write_text(text)
        code = clip_main(["--image_info", str(tmp_path / "caps.json"), "--dataset_path", str(photo_dir),
                          "--model_weights_path", str(tmp_path / "w.bin")])  # fmt: skip
        assert code == 2
        one_line_error(capsys, file, says, prog="clip_score")
        return
    assert code == 2
    one_line_error(capsys, file, says)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. score-only mode: ids and messages


ID_CASES = {
    # name: (file name, text, what the line must say, what it must not say)
    "int-then-text-jsonl": ("p.jsonl", '{"question_id": 34602, "answer": "a"}\n{"question_id": "34602", "answer": "b"}\n',
                            ["p.jsonl: record 2 at line 2", "question_id 34602 appears twice: as 34602",
                             "and as '34602'"], []),
    "text-then-int-list": ("p.json", '[{"question_id": "34602", "answer": "a"}, {"question_id": 34602, "answer": "b"}]',
                           ["p.json: entry 1", "question_id 34602 appears twice: as '34602'", "and as 34602"], []),
    "same-id-twice": ("p.jsonl", '{"question_id": 34602, "answer": "a"}\n{"question_id": 34602, "answer": "b"}\n',
                      ["p.jsonl: record 2 at line 2", "question_id 34602 appears more than once"], []),
    # a one-line JSONL file with a misspelt key is a predictions record, not a caption map
    "misspelt-key": ("p.jsonl", '{"questionid": 34602, "answer": "a"}\n',
                     ["p.jsonl: record 1", "'question_id' missing"], ["caption"]),
    "answer-map-number": ("p.json", '{"34602": "a", "34603": 5}',
                          ["p.json", "answer for question_id '34603' must be text, got 5"], ["caption"]),
    "answer-map-key-twice": ("p.json", '{\n  "34602": "a",\n  "34602": "b"\n}\n',
                             ["p.json:3", "key '34602' appears twice"], ["caption"]),
    "broken-object": ("p.json", '{\n  "question_id": 34602,\n  "answer": "a",,\n}\n',
                      ["p.json:3: not valid JSON"], ["caption"]),
    "empty-map": ("p.json", "{}", ["p.json: no predictions"], ["caption"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ID_CASES))
def test_score_only_ids_and_messages(tmp_path, task_yaml, capsys, name):
    fname, text, says, never = ID_CASES[name]
    (tmp_path / fname).write_text(text)
    assert score_only(task_yaml, tmp_path / fname, tmp_path / "out") == 2
    line = one_line_error(capsys, *says)
    for word in never:
        assert word not in line.lower()
    assert not (tmp_path / "out").exists()


def test_caption_map_key_twice_is_an_error(tmp_path, photo_dir, capsys):
    """The same image twice in a caption file: JSON keeps the last caption silently; refuse it."""
    caps = tmp_path / "caps.json"
    caps.write_text('{\n  "coffee.png": "a cup",\n  "rocket.png": "a rocket",\n  "coffee.png": "a mug"\n}\n')
    cfg = coco_yaml(tmp_path, photo_dir)
    assert score_only(cfg, caps, tmp_path / "out") == 2
    one_line_error(capsys, "caps.json:4: key 'coffee.png' appears twice")


# ---------------------------------------------------------------- 4. clip_score's output folder


class FakeScorer:
    """Stands in for the CLIP model: counts how often scoring starts, answers a fixed cosine."""

    made = 0

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        self.num_workers = 1

    def score(self, images, texts, batch_size, progress=True):
        from modeltest.metrics.clip import ScoreResult

        return ScoreResult(np.full((len(texts), len(images)), 0.25), {})


@pytest.fixture
def fake_clip(monkeypatch, tmp_path):
    """clip_score with FakeScorer; returns the arguments of a run on two real photos."""
    import modeltest.metrics.clip as clip

    FakeScorer.made = 0
    monkeypatch.setattr(clip, "ClipScorer", FakeScorer)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not read by the fake scorer")
    caps = tmp_path / "caps" / "caps.json"
    caps.parent.mkdir()
    caps.write_text('{"coffee.png": "a cup", "rocket.png": "a rocket"}')
    return caps, ["--image_info", str(caps), "--model_weights_path", str(weights), "--device", "cpu", "--no_progress"]


def _deny(monkeypatch, folder: Path, error: int, call: str) -> None:
    """Make `os.<call>` fail with `error` for files in `folder`: a read-only folder (EACCES, even for
    root) or a full disk (ENOSPC) there, the rest of the machine untouched."""
    real = getattr(os, call)
    folder = os.path.realpath(folder)

    def in_folder(target) -> bool:
        name = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else os.path.realpath(target)
        return os.path.dirname(name) == folder

    def fake(target, *args, **kwargs):
        if in_folder(target):
            raise OSError(error, os.strerror(error), None if isinstance(target, int) else target)
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, call, fake)


@pytest.mark.parametrize("problem", ["file", "under-a-file", "read-only", "read-only-chmod", "full-disk",
                                     "output-is-a-folder", "default-read-only"])  # fmt: skip
def test_clip_score_output_problems_are_found_before_scoring(tmp_path, photo_dir, fake_clip, monkeypatch, capsys,
                                                             problem):  # fmt: skip
    from modeltest.clip_score import main as clip_main

    caps, argv = fake_clip
    out = tmp_path / "out"
    if problem == "file":
        out.write_text("a file where the folder should be")
    elif problem == "under-a-file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
    elif problem == "read-only":
        out.mkdir()
        _deny(monkeypatch, out, errno.EACCES, "open")
    elif problem == "read-only-chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the simulated case covers it")
        out.mkdir(mode=0o555)
    elif problem == "full-disk":
        out.mkdir()
        _deny(monkeypatch, out, errno.ENOSPC, "write")
    elif problem == "output-is-a-folder":
        (out / "caps_clip_score.json").mkdir(parents=True)
    else:  # no --output_dir: beside the captions file
        _deny(monkeypatch, caps.parent, errno.EACCES, "open")
        out = caps.parent
    extra = [] if problem.startswith("default") else ["--output_dir", str(out)]
    t0 = time.perf_counter()
    assert clip_main([*argv, "--dataset_path", str(photo_dir), *extra]) == 2
    assert time.perf_counter() - t0 < 10
    one_line_error(capsys, str(out), prog="clip_score")
    assert FakeScorer.made == 0, "the output problem must be found before the model is built"


def test_clip_score_full_disk_after_scoring_is_one_clear_line(tmp_path, photo_dir, fake_clip, monkeypatch, capsys):
    """The disk fills while scoring: the outputs cannot be written, but the numbers are in the message."""
    import modeltest.clip_score as cs

    caps, argv = fake_clip

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cs, "atomic_write", full)
    assert cs.main([*argv, "--dataset_path", str(photo_dir), "--output_dir", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "caps_clip_score.csv", "No space left on device", "clip_score 0.2500", prog="clip_score")
    assert FakeScorer.made == 1


# ---------------------------------------------------------------- 5. unreadable resume state


RECORD = {"id": 34604, "subject": "textvqa", "prediction": "x", "score": 0.0, "error": None}
BAD_RECORDS = {
    # name: (the line written in place of the third record, what the error says about it)
    "id-only": ('{"id": 34604}', "a record without 'subject', 'prediction', 'score', 'error'"),
    "no-score": (json.dumps({k: v for k, v in RECORD.items() if k != "score"}), "without 'score'"),
    "score-text": (json.dumps({**RECORD, "score": "high"}), "'score' is \"high\", not a number"),
    "list-id": (json.dumps({**RECORD, "id": [34604]}), "'id' is [34604], not an integer or text"),
    "not-an-object": ("[34604]", "not an object"),
    "not-json": ("{34604", "not JSON"),
}


@pytest.mark.parametrize("where", ["middle", "last"])
@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_unreadable_resume_state(tmp_path, task_yaml, capsys, name, where):
    preds, out = good_predictions(tmp_path), tmp_path / "out"
    assert score_only(task_yaml, preds, out) == 0
    (samples,) = out.glob("debug/**/samples.jsonl")
    lines = samples.read_text().splitlines()
    line, says = BAD_RECORDS[name]
    if where == "last":
        lines, lineno = [*lines[:-1], line], len(lines)
    else:
        lines[2], lineno = line, 3
    samples.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    if where == "last" and name == "not-json":  # a line cut by a kill mid-write: dropped, its sample redone
        assert score_only(task_yaml, preds, out) == 0
        return
    assert score_only(task_yaml, preds, out) == 2
    one_line_error(capsys, f"{samples}:{lineno}: not a sample record", says, "--overwrite")
    assert score_only(task_yaml, preds, out, "--overwrite") == 0  # what the message says works


# ---------------------------------------------------------------- 6. permissions follow the umask


@pytest.fixture
def umask():
    """Set a umask for one test; restored after."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, task_yaml, photo_dir, fake_clip, umask, mask, mode):
    from modeltest.clip_score import main as clip_main

    umask(mask)
    out = tmp_path / "out"
    assert score_only(task_yaml, good_predictions(tmp_path), out) == 0
    files = [*out.glob("results/**/*_result.csv"), *out.glob("results/**/*_result.json"),
             *out.glob("debug/**/run_config.json"), *out.glob("debug/**/samples.jsonl")]  # fmt: skip
    caps, argv = fake_clip
    assert clip_main([*argv, "--dataset_path", str(photo_dir), "--output_dir", str(tmp_path / "clip")]) == 0
    files += [tmp_path / "clip" / "caps_clip_score.csv", tmp_path / "clip" / "caps_clip_score.json"]
    assert len(files) == 6
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}


# ---------------------------------------------------------------- 7. images a plain convert("RGB") destroys


GRADIENT = np.linspace(0.0, 1.0, 256)


def _write(kind: str, path: Path):
    """A horizontal gradient (dark to bright) 8 rows high, in the file format and pixel type `kind`."""
    from PIL import Image

    row = GRADIENT
    if kind == "png-16bit":
        arr, name = np.rint(row * 65535).astype(np.uint16), "g16.png"
    elif kind == "tiff-16bit-big-endian":
        arr, name = np.rint(row * 65535).astype(">u2"), "g16b.tif"
    elif kind == "tiff-32bit-int":
        arr, name = np.rint(row * 65535).astype(np.int32), "g32.tif"
    elif kind == "tiff-float-0-1":
        arr, name = row.astype(np.float32), "f01.tif"
    elif kind == "tiff-float-wide":
        arr, name = (row * 4000 - 1000).astype(np.float32), "fwide.tif"
    else:
        raise AssertionError(kind)
    Image.fromarray(np.repeat(arr[None, :], 8, axis=0)).save(path / name)
    return path / name


@pytest.mark.parametrize("kind", ["png-16bit", "tiff-16bit-big-endian", "tiff-32bit-int", "tiff-float-0-1",
                                  "tiff-float-wide"])  # fmt: skip
def test_high_bit_depth_images_keep_their_pixels(tmp_path, kind):
    from PIL import Image

    from modeltest.backends.base import open_image

    path = _write(kind, tmp_path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I", "F")  # the modes a plain convert("RGB") clips
    rgb = open_image(path)
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and arr.shape == (8, 256, 3)
    assert (arr == arr[..., :1]).all()  # grey stays grey
    # the gradient survives: dark to bright in even steps, not all 255 (16-bit) or all 0/1 (float)
    np.testing.assert_allclose(arr[0, :, 0], np.rint(GRADIENT * 255), atol=1)
    with Image.open(path) as im:
        assert open_image(im).tobytes() == rgb.tobytes()  # an image object converts the same
    from engine.models.qwen_vl.processor import load_image

    assert load_image(path).tobytes() == rgb.tobytes()  # the engine's own loader (LLM.generate) agrees


def test_an_image_no_conversion_can_show_is_a_failed_sample(tmp_path, task_yaml):
    """A float image with NaN pixels: the sample is recorded as failed, naming the image and its mode;
    the other samples are scored and the run ends with exit 3 (errors above --max_error_rate)."""
    from PIL import Image

    from modeltest.backends.base import Backend, Generation, SampleError, open_image
    from modeltest.config import load_task_config
    from modeltest.runner import RunOptions, run

    images = tmp_path / "textvqa" / "train_images"
    target = sorted(images.iterdir())[0]
    pixels = np.repeat(GRADIENT.astype(np.float32)[None, :], 8, axis=0)
    pixels[0, 0] = np.nan
    Image.fromarray(pixels).save(target.with_suffix(".tif"))
    data = tmp_path / "textvqa" / "textvqa_val.jsonl"
    data.write_text(data.read_text().replace(target.name, target.with_suffix(".tif").name))
    with pytest.raises(SampleError, match=r"image .*\.tif: mode F .*NaN"):
        open_image(target.with_suffix(".tif"))

    class Looks(Backend):  # opens each image as the real backends do, answers when it can
        def generate(self, requests):
            out = []
            for r in requests:
                try:
                    open_image(r.images[0])
                    out.append(Generation(text="dakota"))
                except SampleError as e:
                    out.append(Generation(error=str(e)))
            return out

    res = run(None, load_task_config(task_yaml), RunOptions(output_dir=str(tmp_path / "o"), device="cpu",
                                                            progress=False, backend="hf"), backend=Looks())  # fmt: skip
    records = [json.loads(x) for x in res.paths.samples.read_text().splitlines()]
    failed = [r for r in records if r["error"]]
    assert len(records) == 8 and res.exit_code == 3 and len(failed) == 2  # the photo is used twice in 8 rows
    assert all("mode F" in r["error"] and r["score"] == 0.0 for r in failed)


# ---------------------------------------------------------------- 8. YAML that expands without bound


def _laughs(levels: int = 6, width: int = 10) -> str:
    """Nested aliases: `width` ** `levels` values from a few hundred bytes (mappings, so that walking the
    keys expands them too)."""
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: x" for i in range(width)) + "}"]
    for n in range(1, levels + 1):
        lines.append(f"l{n}: &l{n} {{" + ", ".join(f"k{i}: *l{n - 1}" for i in range(width)) + "}")
    return "\n".join(lines) + "\n"


YAMLS = {
    # name: (text, what the error says)
    "laughs-task": (_laughs(), "expands to more than 100000 values"),
    "laughs-model": (_laughs(), "expands to more than 100000 values"),
    "laughs-lists": ('a: &a ["x","x","x","x","x","x","x","x","x"]\n'
                     + "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
                     "expands to more than 100000 values"),
    "recursive": ("task_name: textvqa\nsubject_mapping: &m {textvqa: {name: *m}}\n", "recursive"),
    "deep": ("task_name: " + "[" * 1900, "nested too deeply"),
    "huge": ("task_name: textvqa\n" + "# padding\n" * 120_000, "larger than 1048576 bytes"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(YAMLS))
def test_yaml_that_expands_without_bound_is_refused_quickly(tmp_path, task_yaml, capsys, name):
    text, says = YAMLS[name]
    bad = tmp_path / f"{name}.yaml"
    bad.write_text(text)
    if name != "huge":
        assert len(text.encode()) < 2000, "a few hundred bytes"
    argv = (["--task_config_path", str(task_yaml), "--model_config_path", str(bad)] if name == "laughs-model"
            else ["--task_config_path", str(bad), "--predictions", str(tmp_path / "p.jsonl")])  # fmt: skip
    t0 = time.perf_counter()
    code = main([*argv, "--output_dir", str(tmp_path / "out")])
    assert time.perf_counter() - t0 < 2
    assert code == 2
    one_line_error(capsys, str(bad), says)


def test_python_m_modeltest_reports_bad_input_without_traceback(tmp_path):
    """The same one line from a real process (no pytest capture): a non-UTF-8 task config."""
    import subprocess

    bad = tmp_path / "t.yaml"
    bad.write_bytes(b"task_name: textvqa\nprompt: " + LATIN1 + b"\n")
    proc = subprocess.run([sys.executable, "-m", "modeltest", "--task_config_path", str(bad), "--predictions", "x"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"modeltest: error: {bad}:2: not UTF-8 text: byte 0xe9 at offset 30; "
                                        "save the config file as UTF-8"]  # fmt: skip
