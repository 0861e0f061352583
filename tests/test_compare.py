"""Protects `modeltest compare` and the statistics behind every verdict (modeltest/stats.py):

- the paired statistics equal their formulas (mean difference, standard error, bootstrap and closed
  form intervals, one-sided p-value), and the two gates decide as documented;
- two real runs of the tiny Qwen-VL on the engine: the same run again PASSes with nothing changed; a
  bf16 run against the fp32 baseline (whose references are its own answers) FAILs, and PASSes with a
  --max_drop above its drop; compare.json and compare.csv hold what the issue lists;
- runs over different data are refused with the differences, or compared on the shared samples with
  --allow_different; exit codes 0 / 1 / 2;
- caption runs' per-image CLIP scores (clip_score outputs) compare the same way, and
  `clip_score --reference` gives the same verdict (one implementation).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from modeltest.cli import main
from modeltest.stats import Z95, bootstrap_ci, normal_cdf, paired, verdict

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa  # noqa: E402

# ---- the statistics ----------------------------------------------------------------------------------


def test_paired_statistics_follow_their_formulas():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 200)
    cand = np.clip(base + rng.normal(-0.05, 0.1, 200), 0, 1)
    s = paired(base, cand)
    d = cand - base
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert s.diff == pytest.approx(d.mean()) and s.stderr == pytest.approx(se)
    assert s.ci95_normal == pytest.approx((d.mean() - Z95 * se, d.mean() + Z95 * se))
    assert s.p_value == pytest.approx(normal_cdf(d.mean() / se)) and s.p_value < 1e-3  # clearly worse
    boot = np.random.default_rng(0).integers(0, d.size, size=(10_000, d.size))
    assert s.ci95 == pytest.approx(tuple(np.percentile(d[boot].mean(axis=1), [2.5, 97.5])))
    assert bootstrap_ci(d) == s.ci95  # seeded: the same interval every time
    assert (s.improved, s.regressed, s.unchanged) == (int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum()))
    assert s.drop == pytest.approx(-d.mean())
    lower = paired(base, cand, higher_is_better=False)  # a smaller value is better: the same change helps
    assert lower.drop == pytest.approx(d.mean()) and lower.p_value == pytest.approx(1 - s.p_value)


def test_gates():
    noisy = paired([1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0])  # drop 1/6, far from significant
    assert noisy.drop == pytest.approx(1 / 6) and noisy.p_value > 0.2
    assert verdict(noisy, max_drop=0.01) == "FAIL"
    assert verdict(noisy, max_drop=0.01, gate="stat") == "PASS"
    assert verdict(noisy, max_drop=0.2) == verdict(noisy, max_drop=0.2, gate="stat") == "PASS"
    certain = paired([0.5] * 6, [0.4] * 6)  # the same drop on every sample: se 0, p 0
    assert certain.p_value == 0.0 and verdict(certain, 0.01, "stat") == "FAIL"
    assert paired([0.5] * 3, [0.5] * 3).p_value == 1.0


# ---- two real runs of the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(qwen_vl_ckpt, photo_dir, tmp_path_factory):
    """fp32 runs (baseline and again) and a bf16 run of the tiny Qwen-VL over one TextVQA set whose
    references are the fp32 answers, so the baseline scores 1.0 and a changed answer scores 0."""
    root = tmp_path_factory.mktemp("compare")
    data = make_textvqa(root / "probe", photo_dir, n=6)

    def config(dtype: str, dataset: Path) -> list[str]:
        model = root / f"{dtype}.yaml"
        model.write_text(yaml.safe_dump({"model_name": "tiny", "model_path": str(qwen_vl_ckpt), "data_type": dtype,
                                         "block_size": 16, "mm_model": {"infer_params": {"max_output_length": 4}}}))  # fmt: skip
        task = root / f"task-{dataset.parent.name}.yaml"
        task.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(dataset)}))
        return ["--model_config_path", str(model), "--task_config_path", str(task), "--device", "cpu", "--no_progress"]

    assert main([*config("fp32", data), "--output_dir", str(root / "probe-out")]) == 0
    answers = {json.loads(x)["id"]: json.loads(x)["prediction"]
               for x in next((root / "probe-out").rglob("samples.jsonl")).read_text().splitlines()}  # fmt: skip
    ann = data.parent / "textvqa_val_annotations.json"
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        a["answers"] = [{"answer": answers[a["question_id"]], "answer_id": j + 1} for j in range(10)]
    ann.write_text(json.dumps(doc))
    out = {}
    for name, dtype in (("baseline", "fp32"), ("again", "fp32"), ("bf16", "bf16")):
        assert main([*config(dtype, data), "--output_dir", str(root / name)]) in (0, 3)
        out[name] = root / name
    return out


def _compare(*args: str) -> tuple[int, dict]:
    code = main(["compare", *map(str, args)])
    cand = Path(args[1])
    out = Path(args[args.index("--output") + 1]) if "--output" in args else cand
    return code, json.loads((out / "compare.json").read_text())


def test_the_same_run_again_passes(runs):
    code, result = _compare(runs["baseline"], runs["again"])
    (task,) = result["tasks"]
    assert code == 0 and result["verdict"] == "PASS" and task["verdict"] == "PASS"
    assert task["baseline"] == task["candidate"] == 1.0 and task["diff"] == 0.0 and task["n"] == 6
    assert task["changed_predictions"] == 0 and task["regressed"] == [] and task["improved"] == []
    rows = list(csv.DictReader(open(runs["again"] / "compare.csv")))
    assert rows == []  # nothing changed, nothing listed


def test_a_regressed_run_fails_and_a_larger_max_drop_passes(runs, tmp_path, capsys):
    code, result = _compare(runs["baseline"], runs["bf16"], "--output", tmp_path / "c")
    (task,) = result["tasks"]
    bf16 = {json.loads(x)["id"]: json.loads(x) for x in next(runs["bf16"].rglob("samples.jsonl")).read_text().splitlines()}
    changed = sorted(i for i, r in bf16.items() if r["score"] < 1.0)
    assert changed, "bf16 was expected to change some answers of the random model"
    assert code == 1 and result["verdict"] == "FAIL" and task["verdict"] == "FAIL"
    assert task["regressed"] == changed and task["candidate"] == pytest.approx(1 - len(changed) / 6)
    assert task["diff"] == pytest.approx(-len(changed) / 6) and task["n"] == 6
    for key in ("task", "metric", "baseline", "candidate", "diff", "stderr", "ci95", "p_value", "n", "improved",
                "regressed", "changed_predictions", "verdict"):
        assert key in task
    base = {json.loads(x)["id"]: json.loads(x) for x in next(runs["baseline"].rglob("samples.jsonl")).read_text().splitlines()}
    differ = {i for i in base if base[i]["prediction"] != bf16[i]["prediction"]}
    assert task["changed_predictions"] == len(differ) >= len(changed)
    rows = list(csv.DictReader(open(tmp_path / "c" / "compare.csv")))
    assert {int(r["id"]) for r in rows} == differ  # one row per changed sample
    assert all(r["baseline_prediction"] == base[int(r["id"])]["prediction"] for r in rows)
    assert "most regressed samples" in capsys.readouterr().out
    drop = len(changed) / 6
    assert _compare(runs["baseline"], runs["bf16"], "--output", tmp_path / "d", "--max_drop", drop + 0.01)[0] == 0


def test_a_task_the_candidate_lacks_fails(runs, tmp_path):
    import shutil

    base = tmp_path / "two-tasks"
    shutil.copytree(runs["baseline"], base)
    (base / "cpu_coco_rst_clip_score.csv").write_text("image,caption,scored_text,cos,clip_s\na.jpg,a cat,a cat,0.3,0.75\n")
    (base / "cpu_coco_rst_clip_score.json").write_text(json.dumps({"clip_score": 0.3}))
    code, result = _compare(base, runs["again"])
    assert code == 1 and result["verdict"] == "FAIL" and result["missing_in_candidate"] == ["clip_score"]
    assert [t["verdict"] for t in result["tasks"]] == ["PASS"]


def test_runs_over_different_data(runs, photo_dir, tmp_path, capsys):
    other = make_textvqa(tmp_path / "other", photo_dir, n=8)  # two more questions, other references
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"question_id": 34602 + i, "answer": "x"}) + "\n" for i in range(8)))
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(other)}))
    assert main(["--task_config_path", str(task), "--predictions", str(preds), "--output_dir", str(tmp_path / "o"),
                 "--no_progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["compare", str(runs["baseline"]), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over different data" in err and "2 sample(s) only in the candidate" in err
    assert "--allow_different" in err
    code, result = _compare(runs["baseline"], tmp_path / "o", "--allow_different")
    assert code == 1 and result["tasks"][0]["n"] == 6 and result["tasks"][0]["not_compared"]
    assert main(["compare", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("change, refused", [
    ({"normalizer": "vqaeval"}, "the baseline's vqa_accuracy follows the evalai evaluator, the candidate's vqaeval"),
    ({"complete": False}, "the run has not finished"),
    ({"paths": "elsewhere"}, None),  # a damaged field the layout does not need: still read
])  # fmt: skip
def test_runs_that_cannot_be_compared_are_refused(runs, tmp_path, capsys, change, refused):
    """Scores made with another answer processing, and the results-so-far of an unfinished run, are
    not compared (a regression would be the evaluator's or the missing samples', not the model's)."""
    import shutil

    cand = tmp_path / "cand"
    shutil.copytree(runs["again"], cand)
    result_json = next(cand.rglob("*_result.json"))
    result_json.write_text(json.dumps({**json.loads(result_json.read_text()), **change}))
    capsys.readouterr()
    code = main(["compare", str(runs["baseline"]), str(cand), "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err
    if refused is None:
        assert code == 0
    else:
        assert code == 2 and err.count("\n") == 1 and refused in err


@pytest.mark.parametrize("table, message", [
    ("image,caption\na.jpg,a cat\n", ":2: not a clip_score row"),
    ("image,caption,cos\na.jpg,a cat,high\n", ":2: not a clip_score row"),
    (b"image,caption,cos\n\xff.jpg,a cat,0.3\n", "not UTF-8"),
])  # fmt: skip
def test_a_damaged_clip_score_table_is_one_line(tmp_path, capsys, table, message):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "x_clip_score.json").write_text(json.dumps({"clip_score": 0.3}))
        good = "image,caption,cos\na.jpg,a cat,0.3\n"
        data = table if side == "b" else good
        (tmp_path / side / "x_clip_score.csv").write_bytes(data if isinstance(data, bytes) else data.encode())
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "x_clip_score.csv" in err


def test_official_and_qwen_vl_are_one_evaluator(runs, tmp_path):
    import shutil

    for name, normalizer in (("b", "official"), ("c", "qwen_vl")):
        shutil.copytree(runs["again"], tmp_path / name)
        f = next((tmp_path / name).rglob("*_result.json"))
        f.write_text(json.dumps({**json.loads(f.read_text()), "normalizer": normalizer}))
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "c"), "--output", str(tmp_path / "o")]) == 0


# ---- CLIP scores ------------------------------------------------------------------------------------

from test_clip_score import CAPTIONS, run_cli  # noqa: E402


def test_clip_scores_compare_like_any_run(clip_weights, photo_dir, tmp_path):
    ref = tmp_path / "gpu_coco_rst.json"
    ref.write_text(json.dumps(CAPTIONS))
    worse = dict(CAPTIONS, **{"coffee.png": "a rocket", "astronaut.jpg": "a cup"})
    cand = tmp_path / "npu_coco_rst.json"
    cand.write_text(json.dumps(worse))
    for path in (ref, cand):
        assert run_cli(path, photo_dir, clip_weights["bin"]) == 0
    gated = run_cli(cand, photo_dir, clip_weights["bin"], "--reference", str(ref), "--tolerance", "0.0")
    summary = json.loads((tmp_path / "npu_coco_rst_clip_score.json").read_text())
    code, result = _compare(tmp_path / "gpu_coco_rst_clip_score.json", tmp_path / "npu_coco_rst_clip_score.json",
                            "--max_drop", "0.0", "--output", tmp_path / "cmp")  # fmt: skip
    (task,) = result["tasks"]
    assert task["metric"] == "clip_score" and task["n"] == len(CAPTIONS)
    # the separate runs batch the captions differently from --reference's joint run: float rounding only
    assert task["diff"] == pytest.approx(summary["comparison"]["mean_diff"], abs=1e-6)
    assert task["ci95"] == pytest.approx(summary["comparison"]["ci95"], abs=1e-6)
    assert {"PASS": 0, "FAIL": 1}[task["verdict"]] == code == gated  # one verdict, two ways to ask
    rows = {r["id"]: float(r["gain"]) for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    moved = {i for i, g in rows.items() if abs(g) > 1e-5}  # the same caption may differ by float rounding
    assert moved == {"astronaut.jpg", "coffee.png"}
