"""Protects TextVQA's dataset sources other than the seed's jsonl (issue 14):

- a folder in the hub's own layout (lmms-lab/textvqa's `data/<split>-*.parquet`, image as the
  `datasets` Image struct of encoded bytes): loads the split `hf_dataset_split` names (default
  "validation"), scores exactly like the same samples in the seed's layout (same dataset fingerprint),
  and keeps the images encoded (`ImageBytes`) until a backend opens them;
- `hf_dataset_path` through `datasets.load_dataset(path, split=...)` when no local path is set; a local
  path (--dataset_path, local_dataset_path) wins;
- every failure (missing split, broken or incomplete parquet, offline and not cached) is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeltest.backends.base import ImageBytes, open_image, render_qwen_prompt
from modeltest.cli import main
from modeltest.config import TaskConfig
from modeltest.errors import ModelTestError
from modeltest.tasks import TextVQA

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, make_textvqa, write_yaml  # noqa: E402
from test_bad_input import one_line_error  # noqa: E402

TRAIN_IDS = [7, 8]  # the train split's rows: other ids, so a test sees which split was read


def _features():
    """lmms-lab/textvqa's columns and types."""
    import datasets

    text, texts = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    return datasets.Features({
        "image_id": text, "question_id": datasets.Value("int32"), "question": text, "question_tokens": texts,
        "image": datasets.Image(), "image_width": datasets.Value("int32"), "image_height": datasets.Value("int32"),
        "flickr_original_url": text, "flickr_300k_url": text, "answers": texts, "image_classes": texts,
        "set_name": text, "ocr_tokens": texts,
    })  # fmt: skip


def _hub_rows(seed: Path) -> list[dict]:
    """The seed layout's samples as lmms-lab/textvqa rows: the image file's own bytes (JPEG or PNG), no path."""
    from PIL import Image

    ann = {a["question_id"]: [x["answer"] for x in a["answers"]]
           for a in json.loads((seed.parent / "textvqa_val_annotations.json").read_text())["annotations"]}  # fmt: skip
    rows = []
    for line in seed.read_text().splitlines():
        r = json.loads(line)
        file = seed.parent / r["image"]
        with Image.open(file) as im:
            width, height = im.size
        rows.append({
            "image_id": file.stem, "question_id": r["question_id"], "question": r["question"],
            "question_tokens": r["question"].split(), "image": {"bytes": file.read_bytes(), "path": None},
            "image_width": width, "image_height": height, "flickr_original_url": "", "flickr_300k_url": "",
            "answers": ann[r["question_id"]], "image_classes": ["Poster"], "set_name": "val",
            "ocr_tokens": ["dakota", "22"],
        })  # fmt: skip
    return rows


def _write_split(folder: Path, split: str, rows: list[dict], shards: int) -> None:
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per : (k + 1) * per]
        ds = datasets.Dataset.from_list(part, features=_features())
        ds.to_parquet(str(folder / f"{split}-{k:05d}-of-{shards:05d}.parquet"))


@pytest.fixture(scope="module")
def seed(tmp_path_factory, photo_dir) -> Path:
    return make_textvqa(tmp_path_factory.mktemp("seed"), photo_dir)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, seed) -> Path:
    """lmms-lab/textvqa as downloaded files: data/validation-0000{0,1}-of-00002.parquet (the seed's 8
    samples) and data/train-00000-of-00001.parquet (2 other rows)."""
    root = tmp_path_factory.mktemp("hub") / "textvqa"
    rows = _hub_rows(seed)
    _write_split(root / "data", "validation", rows, shards=2)
    train = [{**rows[i], "question_id": qid, "question": f"train question {qid}?"} for i, qid in enumerate(TRAIN_IDS)]
    _write_split(root / "data", "train", train, shards=1)
    return root


@pytest.fixture
def hub_copy(tmp_path, hub) -> Path:
    return Path(shutil.copytree(hub, tmp_path / "textvqa"))


def _task(path=None, **keys) -> TextVQA:
    return TextVQA(TaskConfig(task_name="textvqa", local_dataset_path=str(path) if path else None, **keys))


def _yaml(tmp_path: Path, name: str = "textvqa", **keys) -> Path:
    return write_yaml(tmp_path / "cfg" / f"{name}.yaml", {"task_name": "textvqa", **keys})


def test_hub_parquet_folder_loads_the_validation_split(hub, seed):
    samples = _task(hub).load()
    expected = _task(seed).load()
    assert [s.id for s in samples] == [s.id for s in expected]  # both shards, in order
    assert [s.extra["question"] for s in samples] == [s.extra["question"] for s in expected]
    assert [s.references for s in samples] == [[a["answer"] for a in s.references] for s in expected]
    assert [s.parts[1] for s in samples] == [s.parts[1] for s in expected]
    for s, e in zip(samples, expected, strict=True):
        image = s.parts[0]["image"]
        assert isinstance(image, ImageBytes) and image.data == Path(e.image).read_bytes()
        # named like the seed's train_images/<image_id>.jpg|png: samples.jsonl and the fingerprint agree
        assert s.image == image.name == os.path.basename(e.image)
    # decoded on demand, pixel for pixel the seed's files (a JPEG and a PNG)
    for i in (0, 1):
        assert open_image(samples[i].parts[0]["image"]).tobytes() == open_image(expected[i].parts[0]["image"]).tobytes()
    assert render_qwen_prompt(samples[0].parts) == "<img>astronaut.jpg</img>what is the brand of this camera? Answer:"
    assert "bytes" in repr(samples[0].parts[0]["image"]) and len(repr(samples[0].parts[0]["image"])) < 80
    # the data/ folder itself works too; hf_dataset_split chooses the split
    assert [s.id for s in _task(hub / "data").load()] == [s.id for s in expected]
    train = _task(hub, hf_dataset_split="train").load()
    assert [s.id for s in train] == TRAIN_IDS and train[0].extra["question"] == "train question 7?"


def test_images_stay_encoded_until_a_backend_opens_them(hub, monkeypatch):
    from PIL import Image

    def no_decoding(*a, **k):
        raise AssertionError("an image was opened while loading the dataset")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        samples = _task(hub).load()
    assert all(isinstance(s.parts[0]["image"], ImageBytes) for s in samples)
    assert open_image(samples[0].parts[0]["image"]).size == (512, 512)


def test_engine_labels_bytes_by_name():
    from modeltest.backends.engine import _label

    assert _label(ImageBytes(b"\xff\xd8\xff", "003a8ae2ef43b901.jpg")) == "003a8ae2ef43b901.jpg"
    assert _label(ImageBytes(b"x", "/" + "d" * 300 + "/a.png")) == "a.png"  # too long for the span: the file name


def test_unnamed_bytes_and_named_cells(hub_copy):
    """An embedded image's own path names it; without one (or an image_id) the question id does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in sorted((hub_copy / "data").glob("validation-*.parquet")):
        table = pq.read_table(file).drop_columns(["image_id"])
        image = table.column("image").combine_chunks()
        paths = pa.array([f"photos/{q}.jpeg" if q % 2 else None for q in table.column("question_id").to_pylist()])
        cells = pa.StructArray.from_arrays([image.field("bytes"), paths], names=["bytes", "path"])
        pq.write_table(table.set_column(table.column_names.index("image"), "image", cells), file)
    samples = _task(hub_copy).load()
    assert [s.image for s in samples[:3]] == ["34602.jpg", "photos/34603.jpeg", "34604.jpg"]
    assert samples[1].parts[0]["image"].name == "photos/34603.jpeg"


def _score_only(task_yaml: Path, out: Path, answers: dict) -> dict:
    preds = out.parent / f"{out.name}-preds.jsonl"
    preds.write_text("".join(json.dumps({"question_id": q, "answer": a}) + "\n" for q, a in answers.items()))
    args = ["--task_config_path", str(task_yaml), "--predictions", str(preds), "--output_dir", str(out), "--no_progress"]
    assert main(args) == 0
    summary = json.loads(next(out.rglob("*_result.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples.jsonl")).read_text().splitlines()]
    return {"summary": summary, "samples": sorted(samples, key=lambda r: r["id"])}


def test_hub_layout_scores_like_the_seed_layout(tmp_path, hub, seed):
    answers = {34602 + i: a for i, a in enumerate(["dakota", "2", "stop", "blue", "nonsense", "22", "go", "white"])}
    runs = {}
    for name, path in (("seed", seed), ("hub", hub)):
        runs[name] = _score_only(_yaml(tmp_path, name, local_dataset_path=str(path)), tmp_path / name, answers)
    seed_run, hub_run = runs["seed"], runs["hub"]
    assert 0 < hub_run["summary"]["value"] < 1
    assert hub_run["summary"]["value"] == seed_run["summary"]["value"]
    assert hub_run["summary"]["dataset_fingerprint"] == seed_run["summary"]["dataset_fingerprint"]
    fields = ("id", "score", "prediction", "references", "question")
    assert [[r[k] for k in fields] for r in hub_run["samples"]] == [[r[k] for k in fields] for r in seed_run["samples"]]
    assert [r["image"] for r in hub_run["samples"]] == [os.path.basename(r["image"]) for r in seed_run["samples"]]
    assert hub_run["samples"][0]["prompt"].startswith("<img>astronaut.jpg</img>")


# -- hf_dataset_path -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_dataset(seed):
    import datasets

    return datasets.Dataset.from_list(_hub_rows(seed), features=_features())


def test_hf_dataset_path_calls_load_dataset(hub_dataset, seed, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return hub_dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    samples = _task(hf_dataset_path="lmms-lab/textvqa").load()
    assert calls == [("lmms-lab/textvqa", (), {"split": "validation"})]
    assert [s.id for s in samples] == [s.id for s in _task(seed).load()]
    assert all(isinstance(s.parts[0]["image"], ImageBytes) for s in samples) and samples[0].image == "astronaut.jpg"
    _task(hf_dataset_path="lmms-lab/textvqa", hf_dataset_split="test").load()
    assert calls[-1] == ("lmms-lab/textvqa", (), {"split": "test"})


def test_a_local_path_wins_over_hf_dataset_path(tmp_path, seed, hub, monkeypatch, capsys):
    import datasets

    def load_dataset(*args, **kwargs):
        raise AssertionError("hf_dataset_path was read although a local path is set")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(_task(seed, hf_dataset_path="lmms-lab/textvqa").load()) == 8
    # --dataset_path over both; a config with neither local key reads the hub
    cfg = _yaml(tmp_path, hf_dataset_path="lmms-lab/textvqa")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": 34602, "answer": "dakota"}) + "\n")
    base = ["--task_config_path", str(cfg), "--predictions", str(preds), "--no_progress"]
    assert main([*base, "--dataset_path", str(hub), "--output_dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main([*base, "--output_dir", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "hf_dataset_path lmms-lab/textvqa (split 'validation'): cannot load it: AssertionError: hf_dataset_path was read")


def test_hf_dataset_path_through_the_real_load_dataset(tmp_path, hub, monkeypatch, capsys):
    """datasets.load_dataset itself on a local folder in the hub's layout (its cache in tmp_path)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    samples = _task(hf_dataset_path=str(hub)).load()
    assert [s.id for s in samples] == [34602 + i for i in range(8)] and isinstance(samples[0].parts[0]["image"], ImageBytes)
    assert [s.id for s in _task(hf_dataset_path=str(hub), hf_dataset_split="train").load()] == TRAIN_IDS
    cfg = _yaml(tmp_path, hf_dataset_path=str(hub), hf_dataset_split="nope")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": 34602, "answer": "dakota"}) + "\n")
    capsys.readouterr()  # datasets' own progress bars, before the run
    code = main(["--task_config_path", str(cfg), "--predictions", str(preds), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    one_line_error(capsys, f"hf_dataset_path {hub} (split 'nope')", "Unknown split", "set hf_dataset_split")


def test_offline_and_not_cached_is_one_line(tmp_path, seed):
    """The real failure: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, an empty cache, a dataset never downloaded.
    In a fresh process: datasets reads those variables when it is imported."""
    cfg = _yaml(tmp_path, hf_dataset_path="modeltest-nobody/no-such-textvqa")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": 34602, "answer": "dakota"}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "modeltest", "--task_config_path", str(cfg), "--predictions", str(preds),
         "--output_dir", str(tmp_path / "out"), "--no_progress"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("modeltest: error: hf_dataset_path modeltest-nobody/no-such-textvqa (split 'validation')")
    assert "download it once with network access" in lines[0] and "local_dataset_path" in lines[0]


# -- bad local sources: one line, exit 2 -------------------------------------------------------------


def _corrupt(hub: Path) -> None:
    (hub / "data" / "validation-00001-of-00002.parquet").write_bytes(b"PAR1 not really a parquet file")


def _drop_answers(hub: Path) -> None:
    import pyarrow.parquet as pq

    file = hub / "data" / "validation-00000-of-00002.parquet"
    pq.write_table(pq.read_table(file).drop_columns(["answers"]), file)


def _no_image(hub: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = hub / "data" / "validation-00000-of-00002.parquet"
    table = pq.read_table(file)
    empty = pa.array([{"bytes": None, "path": None}] * len(table), type=table.schema.field("image").type)
    pq.write_table(table.set_column(table.column_names.index("image"), "image", empty), file)


def _saved_train_only(hub: Path) -> None:
    import datasets

    shutil.rmtree(hub / "data")
    ds = datasets.Dataset.from_dict({"question_id": [1], "question": ["q"], "image": ["x.jpg"], "answers": [["a"]]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(hub))


@pytest.mark.parametrize(
    "mutate, split, says",
    [
        (None, "test", ["textvqa: no parquet files for split 'test'", "['train', 'validation']", "set hf_dataset_split"]),
        (_corrupt, None, ["validation-00001-of-00002.parquet: not a readable parquet file", "download it again"]),
        (_drop_answers, None, ["validation-00000-of-00002.parquet: missing column(s) ['answers']"]),
        (_no_image, None, ["validation-00000-of-00002.parquet: row 0 (question_id 34602): 'image' holds neither"]),
        (lambda h: shutil.rmtree(h / "data"), None, ["textvqa: expected one .jsonl file", "data/<split>-*.parquet"]),
        (_saved_train_only, None, ["the saved dataset has no split 'validation'", "set hf_dataset_split"]),
    ],
    ids=["missing-split", "broken-parquet", "missing-column", "no-image", "empty-folder", "saved-dict-no-split"],
)
def test_bad_local_sources_are_one_line(tmp_path, hub_copy, capsys, mutate, split, says):
    if mutate:
        mutate(hub_copy)
    cfg = _yaml(tmp_path, local_dataset_path=str(hub_copy), **({"hf_dataset_split": split} if split else {}))
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": 34602, "answer": "dakota"}) + "\n")
    capsys.readouterr()  # datasets' own progress bars, before the run
    code = main(["--task_config_path", str(cfg), "--predictions", str(preds), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    one_line_error(capsys, *says)
    with pytest.raises(ModelTestError):  # the same error from the task, before any run is set up
        _task(hub_copy, hf_dataset_split=split).load()
