"""Protects the logits mode (need_logits: true, `modeltest compare --logits`) on the tiny Qwen-VL:

- a run keeps the output distributions (float32, the whole vocabulary) of the first 16 tokens of the
  first 8 samples, in the debug folder, named in their records;
- the same engine run twice: KL 0 on every token, no divergence, PASS;
- fp32 against bf16: KL > 0, equal to a direct computation from the stored distributions over the
  positions where both runs had generated the same tokens so far, the first divergence of each sample
  reported, and the seed's rule (max KL <= 1e-3, share of tokens above 1e-4 <= 0.5%) applied;
- need_logits on a backend that returns no distributions is refused before any work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from modeltest.cli import main
from modeltest.compare import logits_rule

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa, remove_big_files  # noqa: E402


@pytest.fixture(scope="module")
def runs(qwen_vl_ckpt, photo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    data = make_textvqa(root / "data", photo_dir, n=10)
    task = root / "task.yaml"
    task.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(data), "need_logits": True}))
    out = {}
    for name, dtype in (("a", "fp32"), ("b", "fp32"), ("bf16", "bf16")):
        model = root / f"{dtype}.yaml"
        model.write_text(yaml.safe_dump({"model_name": "tiny", "model_path": str(qwen_vl_ckpt), "data_type": dtype,
                                         "block_size": 16, "mm_model": {"infer_params": {"max_output_length": 6}}}))  # fmt: skip
        out[name] = root / name
        assert main(["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu",
                     "--no_progress", "--output_dir", str(out[name])]) in (0, 3)  # fmt: skip
    yield out, task
    remove_big_files(root)  # the kept distributions: 3.6 MB a sample


def _records(out: Path) -> tuple[Path, dict]:
    path = next(out.rglob("samples.jsonl"))
    return path.parent, {json.loads(x)["id"]: json.loads(x) for x in path.read_text().splitlines()}


def test_a_run_keeps_the_distributions_of_its_first_samples(runs):
    out, _ = runs
    folder, recs = _records(out["a"])
    kept = sorted(i for i, r in recs.items() if r.get("logits"))
    assert kept == sorted(recs)[:8]  # the first 8 of 10 samples, in dataset order
    data = load_file(str(folder / recs[kept[0]]["logits"]))
    assert data["logprobs"].dtype == np.float32 and data["logprobs"].shape == (6, 151936)
    assert data["token_ids"].tolist() == data["logprobs"].argmax(axis=1).tolist()  # greedy: the argmax
    assert np.allclose(np.log(np.exp(data["logprobs"].astype(np.float64)).sum(axis=1)), 0, atol=1e-4)


def _compare(base: Path, cand: Path, out: Path) -> tuple[int, dict]:
    code = main(["compare", str(base), str(cand), "--logits", "--output", str(out), "--max_drop", "1"])
    return code, json.loads((out / "compare.json").read_text())["tasks"][0]["logits"]


def test_the_same_run_twice_gives_kl_zero(runs, tmp_path):
    out, _ = runs
    code, logits = _compare(out["a"], out["b"], tmp_path / "c")
    assert code == 0 and logits["verdict"] == "PASS" and logits["max_kl"] == 0.0
    assert logits["tokens"] == 8 * 6 and all(s["first_divergence"] is None for s in logits["samples"])


def test_fp32_against_bf16_gives_the_direct_kl(runs, tmp_path):
    out, _ = runs
    code, logits = _compare(out["a"], out["bf16"], tmp_path / "c")
    fa, ra = _records(out["a"])
    fb, rb = _records(out["bf16"])
    expected = []
    for s in logits["samples"]:
        a = load_file(str(fa / ra[s["id"]]["logits"]))
        b = load_file(str(fb / rb[s["id"]]["logits"]))
        same = 0
        while same < 6 and a["token_ids"][same] == b["token_ids"][same]:
            same += 1
        assert s["first_divergence"] == (same if same < 6 else None)
        upto = min(6, same + 1)
        pa, la, lb = np.exp(a["logprobs"][:upto].astype(np.float64)), a["logprobs"][:upto], b["logprobs"][:upto]
        kl = (pa * (la.astype(np.float64) - lb.astype(np.float64))).sum(axis=1)
        assert s["kl"] == pytest.approx(kl.tolist(), rel=1e-9, abs=1e-12)
        expected += kl.tolist()
    assert logits["max_kl"] == pytest.approx(max(expected)) and max(expected) > 0
    assert logits["high_kl_share"] == pytest.approx(sum(k > 1e-4 for k in expected) / len(expected))
    rule = max(expected) <= 1e-3 and logits["high_kl_share"] <= 0.005
    assert logits["verdict"] == ("PASS" if rule else "FAIL") and code == (0 if rule else 1)


def test_compare_logits_on_runs_without_distributions_is_refused(runs, tmp_path, capsys):
    import shutil

    out, _ = runs
    bare = tmp_path / "bare"
    shutil.copytree(out["b"], bare)
    path = next(bare.rglob("samples.jsonl"))
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "logits"}) + "\n" for r in recs))
    assert main(["compare", str(out["a"]), str(bare), "--logits", "--output", str(tmp_path / "c")]) == 2
    assert "no sample has stored log-probabilities in both runs" in capsys.readouterr().err


def test_need_logits_needs_the_engine(runs, tmp_path, capsys):
    _, task = runs
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"question_id": 34602, "answer": "x"}) + "\n")
    assert main(["--task_config_path", str(task), "--predictions", str(preds), "--output_dir", str(tmp_path)]) == 2
    assert "need_logits: true needs the engine backend" in capsys.readouterr().err


@pytest.mark.parametrize("kls, verdict", [
    ([0.0] * 10, "PASS"),
    ([1e-3] + [0.0] * 999, "PASS"),  # the bound itself passes
    ([1.1e-3] + [0.0] * 999, "FAIL"),  # one token over the maximum
    ([5e-4] * 5 + [0.0] * 995, "PASS"),  # 0.5% high
    ([5e-4] * 6 + [0.0] * 994, "FAIL"),  # 0.6% high
])  # fmt: skip
def test_the_seeds_logits_rule(kls, verdict):
    r = logits_rule(kls)
    assert r["verdict"] == verdict and r["tokens"] == len(kls) and r["max_kl"] == max(kls)
