"""Protects scripts/nightly.sh end to end on the tiny Qwen-VL (engine, CPU), three "nights":

- night 1 and 2 (fp32): TextVQA and captions run, are recorded in the history and compared with it
  (the first run of each is the baseline), the captions' CLIP scores are gated against a reference
  run, the report (HTML + PNG) is written: exit 0;
- night 3 (bf16): TextVQA answers change against references that are the fp32 answers: the comparison
  FAILs, every other step still runs, the report marks the FAIL, the script exits 1;
- a missing MODEL_CONFIG is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa  # noqa: E402
from test_clip_score import MODEL as CLIP_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for key in ("WORLD_SIZE", "RANK", "MODELTEST_HISTORY", "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _nightly(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/nightly.sh")], env=_env(**env), capture_output=True, text=True,
                          timeout=600, cwd=REPO)  # fmt: skip


@pytest.fixture(scope="module")
def setup(qwen_vl_ckpt, photo_dir, clip_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    models = {}
    for dtype in ("fp32", "bf16"):
        models[dtype] = root / f"tiny-{dtype}.yaml"
        models[dtype].write_text(yaml.safe_dump({
            "model_name": "tiny_qwen_vl", "model_path": str(qwen_vl_ckpt), "data_type": dtype, "block_size": 16,
            "mm_model": {"infer_params": {"max_output_length": 5}}}))  # fmt: skip
    textvqa = make_textvqa(root / "textvqa", photo_dir, n=6)
    images = root / "coco"
    images.mkdir()
    for p in sorted(photo_dir.iterdir())[:3]:
        shutil.copy(p, images / p.name)
    # the fp32 answers become the references: an fp32 night scores 1.0, an answer that changes scores 0
    probe = root / "probe"
    from modeltest.cli import main

    args = ["--model_config_path", str(models["fp32"]), "--device", "cpu", "--no_progress"]
    assert main([*args, "--task_config_path", str(REPO / "configs/task/textvqa.yaml"), "--dataset_path",
                 str(textvqa), "--output_dir", str(probe / "t")]) == 0  # fmt: skip
    answers = {json.loads(x)["id"]: json.loads(x)["prediction"]
               for x in next((probe / "t").rglob("samples.jsonl")).read_text().splitlines()}  # fmt: skip
    ann = textvqa.parent / "textvqa_val_annotations.json"
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        a["answers"] = [{"answer": answers[a["question_id"]], "answer_id": j + 1} for j in range(10)]
    ann.write_text(json.dumps(doc))
    # the reference run of the captions (as a GPU run would be): its rst file
    assert main([*args, "--task_config_path", str(REPO / "configs/task/coco_caption.yaml"), "--dataset_path",
                 str(images), "--output_dir", str(probe / "c")]) == 0  # fmt: skip
    reference = next((probe / "c").rglob("*_coco_rst.json"))
    common = dict(TEXTVQA_DATA=textvqa, COCO_IMAGES=images, CLIP_WEIGHTS=clip_weights["bin"], CLIP_MODEL=CLIP_MODEL,
                  CLIP_REFERENCE=reference, OUT_ROOT=root / "nights", DEVICE="cpu")  # fmt: skip
    return models, common, root


def test_three_nights(setup):
    models, common, root = setup
    for night in ("night-1", "night-2"):
        res = _nightly(MODEL_CONFIG=models["fp32"], NIGHT=night, **common)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"nightly {night}: PASS" in res.stderr
        for step in ("textvqa run: ok", "textvqa compare: ok", "captions run: ok", "captions compare: ok",
                     "captions CLIP score against the reference: ok", "report: ok"):  # fmt: skip
            assert step in res.stderr
    res = _nightly(MODEL_CONFIG=models["bf16"], NIGHT="night-3", **common)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "textvqa compare: exit 1" in res.stderr and "report: ok" in res.stderr  # the rest still ran

    db = root / "nights" / "history.db"
    con = sqlite3.connect(db)
    rows = con.execute("SELECT task, dtype, verdict FROM runs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["textvqa", "coco_caption"] * 3
    assert [r[2] for r in rows if r[0] == "textvqa"] == ["PASS", "PASS", "FAIL"]
    assert [r[1] for r in rows][-2:] == ["bf16", "bf16"]
    report = (root / "nights" / "report.html").read_text()
    assert "class='fail'" in report and "data:image/png;base64," in report
    assert (root / "nights" / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same night again resumes: nothing recomputed, the same verdicts
    again = _nightly(MODEL_CONFIG=models["fp32"], NIGHT="night-2", **common)
    assert again.returncode == 0, again.stderr[-3000:]


def test_missing_model_config_is_one_line():
    res = _nightly(TEXTVQA_DATA="x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "MODEL_CONFIG is not set" in res.stderr
