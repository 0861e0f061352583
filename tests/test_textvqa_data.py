"""Protects TextVQA loading: the seed's jsonl + annotations (relative image paths resolved against
the jsonl's folder), a `datasets` save_to_disk folder, and the clear errors raised before inference."""

import json

import pytest

from modeltest.backends.base import open_image
from modeltest.config import MetricConfig, ModelConfig, TaskConfig
from modeltest.errors import ModelTestError
from modeltest.tasks import TextVQA


def _task(path, **model_kw):
    model = ModelConfig(model_name="m", **model_kw) if model_kw else None
    return TextVQA(TaskConfig(task_name="textvqa", local_dataset_path=str(path)), model)


def test_seed_layout_with_relative_images(textvqa, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    samples = _task(textvqa).load()
    assert len(samples) == 8
    s = samples[0]
    assert s.id == 34602 and s.subject == "textvqa"
    assert s.parts[0]["image"] == str(textvqa.parent / "train_images" / "astronaut.jpg")
    assert open_image(s.parts[0]["image"]).size == (512, 512)
    assert s.parts[1]["text"] == "what is the brand of this camera? Answer:"
    assert len(s.references) == 10 and s.references[0]["answer"] == "dakota"
    assert _task(textvqa).render(s) == f"<img>{s.image}</img>what is the brand of this camera? Answer:"


def test_prompt_and_token_overrides(textvqa):
    from modeltest.config import InferParams, MMModelConfig

    mm = MMModelConfig(prompt_prefix="", prompt_suffix=" Answers:", infer_params=InferParams(max_output_length=65))
    task = _task(textvqa, mm_model=mm)
    assert task.load()[0].parts[1]["text"] == "what is the brand of this camera? Answers:"
    assert task.max_new_tokens == 65
    assert _task(textvqa).max_new_tokens == 10  # Qwen-VL's official TextVQA budget


def test_datasets_folder(textvqa, tmp_path, photo_dir):
    import datasets

    rows = [json.loads(line) for line in textvqa.read_text().splitlines()]
    ann = {a["question_id"]: [x["answer"] for x in a["answers"]]
           for a in json.loads((textvqa.parent / "textvqa_val_annotations.json").read_text())["annotations"]}  # fmt: skip
    ds = datasets.Dataset.from_dict({
        "question_id": [r["question_id"] for r in rows],
        "question": [r["question"] for r in rows],
        "image": [str(textvqa.parent / r["image"]) for r in rows],
        "answers": [ann[r["question_id"]] for r in rows],
    }).cast_column("image", datasets.Image())  # fmt: skip
    out = tmp_path / "hf_textvqa"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(out))
    samples = _task(out).load(limit=3)
    assert [s.id for s in samples] == [r["question_id"] for r in rows[:3]]
    assert samples[1].references == ann[rows[1]["question_id"]]
    img = open_image(samples[0].parts[0]["image"])  # embedded bytes, decoded only when needed
    assert img.size == (512, 512)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.write_text(p.read_text() + "{not json\n"), r"textvqa_val.jsonl:9: malformed JSON line"),
        (lambda p: (p.parent / "textvqa_val_annotations.json").unlink(), "annotations file not found"),
        (lambda p: p.write_text(p.read_text() + json.dumps({"image": "x.jpg", "question": "q", "question_id": 1}) + "\n"),
         r"1 question_id\(s\) have no annotation.*: 1"),
        (lambda p: p.write_text(""), "the dataset is empty"),
        (lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[0] + "\n"), "appears more than once"),
        (lambda p: p.write_text(json.dumps({"image": "x.jpg", "question_id": 34602}) + "\n"), "has no 'question'"),
    ],
    ids=["malformed-line", "no-annotations", "unannotated-id", "empty", "duplicate-id", "missing-key"],
)
def test_bad_data_fails_before_inference(textvqa, mutate, message):
    mutate(textvqa)
    with pytest.raises(ModelTestError, match=message):
        _task(textvqa).load()


def test_missing_dataset_path(tmp_path):
    with pytest.raises(ModelTestError, match="dataset not found"):
        _task(tmp_path / "nope.jsonl").load()
    with pytest.raises(ModelTestError, match="no dataset path"):
        TextVQA(TaskConfig(task_name="textvqa")).load()


def test_metric_from_config(textvqa):
    cfg = TaskConfig(task_name="textvqa", local_dataset_path=str(textvqa), metric=MetricConfig("exact_match", "official"))
    task = TextVQA(cfg)
    s = task.load()[0]
    assert task.score("Dakota", s) == 1.0 and task.metric.name == "exact_match"


def test_end_markers_cut_predictions():
    from modeltest.tasks.base import cut_at_end_marker

    assert cut_at_end_marker(" dakota<|endoftext|>junk") == "dakota"
    assert cut_at_end_marker("stop</s><|im_end|>") == "stop"
    assert cut_at_end_marker("  white \n") == "white"
