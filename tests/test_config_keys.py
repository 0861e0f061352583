"""Protects "every config key does what it says" on the tiny Qwen-VL (engine backend, CPU):

- use_chat_template / is_chat_model: each sample is the user turn of Qwen-VL-Chat's ChatML
  conversation (default system prompt, from_list_format parts); the prediction equals LLM.generate of
  the same chat messages, and samples.jsonl holds the exact rendered prompt;
- requested_max_input_length: a longer prompt is that sample's recorded error; with
  need_truncate_input its text is cut from the left (never an image span) to fit, the record says by
  how many tokens, and the answer is the engine's for the cut prompt;
- max_position_embedding caps the engine's max_model_len; mm_model.warm_up_image_path reaches the
  engine's warm-up, and a missing one is refused before anything loads;
- every config field is read somewhere or listed as accepted-and-ignored, and those that are set are
  named in a one-line notice each; task_type: performance runs (tests/test_performance.py has the rest);
- --no_progress hides the weight-loading bar; --backend hf on a Qwen-VL folder says to use the engine.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from modeltest.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 5


@pytest.fixture(scope="module")
def data(photo_dir, tmp_path_factory) -> Path:
    return make_textvqa(tmp_path_factory.mktemp("keys") / "textvqa", photo_dir, n=3)


def _run(tmp: Path, ckpt: Path, data: Path, model: dict | None = None, task: dict | None = None,
         *flags: str) -> tuple[int, list[dict]]:  # fmt: skip
    model_yaml, task_yaml = tmp / "model.yaml", tmp / "task.yaml"
    model_yaml.write_text(yaml.safe_dump({"model_name": "tiny", "model_path": str(ckpt), "data_type": "fp32",
                                          "block_size": 16, **(model or {}),
                                          "mm_model": {"infer_params": {"max_output_length": MAX_NEW},
                                                       **(model or {}).get("mm_model", {})}}))  # fmt: skip
    task_yaml.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(data), **(task or {})}))
    out = tmp / "out"
    code = main(["--model_config_path", str(model_yaml), "--task_config_path", str(task_yaml), "--device", "cpu",
                 "--output_dir", str(out), *flags])  # fmt: skip
    samples = next(out.rglob("samples.jsonl"), None)
    return code, [json.loads(x) for x in samples.read_text().splitlines()] if samples else []


def _jsonl(data: Path) -> list[dict]:
    return [json.loads(x) for x in data.read_text().splitlines()]


@pytest.mark.parametrize("key", ["use_chat_template", "is_chat_model"])
def test_chat_models_get_the_chat_conversation(qwen_vl_ckpt, qwen_vl_llm, data, tmp_path, key):
    from engine import SamplingParams

    model = {"use_chat_template": True} if key == "use_chat_template" else {"mm_model": {"infer_params": {
        "max_output_length": MAX_NEW, "is_chat_model": True}}}  # fmt: skip
    code, records = _run(tmp_path, qwen_vl_ckpt, data, model)
    assert code == 0 and len(records) == 3
    rows = {r["question_id"]: r for r in _jsonl(data)}
    messages = [[{"role": "user", "content": [{"image": str(data.parent / rows[r["id"]]["image"])},
                                              {"text": f"{rows[r['id']]['question']} Answer:"}]}]
                for r in records]  # fmt: skip
    want = qwen_vl_llm.generate(messages, SamplingParams(max_tokens=MAX_NEW), use_tqdm=False)
    for rec, out in zip(records, want, strict=True):
        assert rec["raw_output"] == out.text and rec["error"] is None
        assert rec["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                        "Picture 1: <img>")  # fmt: skip
        assert rec["prompt"].endswith(f"{rows[rec['id']]['question']} Answer:<|im_end|>\n<|im_start|>assistant\n")
        assert rec["input_tokens"] == len(out.prompt_token_ids)
    (tmp_path / "plain").mkdir()
    code, plain = _run(tmp_path / "plain", qwen_vl_ckpt, data)
    assert code == 0 and all("<|im_start|>" not in r["prompt"] for r in plain)  # default off, as the seed


def test_requested_max_input_length_fails_or_truncates(qwen_vl_ckpt, qwen_vl_llm, data, tmp_path):
    from engine import SamplingParams

    (tmp_path / "a").mkdir()
    code, full = _run(tmp_path / "a", qwen_vl_ckpt, data)
    lengths = {r["id"]: r["input_tokens"] for r in full}
    limit = min(lengths.values()) - 2  # every prompt is too long by 2 tokens or more
    (tmp_path / "b").mkdir()
    code, refused = _run(tmp_path / "b", qwen_vl_ckpt, data, None, {"requested_max_input_length": limit},
                         "--max_error_rate", "1")  # fmt: skip
    assert code == 0 and all(r["score"] == 0 and f"more than requested_max_input_length {limit}" in r["error"]
                             and "need_truncate_input" in r["error"] for r in refused)  # fmt: skip
    (tmp_path / "c").mkdir()
    code, cut = _run(tmp_path / "c", qwen_vl_ckpt, data, None,
                     {"requested_max_input_length": limit, "need_truncate_input": True})  # fmt: skip
    assert code == 0
    for rec in cut:
        assert rec["error"] is None and rec["input_tokens"] <= limit
        assert rec["input_truncated"] == lengths[rec["id"]] - rec["input_tokens"] >= 2
        question = rec["question"]
        kept = rec["prompt"].split("</img>", 1)[1]
        assert kept.endswith(" Answer:") and question.endswith(kept.removesuffix(" Answer:"))  # the left was cut
        assert rec["prompt"].startswith("<img>")  # the image span is whole
        image = data.parent / next(r["image"] for r in _jsonl(data) if r["question_id"] == rec["id"])
        direct = qwen_vl_llm.generate({"prompt": rec["prompt"], "multi_modal_data": {"image": str(image)}},
                                      SamplingParams(max_tokens=MAX_NEW), use_tqdm=False)[0]  # fmt: skip
        assert rec["raw_output"] == direct.text
    (tmp_path / "d").mkdir()
    code, images_only = _run(tmp_path / "d", qwen_vl_ckpt, data, None,
                             {"requested_max_input_length": 100, "need_truncate_input": True},
                             "--max_error_rate", "1")  # fmt: skip
    assert all("images alone are" in r["error"] for r in images_only)


def test_max_position_embedding_caps_the_engine(qwen_vl_ckpt):
    from modeltest.backends.engine import EngineBackend
    from modeltest.config import ModelConfig

    cfg = ModelConfig(model_name="t", model_path=str(qwen_vl_ckpt), data_type="fp32", block_size=16,
                      max_position_embedding=300)  # fmt: skip
    backend = EngineBackend(cfg, device="cpu", progress=False)
    assert backend.llm.config.max_model_len == 300
    cfg.mm_model.infer_params.max_input_length, cfg.mm_model.infer_params.max_output_length = 400, 10
    assert EngineBackend(cfg, device="cpu", progress=False).llm.config.max_model_len == 300  # the cap wins
    cfg.max_position_embedding = -1
    assert EngineBackend(cfg, device="cpu", progress=False).llm.config.max_model_len == 410


def test_the_warm_up_image_reaches_the_engine(qwen_vl_ckpt, photo_dir, data, tmp_path, monkeypatch, capsys):
    import engine

    photo = sorted(photo_dir.iterdir())[0]
    seen = {}
    real = engine.LLM.__init__
    monkeypatch.setattr(engine.LLM, "__init__", lambda self, model, **kw: seen.update(kw) or real(self, model, **kw))
    code, _ = _run(tmp_path, qwen_vl_ckpt, data, {"mm_model": {"warm_up_image_path": [str(photo)]}})
    assert code == 0 and seen["warmup_images"] == [str(photo)]
    seen.clear()
    capsys.readouterr()
    code, _ = _run(tmp_path, qwen_vl_ckpt, data, {"mm_model": {"warm_up_image_path": [str(photo_dir / "gone.jpg")]}},
                   None, "--overwrite")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and not seen and "mm_model.warm_up_image_path" in err and "gone.jpg is not a file" in err


# ---- keys accepted and ignored: never silently ------------------------------------------------------


def _fields(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        sub = f.type if isinstance(f.type, type) else getattr(sys.modules[cls.__module__], str(f.type), None)
        if dataclasses.is_dataclass(sub):
            out += _fields(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _reads(tree: ast.AST) -> set[str]:
    """What a module reads, as `attr` and `parent.attr` (the parent's last attribute, or for a local
    name the attribute it was assigned from: `mm = cfg.mm_model` makes `mm.x` read `mm_model.x`)."""
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.body if isinstance(node.value, ast.IfExp) else node.value
            if isinstance(value, ast.Attribute):
                alias[node.targets[0].id] = value.attr
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
            parent = node.value
            if isinstance(parent, ast.Attribute):
                out.add(f"{parent.attr}.{node.attr}")
            elif isinstance(parent, ast.Name) and parent.id in alias:
                out.add(f"{alias[parent.id]}.{node.attr}")
    return out


def test_every_config_field_is_read_or_named_as_ignored():
    """A top-level field counts as read where its name is read; a nested one (mm_model.path) only
    where it is read on its parent (`….mm_model.path`), so a common name elsewhere does not count."""
    from modeltest.config import IGNORED_KEYS, RECORDED_ONLY, ModelConfig, TaskConfig

    read = set(RECORDED_ONLY)
    for path in (REPO / "modeltest").rglob("*.py"):
        if path.name == "config.py" and path.parent.name == "modeltest":
            continue  # where the fields are declared, validated and listed
        read |= _reads(ast.parse(path.read_text()))
    fields = _fields(ModelConfig) + _fields(TaskConfig)
    assert "mm_model.infer_params.is_chat_model" in fields and len(fields) > 40
    orphans = [f for f in fields if ".".join(f.split(".")[-2:]) not in read and f not in IGNORED_KEYS]
    assert orphans == [], f"config keys neither read nor listed in IGNORED_KEYS: {orphans}"
    stale = [k for k in IGNORED_KEYS if k not in fields]
    assert stale == []


def test_the_seeds_ignored_keys_are_named_once_each(qwen_vl_ckpt, data, tmp_path, capsys):
    code, _ = _run(tmp_path, qwen_vl_ckpt, data, {"requested_gpu_framework": "Huggingface",
                   "mm_model": {"path": "run_pa", "classname": "PARunner"}}, {"om_dataset_path": "/om"},
                   "--limit", "1")  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modeltest: note: ")]
    assert code == 0 and len(notes) == 4
    for key, value in (("requested_gpu_framework", "'Huggingface'"), ("mm_model.path", "'run_pa'"),
                       ("mm_model.classname", "'PARunner'"), ("om_dataset_path", "'/om'")):  # fmt: skip
        assert sum(f"note: {key}: {value} is accepted" in n for n in notes) == 1


def test_backend_specific_keys_are_named_on_the_backend_that_ignores_them():
    from modeltest.config import ModelConfig, TaskConfig, notices

    model = ModelConfig(model_name="m", block_size=32, max_position_embedding=512, trust_remote_code=True)
    task = TaskConfig(task_name="textvqa")
    on_hf = "\n".join(notices(model, task, "hf"))
    assert "block_size: 32 is ignored on the hf backend" in on_hf and "max_position_embedding: 512" in on_hf
    assert "use_chat_template: false does not apply on the hf backend" in on_hf and "trust_remote_code" not in on_hf
    on_engine = "\n".join(notices(model, task, "engine"))
    assert "trust_remote_code: True is ignored on the engine backend" in on_engine and "block_size" not in on_engine
    assert notices(ModelConfig(model_name="m"), task, "engine") == []  # the defaults say nothing
    from modeltest.config import MMModelConfig

    captions = TaskConfig(task_name="coco_caption", hf_dataset_path="lmms-lab/COCO-Caption")
    said = "\n".join(notices(ModelConfig(model_name="m", mm_model=MMModelConfig(prompt_suffix=" Answers:")), captions,
                             "engine"))  # fmt: skip
    assert "prompt_suffix (VQA cues) do not apply to captions" in said and "coco_caption reads a local" in said
    assert "model_type: 'fa'" in "\n".join(notices(ModelConfig(model_name="m", model_type="fa"), task, "engine"))
    scored = notices(None, TaskConfig(task_name="textvqa", requested_max_input_length=10), "predictions")
    assert len(scored) == 1 and "score-only mode" in scored[0]


def test_task_type_performance_runs(qwen_vl_ckpt, tmp_path):
    model, task = tmp_path / "model.yaml", tmp_path / "task.yaml"
    model.write_text(yaml.safe_dump({"model_name": "tiny", "model_path": str(qwen_vl_ckpt), "data_type": "fp32",
                                     "block_size": 16}))  # fmt: skip
    task.write_text("task_name: synthetic\ntask_type: performance\ncase_pair: [[24, 3]]\nwith_image: false\n"
                    "warmup_rounds: 0\n")  # fmt: skip
    assert main(["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu",
                 "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--no_progress"]) == 0  # fmt: skip
    (found,) = (tmp_path / "out").rglob("performance_pa_batch2_tp1_result.csv")  # no batch_size key: --batch_size
    assert found.read_text().splitlines()[1].startswith("tiny,2,24,3,")


# ---- what a new user trips over ----------------------------------------------------------------------


def test_no_progress_hides_the_weight_loading_bar(qwen_vl_ckpt, data, tmp_path, capsys):
    code, _ = _run(tmp_path, qwen_vl_ckpt, data, None, None, "--limit", "1", "--no_progress")
    assert code == 0 and "loading weights" not in capsys.readouterr().err
    (tmp_path / "bar").mkdir()
    code, _ = _run(tmp_path / "bar", qwen_vl_ckpt, data, None, None, "--limit", "1")
    assert code == 0 and "loading weights" in capsys.readouterr().err


def test_hf_on_a_qwen_vl_folder_says_to_use_the_engine(qwen_vl_ckpt, data, tmp_path, capsys):
    code, _ = _run(tmp_path, qwen_vl_ckpt, data, {"backend": "hf"})
    err = capsys.readouterr().err
    assert code == 2 and "Qwen-VL (v1) is not a model transformers runs itself" in err and "--backend engine" in err
    assert "trust_remote_code=True" not in err and "huggingface.co" not in err
