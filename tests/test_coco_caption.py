"""Protects the coco_caption task: both inputs (a folder, a list file) and their errors, the reproducible
--limit/--seed draw, the seed's <device>_coco_rst.json (sorted, markup kept, overwrite protection,
resume), the stripped text used for scoring, BLEU-4/METEOR/ROUGE-L/CIDEr against pycocoevalcap called
directly, the missing-Java error, and the task end to end on the hf backend (tiny Qwen2-VL) and the
engine backend (tiny Qwen-VL, where the prompt must be exactly Qwen-VL's from_list_format)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeltest.backends.base import Backend, Generation, open_image, render_qwen_prompt
from modeltest.cli import main
from modeltest.config import ModelConfig, TaskConfig, load_task_config
from modeltest.errors import ModelTestError
from modeltest.runner import RunOptions, run
from modeltest.tasks import CocoCaption, TextVQA

REPO = Path(__file__).resolve().parent.parent
TASK_YAML = REPO / "configs/task/coco_caption.yaml"
PROMPT = "Generate the caption in English with grounding:"
NAMES = ["astronaut.jpg", "camera.png", "chelsea.jpg", "coffee.png", "immunohistochemistry.jpg", "rocket.png"]

# What the fake model says per image, and the plain text each caption is scored as.
CAPTIONS = {
    "astronaut.jpg": ("<ref>A woman</ref><box>(10,20),(300,400)</box> in a space suit stands before a flag.",
                      "A woman in a space suit stands before a flag."),
    "camera.png": ("a man holding a camera on a tripod<|endoftext|>junk", "a man holding a camera on a tripod"),
    "chelsea.jpg": ("<ref>A cat</ref><box>(1,2),(3,4)</box> looks at <ref>the camera</ref><box>(5,6),(7,8)</box>.",
                    "A cat looks at the camera."),
    "coffee.png": ("A cup of coffee on a saucer.", "A cup of coffee on a saucer."),
    "immunohistochemistry.jpg": ("Stained cells under a microscope.", "Stained cells under a microscope."),
    "rocket.png": ("<box>(0,0),(999,999)</box>", ""),  # only a box: nothing to score
}  # fmt: skip
REFERENCES = {
    "astronaut.jpg": ["A woman in a space suit in front of an American flag.", "An astronaut poses for a portrait."],
    "camera.png": ["A man stands with a camera on a tripod.", "A photographer in a coat with his camera."],
    "chelsea.jpg": ["A cat looks at the camera.", "An orange and white cat staring ahead.", "A tabby cat."],
    "coffee.png": ["A cup of coffee on a saucer.", "A white cup of coffee on a plate."],
    "immunohistochemistry.jpg": ["Cells stained in brown and blue.", "A microscope image of tissue."],
    "rocket.png": ["A rocket on a launch pad.", "A space shuttle ready for launch."],
}


@pytest.fixture
def coco(tmp_path, photo_dir) -> Path:
    """A folder of images with spaces in its path, one non-image file and a subfolder."""
    folder = tmp_path / "coco images"
    folder.mkdir()
    for photo in photo_dir.iterdir():
        shutil.copy(photo, folder / photo.name)
    (folder / "README.txt").write_text("not an image")
    (folder / "sub").mkdir()
    shutil.copy(photo_dir / "rocket.png", folder / "sub" / "launch.png")
    return folder


def _cfg(folder: Path, **kw) -> TaskConfig:
    cfg = load_task_config(TASK_YAML)  # the repo's config, so it is exercised too
    cfg.local_dataset_path = str(folder)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


class CaptionBackend(Backend):
    name = "captions"

    def __init__(self, interrupt_after=None):
        self.calls = []
        self.interrupt_after = interrupt_after

    def generate(self, requests):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append([r.id for r in requests])
        out = []
        for r in requests:
            try:
                open_image(r.images[0])
            except Exception as e:
                out.append(Generation(error=str(e)))
                continue
            out.append(Generation(text=CAPTIONS[r.id][0], output_tokens=5))
        return out


def _run(cfg: TaskConfig, out: Path, backend: Backend, **kw):
    opts = RunOptions(output_dir=str(out), backend="hf", device="cpu", progress=False, **kw)
    return run(None, cfg, opts, backend=backend)


def _rst(out: Path) -> Path:
    return out / "results/CPU/precision_test/coco_caption/bf16/predictions/cpu_coco_rst.json"


def _csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _annotations(path: Path, refs: dict = REFERENCES) -> Path:
    images = [{"id": 1000 + i, "file_name": name} for i, name in enumerate(refs)]
    ids = {im["file_name"]: im["id"] for im in images}
    anns = [{"id": j, "image_id": ids[name], "caption": c} for j, (name, c) in
            enumerate((name, c) for name, cs in refs.items() for c in cs)]  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


# ---- inputs --------------------------------------------------------------------------------------


def test_folder_input_and_list_format_prompt(coco):
    task = CocoCaption(_cfg(coco))
    samples = task.load()
    assert [s.id for s in samples] == NAMES  # image files only, top level, sorted by name
    s = samples[0]
    assert s.image == str(coco / "astronaut.jpg") and s.references == [] and s.subject == "coco_caption"
    assert task.render(s) == f"Picture 1: <img>{coco / 'astronaut.jpg'}</img>\n{PROMPT}"
    req = task.request(s)
    assert req.list_format and req.parts == [{"image": str(coco / "astronaut.jpg")}, {"text": PROMPT}]
    assert task.max_new_tokens == 256  # the config's budget when the model sets none
    from modeltest.config import InferParams, MMModelConfig

    model = ModelConfig(model_name="m", mm_model=MMModelConfig(infer_params=InferParams(max_output_length=40)))
    assert CocoCaption(_cfg(coco), model).max_new_tokens == 40  # max_output_length from the model config


def test_list_format_rendering_matches_the_original():
    from engine.models.qwen_vl.tokenizer import QwenVLTokenizer

    parts = [{"image": "/d/a.jpg"}, {"image": "b.png"}, {"text": "Compare them:"}]
    assert render_qwen_prompt(parts, list_format=True) == QwenVLTokenizer.from_list_format(parts)
    assert render_qwen_prompt(parts, list_format=True) == "Picture 1: <img>/d/a.jpg</img>\nPicture 2: <img>b.png</img>\nCompare them:"
    assert render_qwen_prompt(parts) == "<img>/d/a.jpg</img><img>b.png</img>Compare them:"  # TextVQA's form


def test_list_file(coco, tmp_path):
    lst = tmp_path / "images.txt"
    lst.write_text(f"# the seed's 100 images\n\n  coffee.png  \nsub/launch.png\n{coco / 'chelsea.jpg'}\n")
    samples = CocoCaption(_cfg(coco, image_list=str(lst))).load()
    assert [(s.id, s.image) for s in samples] == [
        ("chelsea.jpg", str(coco / "chelsea.jpg")),
        ("coffee.png", str(coco / "coffee.png")),
        ("launch.png", str(coco / "sub" / "launch.png")),
    ]
    lst.write_text("coffee.png\n# gone:\nnope.jpg\n")
    with pytest.raises(ModelTestError, match=r"images.txt:3: image not found: .*nope.jpg"):
        CocoCaption(_cfg(coco, image_list=str(lst))).load()
    lst.write_text("coffee.png\nsub/../coffee.png\n")
    with pytest.raises(ModelTestError, match=r"images.txt:2: coffee.png is already listed on line 1"):
        CocoCaption(_cfg(coco, image_list=str(lst))).load()
    lst.write_text("# nothing\n\n")
    with pytest.raises(ModelTestError, match="names no images"):
        CocoCaption(_cfg(coco, image_list=str(lst))).load()


def test_input_errors_come_before_the_model_loads(coco, tmp_path, capsys):
    lst = tmp_path / "images.txt"
    lst.write_text("coffee.png\nmissing.jpg\n")
    model = tmp_path / "m.yaml"
    model.write_text(f"model_name: m\nmodel_path: {tmp_path / 'no-weights'}\nbackend: hf\n")
    code = main(["--task_config_path", str(TASK_YAML), "--model_config_path", str(model), "--dataset_path", str(coco),
                 "--image_list", str(lst), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "images.txt:2: image not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ModelTestError, match="no image files"):
        CocoCaption(_cfg(empty)).load()
    with pytest.raises(ModelTestError, match="reads a folder of images"):
        CocoCaption(_cfg(coco / "coffee.png")).load()


def test_task_specific_keys_and_metrics_are_checked(coco, textvqa):
    with pytest.raises(ModelTestError, match="task textvqa does not use image_list"):
        TextVQA(TaskConfig(task_name="textvqa", local_dataset_path=str(textvqa), image_list="x.txt"))
    cfg = _cfg(coco)
    cfg.metric.metric_type = "vqa_accuracy"
    with pytest.raises(ModelTestError, match="metric_type 'vqa_accuracy' does not apply; use non_empty"):
        CocoCaption(cfg)
    bare = TaskConfig(task_name="coco_caption", local_dataset_path=str(coco))  # no metric: the task's own
    assert CocoCaption(bare).metric.name == "non_empty" and bare.metric.metric_type == "non_empty"
    assert TextVQA(TaskConfig(task_name="textvqa")).metric.name == "vqa_accuracy"


# ---- --limit / --seed ----------------------------------------------------------------------------


def test_limit_draws_a_reproducible_sample(coco, tmp_path):
    task = CocoCaption(_cfg(coco))
    samples = task.load()
    picked = [s.id for s in task.select(samples, 3, seed=0)]
    # pinned: a change of algorithm would silently change which images a nightly command evaluates
    assert picked == ["astronaut.jpg", "coffee.png", "rocket.png"]
    assert [s.id for s in task.select(list(reversed(samples)), 3, seed=0)] == picked  # listing order is irrelevant
    draws = {tuple(s.id for s in task.select(samples, 3, seed=k)) for k in range(10)}
    assert len(draws) > 1 and all(list(d) == sorted(d) for d in draws)
    assert task.select(samples, 99, seed=0) == samples
    # the runner draws the same way, and so does the same command run again
    res = _run(_cfg(coco), tmp_path / "a", CaptionBackend(), limit=3, seed=7)
    again = _run(_cfg(coco), tmp_path / "b", CaptionBackend(), limit=3, seed=7)
    want = sorted(s.id for s in task.select(samples, 3, seed=7))
    assert want not in (picked, NAMES[:3])  # so the runner cannot pass by ignoring the seed or the draw
    assert sorted(json.loads(_rst(tmp_path / "a").read_text())) == want == sorted(json.loads(_rst(tmp_path / "b").read_text()))
    assert res.total == again.total == 3
    # TextVQA keeps taking the first N
    tv = TextVQA(TaskConfig(task_name="textvqa"))
    assert tv.select(list(range(8)), 3, seed=5) == [0, 1, 2]


# ---- the caption JSON, records, CSV --------------------------------------------------------------


def test_rst_json_records_and_csv(coco, tmp_path, capsys):
    (coco / "immunohistochemistry.jpg").write_bytes(b"not a jpeg")  # one image fails; the run goes on
    out = tmp_path / "out"
    res = _run(_cfg(coco), out, CaptionBackend(), batch_size=4, max_error_rate=0.5)
    assert res.exit_code == 0 and res.errors == 1 and res.total == 6
    rst = _rst(out)
    assert rst.parent == res.paths.result_csv.parent  # beside the results CSV
    text = rst.read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)  # sorted by key in the file itself
    expected = {k: v[0].split("<|endoftext|>")[0] for k, v in CAPTIONS.items() if k != "immunohistochemistry.jpg"}
    assert data == expected  # grounding markup kept; the failed image left out
    assert text == json.dumps(expected, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert f"captions: {rst}" in capsys.readouterr().out
    recs = {r["id"]: r for r in map(json.loads, res.paths.samples.read_text().splitlines())}
    cam = recs["camera.png"]
    assert cam["raw_output"] == CAPTIONS["camera.png"][0] and cam["prediction"] == CAPTIONS["camera.png"][1]
    for name, (_, plain) in CAPTIONS.items():
        if name != "immunohistochemistry.jpg":
            assert recs[name]["scoring_text"] == plain
            assert recs[name]["score"] == (1.0 if plain else 0.0)
    assert recs["chelsea.jpg"]["prediction"] == CAPTIONS["chelsea.jpg"][0]  # markup kept in the record too
    assert "image unreadable" in recs["immunohistochemistry.jpg"]["error"]
    assert recs["astronaut.jpg"]["prompt"] == f"Picture 1: <img>{coco / 'astronaut.jpg'}</img>\n{PROMPT}"
    rows = _csv(res.paths.result_csv)
    # non-empty captions: astronaut, camera, chelsea, coffee (rocket is only a box, one image failed)
    assert rows[1] == ["coco_caption", "0", "6", "4.0", "non_empty", str(round(4 / 6, 6))]
    assert len(rows) == 2  # no corpus rows without references; one subject has no row of its own
    summary = json.loads(res.paths.result_json.read_text())
    assert summary["paths"]["captions"] == str(rst) and summary["corpus_metrics"] == {}


@pytest.mark.parametrize("old_format", [False, True])
def test_score_only_reads_the_seeds_caption_files(coco, tmp_path, old_format):
    """--predictions npu_coco_rst.json (or the older image_file/model_answer form) scores captions made
    elsewhere, e.g. by the seed itself, with no model."""
    made = {"chelsea.jpg": "<ref>A cat</ref><box>(1,2),(3,4)</box> sitting.", "coffee.png": "",
            "astronaut.jpg": "An astronaut."}  # fmt: skip
    preds = tmp_path / "npu_coco_rst.json"
    data = {"image_file": list(made), "model_answer": list(made.values())} if old_format else made
    preds.write_text(json.dumps(data))
    out = tmp_path / "out"
    code = main(["--task_config_path", str(TASK_YAML), "--dataset_path", str(coco), "--predictions", str(preds),
                 "--output_dir", str(out), "--no_progress"])  # fmt: skip
    assert code == 0
    rows = _csv(next(out.rglob("*_result.csv")))
    assert rows[1] == ["coco_caption", "0", "3", "2.0", "non_empty", str(round(2 / 3, 6))]
    rst = out / "results/predictions/precision_test/coco_caption/npu_coco_rst/npu_coco_rst.json"  # the input's name
    assert json.loads(rst.read_text()) == made  # the same captions, markup kept, sorted


def test_rst_file_is_named_by_device_family_and_sorted(coco, tmp_path):
    from modeltest.output import run_paths

    task = CocoCaption(_cfg(coco))
    paths = run_paths(tmp_path, "NPU", "precision", "coco_caption", "bf16", "qwen_vl", "pa", 1, 1)
    records = [{"id": "b.jpg", "prediction": "<ref>B</ref><box>(1,2),(3,4)</box>", "error": None},
               {"id": "a.jpg", "prediction": "A", "error": None},
               {"id": "c.jpg", "prediction": "", "error": "image not found: c.jpg"}]  # fmt: skip
    out = task.write_outputs(records, paths, "NPU")
    assert out == {"captions": paths.result_csv.parent / "npu_coco_rst.json"}
    text = out["captions"].read_text()
    assert text == '{\n  "a.jpg": "A",\n  "b.jpg": "<ref>B</ref><box>(1,2),(3,4)</box>"\n}\n'
    assert not list(out["captions"].parent.glob(".*.tmp"))  # written through a temporary file, then renamed


def test_rst_overwrite_protection_and_resume(coco, tmp_path):
    full = tmp_path / "full"
    _run(_cfg(coco), full, CaptionBackend(), batch_size=2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(coco), out, CaptionBackend(interrupt_after=1), batch_size=2)
    assert not _rst(out).exists()
    resumed = CaptionBackend()
    _run(_cfg(coco), out, resumed, batch_size=2)
    assert resumed.calls == [NAMES[2:4], NAMES[4:6]]  # only what was missing
    assert _rst(out).read_text() == _rst(full).read_text()
    idle = CaptionBackend()
    _run(_cfg(coco), out, idle, batch_size=2)  # the same command again: same file, nothing generated
    assert idle.calls == [] and _rst(out).read_text() == _rst(full).read_text()
    # a shorter run's file is extended by a longer one (every caption in it is among the samples)
    short = tmp_path / "short"
    _run(_cfg(coco), short, CaptionBackend(), limit=2)
    assert len(json.loads(_rst(short).read_text())) == 2
    _run(_cfg(coco), short, CaptionBackend())
    assert _rst(short).read_text() == _rst(full).read_text()
    # a file holding anything else is refused, before any generation; --overwrite replaces it
    foreign = tmp_path / "foreign"
    _rst(foreign).parent.mkdir(parents=True)
    _rst(foreign).write_text(json.dumps({"astronaut.jpg": "made elsewhere"}))
    backend = CaptionBackend()
    with pytest.raises(ModelTestError, match=r"cpu_coco_rst.json exists .* --overwrite"):
        _run(_cfg(coco), foreign, backend)
    assert backend.calls == [] and json.loads(_rst(foreign).read_text()) == {"astronaut.jpg": "made elsewhere"}
    _rst(out).write_text(_rst(out).read_text().replace("saucer", "plate"))  # edited by hand after the run
    with pytest.raises(ModelTestError, match="exists"):
        _run(_cfg(coco), out, CaptionBackend(), batch_size=2)
    with pytest.raises(ModelTestError, match="exists"):  # another --batch_size: other samples, the same file
        _run(_cfg(coco), full, CaptionBackend(), batch_size=1)
    again = CaptionBackend()
    _run(_cfg(coco), foreign, again, overwrite=True)
    assert len(sum(again.calls, [])) == 6 and _rst(foreign).read_text() == _rst(full).read_text()


# ---- corpus metrics ------------------------------------------------------------------------------


def _pycocoevalcap_direct(captions: dict, refs: dict) -> dict:
    """COCO's caption evaluation as pycocoevalcap's eval.py runs it (without SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in captions})
    res = tok.tokenize({k: [{"caption": c}] for k, c in captions.items()})
    return {
        "BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_caption_metrics_match_pycocoevalcap(coco, tmp_path):
    pytest.importorskip("pycocoevalcap")
    out = tmp_path / "out"
    first = _run(_cfg(coco), out, CaptionBackend())  # captions first, references later: no new generation
    assert first.summary["corpus_metrics"] == {}
    ann = _annotations(tmp_path / "captions_val2014.json")
    backend = CaptionBackend()
    res = _run(_cfg(coco, annotations_path=str(ann)), out, backend)
    assert backend.calls == []
    want = _pycocoevalcap_direct({k: plain for k, (_, plain) in CAPTIONS.items()}, REFERENCES)
    rows = _csv(res.paths.result_csv)
    got = {r[4]: r for r in rows[2:6]}
    assert list(got) == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    for name, value in want.items():
        assert got[name][:4] == ["coco_caption", "0", "6", ""]  # Pass: not a count
        assert float(got[name][5]) == pytest.approx(value, abs=1e-6)
        assert res.summary["corpus_metrics"][name] == pytest.approx(value, abs=1e-12)
    assert 0 < want["BLEU-4"] < 1 and want["CIDEr"] > 0.5  # the test data is not degenerate
    recs = [json.loads(x) for x in res.paths.samples.read_text().splitlines()]
    assert {r["id"]: r["scoring_text"] for r in recs} == {k: plain for k, (_, plain) in CAPTIONS.items()}


TRICKY_CAPTIONS = [
    "A man riding a horse.",
    'Two dogs (brown) play, "happily"! Don\'t they?',
    "",
    "  spaces   around  ",
    "A line\nbreak and a trailing one\n",
    "Café au lait, naïve — “quoted” text… 3.5 km/h; e-mail: a@b.com -- ok?",
    "[bracketed] {braced} it's 10 o'clock ... `tick`",
    "a\x1cb\x85c",
    "",
]
LINE_BREAKS = ["\r", "\r\n", "\x0b", "\x0c", "\u2028", "\u2029"]


def _ptb_official(captions: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    got = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [got[i][0] for i in range(len(captions))]


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs Java")
def test_ptb_tokenize_equals_pycocoevalcaps_tokenizer_without_writing_into_its_package():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer import ptbtokenizer

    from modeltest.metrics.caption import ptb_tokenize

    package = Path(ptbtokenizer.__file__).parent
    listed, stamp = sorted(os.listdir(package)), package.stat().st_mtime_ns
    ours = ptb_tokenize(TRICKY_CAPTIONS)
    assert sorted(os.listdir(package)) == listed and package.stat().st_mtime_ns == stamp
    assert ours == _ptb_official(TRICKY_CAPTIONS)
    assert ours[1] == "two dogs -lrb- brown -rrb- play happily do n't they"  # pycocoevalcap's own quirks kept
    # a line break the tokenizer honours (pycocoevalcap only turns "\n" into a space) stays inside its caption
    broken = [f"one{br}two" for br in LINE_BREAKS] + ["three"]
    assert ptb_tokenize(broken) == ["one two"] * len(LINE_BREAKS) + ["three"]
    assert ptb_tokenize([]) == []
    assert _ptb_official(broken)[-1] != "three"  # pycocoevalcap itself moves later captions onto other ids


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs Java")
def test_a_tokenizer_output_that_does_not_line_up_is_an_error(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import modeltest.metrics.caption as caption

    real_run = subprocess.run

    def one_line_short(cmd, **kw):
        done = real_run(cmd, **kw)
        done.stdout = done.stdout.split(b"\n", 1)[1]
        return done

    monkeypatch.setattr(caption.subprocess, "run", one_line_short)
    with pytest.raises(ModelTestError, match="returned 2 lines for 3 captions"):
        caption.ptb_tokenize(["one", "two", "three"])
    monkeypatch.setattr(caption.subprocess, "run", lambda cmd, **kw: real_run([*cmd[:3], "no.such.Class"], **kw))
    with pytest.raises(ModelTestError, match="PTB tokenizer .* failed with exit code"):
        caption.ptb_tokenize(["one"])


def test_missing_java_is_a_clear_error_before_the_model_loads(coco, tmp_path, monkeypatch, capsys):
    import modeltest.metrics.caption as caption

    ann = _annotations(tmp_path / "captions_val2014.json")
    model = tmp_path / "m.yaml"
    model.write_text(f"model_name: m\nmodel_path: {tmp_path / 'no-weights'}\nbackend: hf\n")
    argv = ["--task_config_path", str(TASK_YAML), "--model_config_path", str(model), "--dataset_path", str(coco),
            "--annotations_path", str(ann), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", sys.modules.get("pycocoevalcap") or type(sys)("pycocoevalcap"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "captions_val2014.json: caption metrics need Java" in err and "default-jre-headless" in err
    assert "`java` is not on PATH" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written, the (missing) model never looked at
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # not installed
    assert main(argv) == 2
    assert "pip install 'modeltest[caption]'" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(argv[:-4] + ["--output_dir", str(tmp_path / "out")]) == 2  # without references no Java is asked for
    assert "model_path does not exist" in capsys.readouterr().err


def test_annotation_errors(coco, tmp_path):
    ann = _annotations(tmp_path / "a.json", {k: v for k, v in REFERENCES.items() if k != "rocket.png"})
    with pytest.raises(ModelTestError, match=r"a.json: 1 image\(s\) have no reference caption: rocket.png"):
        CocoCaption(_cfg(coco, annotations_path=str(ann))).load()
    ann.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ModelTestError, match="expected COCO caption annotations"):
        CocoCaption(_cfg(coco, annotations_path=str(ann))).load()
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 2, "caption": "c"}]}))
    with pytest.raises(ModelTestError, match=r"annotations\[0\] has image_id 2"):
        CocoCaption(_cfg(coco, annotations_path=str(ann))).load()


# ---- end to end on real (tiny) models ------------------------------------------------------------


def _samples(out: Path) -> list[dict]:
    (path,) = out.glob("debug/**/samples.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_hf_backend_end_to_end(hf_model_yaml, coco, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model_config_path", str(hf_model_yaml), "--task_config_path", str(TASK_YAML), "--dataset_path",
            str(coco), "--limit", "2", "--seed", "3", "--device", "cpu", "--no_progress", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    (rst,) = out.glob("results/CPU/precision_test/coco_caption/fp32/tiny_qwen2_vl/cpu_coco_rst.json")
    assert f"captions: {rst}" in capsys.readouterr().out
    task = CocoCaption(_cfg(coco))
    want = [s.id for s in task.select(task.load(), 2, seed=3)]
    assert want != [s.id for s in task.select(task.load(), 2, seed=0)] and want != NAMES[:2]  # --seed reached the draw
    assert list(json.loads(rst.read_text())) == want
    recs = _samples(out)
    assert [r["id"] for r in recs] == want and all(r["error"] is None and r["output_tokens"] > 0 for r in recs)
    prompt = recs[0]["prompt"]  # the chat template places the image; no "Picture 1:" label here
    assert "<|vision_start|><|image_pad|><|vision_end|>" + PROMPT in prompt and "Picture" not in prompt
    assert json.loads(rst.read_text()) == {r["id"]: r["prediction"] for r in recs}


def test_engine_backend_end_to_end(qwen_vl_ckpt, coco, tmp_path):
    import yaml

    model = tmp_path / "qwen_vl.yaml"
    model.write_text(yaml.safe_dump({
        "model_name": "tiny_qwen_vl", "model_path": str(qwen_vl_ckpt), "data_type": "fp32", "backend": "engine",
        "block_size": 32, "mm_model": {"infer_params": {"max_output_length": 4, "max_batch_size": 2}},
    }))  # fmt: skip
    out = tmp_path / "out"
    argv = ["--model_config_path", str(model), "--task_config_path", str(TASK_YAML), "--dataset_path", str(coco),
            "--limit", "2", "--device", "cpu", "--no_progress", "--batch_size", "2", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    recs = _samples(out)
    assert len(recs) == 2 and all(r["error"] is None and r["output_tokens"] == 4 for r in recs)
    for r in recs:
        assert r["prompt"] == f"Picture 1: <img>{coco / r['id']}</img>\n{PROMPT}"
    (rst,) = out.glob("results/CPU/precision_test/coco_caption/fp32/tiny_qwen_vl/cpu_coco_rst.json")
    assert json.loads(rst.read_text()) == {r["id"]: r["prediction"] for r in recs}
