"""Shared fixtures: real photos (scikit-image), TextVQA data in the seed's on-disk layout, and a
tiny random Qwen2-VL saved the way transformers saves real checkpoints (nothing downloaded).

Disk: the tiny checkpoints are small in layers but carry Qwen-VL's real 151,936-token vocabulary
(157 MB and 318 MB), the CLIP weights are 0.5 GB, and pytest keeps the temporary folders of the last
three sessions. So every checkpoint and weights file is made once per session here (tests that need a
changed copy write it into their tmp_path), removed when the session ends, and the big files a test
leaves in its tmp_path are removed when it passes (remove_big_files; a failed test keeps them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

BIG_FILE = 1 << 20  # checkpoints, weights, logits; the configs, CSVs and samples a test writes stay for a look
REPO = Path(__file__).resolve().parent.parent
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"]

# question, ten answers (TextVQA's annotators disagree; the cases cover exact, partial and no match)
QUESTIONS = [
    ("what is the brand of this camera?", ["dakota"] * 7 + ["dakota digital"] * 3),
    ("what number is on the jersey?", ["22"] * 4 + ["twenty two"] * 2 + ["2"] * 4),
    ("what does the sign say?", ["stop"] * 10),
    ("what color is the cup?", ["white"] * 5 + ["blue"] * 5),
]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A few real photographs as JPEG/PNG files."""
    import numpy as np
    import skimage.data
    from PIL import Image

    out = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        Image.fromarray(arr).save(out / f"{name}.{'jpg' if i % 2 == 0 else 'png'}")
    return out


def make_textvqa(root: Path, photo_dir: Path, n: int = 8, relative: bool = True) -> Path:
    """Write textvqa_val.jsonl + textvqa_val_annotations.json (+ train_images/) like the seed's data."""
    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    photos = sorted(photo_dir.iterdir())
    rows, annotations = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        shutil.copy(photo, images / photo.name)
        question, answers = QUESTIONS[i % len(QUESTIONS)]
        qid = 34602 + i
        image = f"train_images/{photo.name}" if relative else str(images / photo.name)
        rows.append({"image": image, "question": question, "question_id": qid, "answer": answers[0]})
        annotations.append({
            "question_id": qid,
            "image_id": photo.stem,
            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)],
        })  # fmt: skip
    path = root / "textvqa_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return path


@pytest.fixture
def textvqa(tmp_path, photo_dir) -> Path:
    return make_textvqa(tmp_path / "textvqa", photo_dir)


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def task_yaml(tmp_path, textvqa) -> Path:
    return write_yaml(tmp_path / "cfg" / "textvqa.yaml", {
        "task_type": "precision",
        "task_name": "textvqa",
        "local_dataset_path": str(textvqa),
        "metric": {"metric_type": "vqa_accuracy", "normalizer": "evalai"},
        "subject_mapping": {"textvqa": {"name": "textvqa"}},
    })  # fmt: skip


def build_tiny_qwen2vl(out: Path, variant: str = "qwen2_vl") -> Path:
    """A random Qwen2-VL (2 layers, hidden 64, 2 KV heads) with a small byte-level BPE tokenizer, a chat
    template and Qwen2-VL's own image processor (at most 112 x 112 pixels), saved with save_pretrained
    (benchmarks/qwen2_vl_checkpoint.py). variant "qwen2_5_vl": Qwen2.5-VL (its vision tower: 4 blocks,
    windows of 56 px, full attention in blocks 1 and 3)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qwen2_vl_checkpoint", REPO / "benchmarks" / "qwen2_vl_checkpoint.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    vision = (dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, window_size=56,
                   fullatt_block_indexes=[1, 3]) if variant == "qwen2_5_vl" else
              dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2))  # fmt: skip
    corpus = [q for q, _ in QUESTIONS] * 10 + ["user assistant Answer: stop white 22"] * 10
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # fmt: skip
    return writer.write_qwen2_vl(out, corpus, variant, vocab=400, text=text, vision=vision, max_pixels=112 * 112)


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5vl(tmp_path_factory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2_5vl") / "tiny-qwen2.5-vl", "qwen2_5_vl")


@pytest.fixture
def hf_model_yaml(tmp_path, tiny_qwen2vl) -> Path:
    return write_yaml(tmp_path / "cfg" / "tiny.yaml", {
        "model_name": "tiny_qwen2_vl",
        "model_path": str(tiny_qwen2vl),
        "data_type": "fp32",
        "backend": "hf",
        "mm_model": {"infer_params": {"max_output_length": 6}},
    })  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- tiny Qwen-VL checkpoints in the original on-disk format (real 151,936-token vocabulary) ----


@pytest.fixture(scope="session")
def qwen_vl_ckpt(tmp_path_factory) -> Path:
    """hidden 128, 2 layers, 4 heads; vision width 64, 2 layers; fp32; two safetensors shards + index."""
    from engine.models.qwen_vl.random_checkpoint import tiny_config, write_random_checkpoint

    folder = tmp_path_factory.mktemp("qwen_vl")
    yield write_random_checkpoint(folder / "tiny-qwen-vl", tiny_config(), seed=0)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def qwen_vl_ckpt_short(tmp_path_factory) -> Path:
    """hidden 256 (two resampler heads), seq_length 32 so dynamic NTK and log-n scaling act on short
    prompts; vision width 256 == output_dim (the resampler's kv_proj is the identity); .bin file."""
    from engine.models.qwen_vl.random_checkpoint import tiny_config, write_random_checkpoint

    cfg = tiny_config(hidden_size=256, seq_length=32, visual_width=256, visual_layers=1)
    folder = tmp_path_factory.mktemp("qwen_vl")
    yield write_random_checkpoint(folder / "tiny-qwen-vl-short", cfg, seed=1, fmt="bin", shards=1)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def qwen_vl_llm(qwen_vl_ckpt):
    """The engine on `qwen_vl_ckpt`, fp32 on CPU, shared by tests that only generate."""
    from engine import LLM

    return LLM(qwen_vl_ckpt, dtype="float32", device="cpu", max_batch_size=8, max_model_len=4096,
               num_blocks=256, block_size=16, progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def clip_weights(tmp_path_factory) -> dict[str, Path]:
    """open_clip's ViT-S-32 with random weights (seed 0), as a torch .bin and as .safetensors: one copy
    for every module that scores captions (test_clip_score, test_compare, test_nightly)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("clip_weights")
    torch.manual_seed(0)
    state = open_clip.create_model("ViT-S-32").state_dict()
    torch.save(state, out / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "open_clip_model.safetensors")
    yield {"bin": out / "open_clip_pytorch_model.bin", "safetensors": out / "open_clip_model.safetensors"}
    shutil.rmtree(out, ignore_errors=True)


def remove_big_files(root: Path) -> None:
    """Delete the files of BIG_FILE bytes or more below `root` (symbolic links are neither followed nor
    removed; a hard link to a shared file only loses this name)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            try:
                if not path.is_symlink() and path.stat().st_size >= BIG_FILE:
                    path.unlink()
            except FileNotFoundError:
                pass


_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.stash[_PASSED] = report.passed


@pytest.fixture(autouse=True)
def _drop_big_files(request):
    """After a test that passed: the checkpoints, weights and logits it wrote into its tmp_path go (a
    changed checkpoint copy is 77-490 MB); a failed test keeps everything for a look."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None and request.node.stash.get(_PASSED, False):
        remove_big_files(tmp)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny-model steps: their ops are far too small for intra-op threads, and on a
    busy 2-core machine the threads' spin-waits made them ~10x slower. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
