"""Protects `python -m modeltest.clip_score` and modeltest.metrics.clip: per-image scores equal the seed's
computation (open_clip called directly, one image at a time, on the same weights file), batching,
both caption formats, .bin and safetensors weights, grounding markup stripped for scoring only, missing
and unreadable images, empty captions, reference mode with its bootstrap interval, verdict and exit
codes, and one-line errors for weights that do not fit and for bad input.

The model is open_clip's ViT-S-32 with random weights saved by the test; the images are real photos."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeltest.clip_score import main
from modeltest.metrics.clip import ClipScorer, clip_s, compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "ViT-S-32"
LONG = " ".join(["a very long caption about a cat sitting on a red chair"] * 12)  # > 77 tokens: truncated
CAPTIONS = {
    "astronaut.jpg": "<ref>An astronaut</ref><box>(120,40),(380,500)</box> holding a helmet by a flag.",
    "coffee.png": "a cup of coffee on a saucer",
    "chelsea.jpg": LONG,
    "rocket.png": "a rocket on the launch pad <ref>tower</ref><box>(1,2),(30,400)</box>",
    "immunohistochemistry.jpg": "stained tissue under a microscope",
    "camera.png": "",  # an empty caption is reported and scored as it is
}


@pytest.fixture(scope="module")
def weights(clip_weights) -> dict[str, Path]:
    """ViT-S-32 (MODEL) with random weights, as a torch .bin and as .safetensors: conftest's one copy."""
    return clip_weights


@pytest.fixture(scope="module")
def seed_scores(weights, photo_dir):
    """The seed's computation, independently: open_clip loads the file itself, one image at a time."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(weights["bin"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)

    @functools.cache
    def encode_image(image: str):
        with torch.no_grad():
            return model.encode_image(preprocess(Image.open(photo_dir / image)).unsqueeze(0))

    def score(image: str, text: str) -> float:
        with torch.no_grad():
            cos = F.cosine_similarity(
                encode_image(image).float(), model.encode_text(tokenizer([text])).float()
            )
        return cos.item()

    return score


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def run_cli(captions: Path, photo_dir: Path, weights: Path, *extra: str, model: str = MODEL) -> int:
    argv = [
        "--image_info",
        str(captions),
        "--dataset_path",
        str(photo_dir),
        "--model_weights_path",
        str(weights),
    ]
    return main([*argv, "--model_name", model, "--device", "cpu", "--no_progress", *extra])


def outputs(captions: Path) -> tuple[dict[str, dict], dict]:
    stem = captions.with_suffix("")
    summary = json.loads(Path(f"{stem}_clip_score.json").read_text(encoding="utf-8"))
    return read_csv(Path(f"{stem}_clip_score.csv")), summary


def one_error_line(err: str) -> str:
    """The error is one line (warnings about the input may come before it) and no traceback."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("clip_score: warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("clip_score: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- scores


def test_scores_match_the_seed_computation(tmp_path, photo_dir, weights, seed_scores, capsys):
    from modeltest.metrics.grounding import strip_grounding

    captions = write_json(tmp_path / "npu_coco_rst.json", CAPTIONS)
    # 6 images in batches of 4: a full and a partial batch
    assert run_cli(captions, photo_dir, weights["bin"], "--batch_size", "4", "--num_workers", "2") == 0
    out = capsys.readouterr()
    assert "1 empty captions" in out.err and "camera.png" in out.err
    assert "clip_score" in out.out and "CLIP-S" in out.out
    rows, summary = outputs(captions)
    assert list(rows) == list(CAPTIONS)  # the captions file's order
    expected = {image: seed_scores(image, strip_grounding(text)) for image, text in CAPTIONS.items()}
    for image, text in CAPTIONS.items():
        row = rows[image]
        assert row["caption"] == text  # raw, markup kept
        assert row["scored_text"] == strip_grounding(text) and "<box>" not in row["scored_text"]
        assert float(row["cos"]) == pytest.approx(expected[image], abs=1e-5)
        assert float(row["clip_s"]) == pytest.approx(2.5 * max(expected[image], 0.0), abs=1e-5)
    cos = np.array(list(expected.values()))
    assert summary["clip_score"] == pytest.approx(cos.mean(), abs=1e-5)
    assert summary["clip_s"] == pytest.approx((2.5 * np.maximum(cos, 0)).mean(), abs=1e-5)
    assert (summary["num_images"], summary["num_missing"], summary["num_empty_captions"]) == (6, 0, 1)
    assert summary["model_name"] == MODEL
    assert summary["weights_sha256"] == hashlib.sha256(weights["bin"].read_bytes()).hexdigest()
    assert summary["config"]["batch_size"] == 4 and summary["config"]["precision"] == "fp32"


def test_long_captions_are_truncated_not_refused(weights, photo_dir, seed_scores):
    scorer = ClipScorer(MODEL, weights["bin"], "cpu")
    long_cos = scorer.score([photo_dir / "chelsea.jpg"], [[LONG + " and a dog"]]).cos[0, 0]
    assert long_cos == pytest.approx(seed_scores("chelsea.jpg", LONG), abs=1e-5)  # the tail is past 77 tokens


def test_text_tower_skips_padding(weights):
    """CLIP's causal text tower pooled at EOT: texts are sorted by length into buckets, each computed only
    up to its longest text; the features equal open_clip's full 77-token encode_text, in the input order."""
    import torch

    scorer = ClipScorer(MODEL, weights["bin"], "cpu")
    texts = [f"caption number {i} " + "word " * (i % 11) for i in range(40)] + ["", LONG]
    row, buckets = scorer.tokenize(texts)
    assert scorer.trim_text and len(buckets) == 4  # on the CPU: up to 4 buckets of >= 8 texts
    assert sum(len(b) for b in buckets) == len(texts)
    assert [b.shape[1] for b in buckets] == sorted(b.shape[1] for b in buckets)
    # on the CPU each bucket ends at its longest text's EOT (the highest token id)
    assert all(int(b.argmax(dim=-1).max()) == b.shape[1] - 1 for b in buckets)
    assert buckets[-1].shape[1] == 77  # the long caption, truncated by open_clip's tokenizer
    with torch.inference_mode():
        full = scorer.model.encode_text(scorer.tokenizer(texts))
        torch.testing.assert_close(scorer.encode_texts(buckets)[row], full, atol=1e-5, rtol=1e-5)


def test_safetensors_and_batch_size_give_the_same_scores(weights, photo_dir):
    images = [photo_dir / name for name in CAPTIONS]
    texts = [list(CAPTIONS.values())]
    from_bin = ClipScorer(MODEL, weights["bin"], "cpu", num_workers=1).score(images, texts, batch_size=1).cos
    from_st = (
        ClipScorer(MODEL, weights["safetensors"], "cpu", num_workers=3).score(images, texts, batch_size=5).cos
    )
    assert not np.isnan(from_bin).any()
    np.testing.assert_allclose(from_st, from_bin, atol=1e-5)
    assert np.ptp(from_bin) > 1e-3  # the images really score differently


@pytest.mark.parametrize("precision, dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_low_precision_follows_open_clip(weights, photo_dir, precision, dtype):
    """open_clip's fp16/bf16: linear and conv weights cast, LayerNorms kept fp32; inputs cast to match."""
    import torch

    images = [photo_dir / name for name in list(CAPTIONS)[:3]]
    texts = [list(CAPTIONS.values())[:3]]
    full = ClipScorer(MODEL, weights["bin"], "cpu").score(images, texts).cos
    low = ClipScorer(MODEL, weights["bin"], "cpu", precision)
    assert low.model.visual.conv1.weight.dtype == getattr(torch, dtype)
    assert low.model.ln_final.weight.dtype == torch.float32
    np.testing.assert_allclose(low.score(images, texts).cos, full, atol=5e-3)


def test_text_sets_share_image_embeddings(weights, photo_dir):
    """Two caption sets against the same images (reference mode); None leaves a pair unscored."""
    scorer = ClipScorer(MODEL, weights["bin"], "cpu")
    images = [photo_dir / "coffee.png", photo_dir / "rocket.png"]
    a, b = ["a cup of coffee", "a rocket"], ["a rocket", None]
    both = scorer.score(images, [a, b], batch_size=2).cos
    alone = scorer.score(images, [a], batch_size=1).cos
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)
    assert both[1, 0] == pytest.approx(scorer.score(images[:1], [["a rocket"]]).cos[0, 0], abs=1e-5)
    assert np.isnan(both[1, 1])


def test_older_format_scores_like_the_mapping(tmp_path, photo_dir, weights):
    new = write_json(tmp_path / "new.json", CAPTIONS)
    old = write_json(
        tmp_path / "old.json", {"image_file": list(CAPTIONS), "model_answer": list(CAPTIONS.values())}
    )
    assert run_cli(new, photo_dir, weights["bin"]) == 0
    assert run_cli(old, photo_dir, weights["bin"]) == 0
    rows_new, rows_old = outputs(new)[0], outputs(old)[0]
    assert list(rows_old) == list(rows_new)
    for image in CAPTIONS:
        assert rows_old[image]["caption"] == CAPTIONS[image]
        assert float(rows_old[image]["cos"]) == pytest.approx(float(rows_new[image]["cos"]), abs=1e-6)


# ---------------------------------------------------------------- missing and broken images


def test_missing_images_are_reported_counted_and_skipped(tmp_path, photo_dir, weights, capsys):
    captions = write_json(tmp_path / "caps.json", {**CAPTIONS, "gone_1.jpg": "x", "gone_2.jpg": "y"})
    out_dir = tmp_path / "out"
    assert run_cli(captions, photo_dir, weights["bin"], "--output_dir", str(out_dir)) == 0
    err = capsys.readouterr().err
    assert "2 of 8 images" in err and "gone_1.jpg" in err and "gone_2.jpg" in err
    summary = json.loads((out_dir / "caps_clip_score.json").read_text())
    assert (summary["num_listed"], summary["num_images"], summary["num_missing"]) == (8, 6, 2)
    assert summary["missing"] == ["gone_1.jpg", "gone_2.jpg"]
    assert set(read_csv(out_dir / "caps_clip_score.csv")) == set(CAPTIONS)

    assert (
        run_cli(captions, photo_dir, weights["bin"], "--output_dir", str(tmp_path / "strict"), "--strict")
        == 2
    )
    assert "gone_1.jpg" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "strict").exists()  # refused before any work


def test_unreadable_image_is_skipped_unless_strict(tmp_path, photo_dir, weights, capsys):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    captions = write_json(tmp_path / "caps.json", {"coffee.png": "a cup", "broken.jpg": "a picture"})
    assert run_cli(captions, images, weights["bin"]) == 0
    assert "broken.jpg" in capsys.readouterr().err
    rows, summary = outputs(captions)
    assert list(rows) == ["coffee.png"]
    assert (summary["num_images"], summary["num_unreadable"]) == (1, 1) and "broken.jpg" in summary[
        "unreadable"
    ]
    assert run_cli(captions, images, weights["bin"], "--strict") == 2
    assert "could not be read" in capsys.readouterr().err


# ---------------------------------------------------------------- reference mode


def test_reference_identical_captions_pass(tmp_path, photo_dir, weights, capsys):
    candidate = write_json(tmp_path / "npu_coco_rst.json", CAPTIONS)
    reference = write_json(tmp_path / "gpu_coco_rst.json", CAPTIONS)
    assert (
        run_cli(candidate, photo_dir, weights["bin"], "--reference", str(reference), "--tolerance", "0") == 0
    )
    assert "PASS" in capsys.readouterr().out
    rows, summary = outputs(candidate)
    cmp = summary["comparison"]
    assert cmp["verdict"] == "PASS" and cmp["num_shared"] == 6
    assert cmp["mean_diff"] == 0 and cmp["ci95"] == [0, 0] and cmp["share_worse"] == 0
    assert cmp["candidate_clip_score"] == pytest.approx(summary["clip_score"])
    assert all(float(r["diff"]) == 0 and r["ref_caption"] == r["caption"] for r in rows.values())


def test_reference_verdict_and_exit_code_follow_the_tolerance(
    tmp_path, photo_dir, weights, seed_scores, capsys
):
    """The reference always has the better of two captions; the candidate the worse one. The mean drop
    decides PASS (exit 0) or FAIL (exit 1) against the tolerance."""
    pool = ["a photo of a person", "a cup of hot coffee", "a cat", "a space rocket", "a laboratory sample",
            "a man with a camera"]  # fmt: skip
    images = list(CAPTIONS)[:5]
    candidate, reference, gaps = {}, {}, []
    for n, image in enumerate(images):
        a, b = pool[n], pool[n + 1]
        sa, sb = seed_scores(image, a), seed_scores(image, b)
        (worse, s_worse), (better, s_better) = sorted([(a, sa), (b, sb)], key=lambda t: t[1])
        candidate[image], reference[image] = worse, better
        gaps.append(s_better - s_worse)
    candidate["camera.png"] = "only the candidate has this one"
    reference["unlisted.jpg"] = "only the reference has this one"
    gaps = np.array(gaps)
    drop = gaps.mean()
    assert drop > 1e-4  # the random model tells the captions apart
    cand = write_json(tmp_path / "npu_coco_rst.json", candidate)
    ref = write_json(tmp_path / "gpu_coco_rst.json", reference)

    tolerance = drop / 2
    assert (
        run_cli(cand, photo_dir, weights["bin"], "--reference", str(ref), "--tolerance", str(tolerance)) == 1
    )
    out = capsys.readouterr()
    assert "FAIL" in out.out and "FAIL" in out.err
    rows, summary = outputs(cand)
    cmp = summary["comparison"]
    assert cmp["verdict"] == "FAIL"
    assert (cmp["num_shared"], cmp["only_in_candidate"], cmp["only_in_reference"]) == (5, 1, 1)
    assert cmp["mean_diff"] == pytest.approx(-drop, abs=1e-5)
    lo, hi = cmp["ci95"]
    assert lo <= cmp["mean_diff"] <= hi and lo >= -gaps.max() - 1e-6 and hi <= -gaps.min() + 1e-6
    assert cmp["share_worse"] == pytest.approx(np.mean(gaps > tolerance))
    assert summary["num_images"] == 6  # the candidate's own score covers all its images
    assert rows["camera.png"]["ref_cos"] == "" and float(rows["coffee.png"]["diff"]) < 0

    assert (
        run_cli(cand, photo_dir, weights["bin"], "--reference", str(ref), "--tolerance", str(2 * drop)) == 0
    )
    assert outputs(cand)[1]["comparison"]["verdict"] == "PASS"


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    ref = rng.normal(0.3, 0.05, 200)
    cand = ref - 0.02 + rng.normal(0, 0.01, 200)
    result = compare(cand, ref, tolerance=0.01)
    mean, (lo, hi) = result.mean_diff, result.ci95
    assert mean == pytest.approx(np.mean(cand - ref))
    assert lo < mean < hi and hi - lo < 0.01  # paired: the shared 0.05 spread cancels
    assert compare(cand, ref, tolerance=0.01).ci95 == (lo, hi)  # fixed seed
    same = compare([0.5, 0.7], [0.4, 0.6], tolerance=0.01)
    assert (same.mean_diff, *same.ci95) == pytest.approx((0.1, 0.1, 0.1))
    np.testing.assert_allclose(clip_s([-0.2, 0.0, 0.3, 0.5]), [0.0, 0.0, 0.75, 1.25])
    result = compare([0.30, 0.20, 0.31], [0.30, 0.30, 0.30], tolerance=0.02)
    assert result.verdict == "FAIL" and result.share_worse == pytest.approx(1 / 3)  # mean drop 0.03
    assert compare([0.30, 0.20, 0.31], [0.30, 0.30, 0.30], tolerance=0.04).passed


# ---------------------------------------------------------------- errors


def test_weights_that_do_not_fit_the_architecture(tmp_path, photo_dir, weights, capsys):
    import torch

    captions = write_json(tmp_path / "caps.json", CAPTIONS)
    assert run_cli(captions, photo_dir, weights["bin"], model="ViT-B-32") == 2
    line = one_error_line(capsys.readouterr().err)
    # the architecture the weights do fit, not hundreds of mismatching keys
    assert "does not fit open_clip model 'ViT-B-32'" in line and "shape mismatch" not in line
    assert line.endswith("but fits 'ViT-S-32': pass --model_name ViT-S-32")

    # no architecture fits: the keys that do not, and the closest architecture with how close it is
    state = torch.load(weights["bin"], weights_only=True)
    state["visual.extra.weight"] = state.pop("ln_final.weight")
    torch.save(state, tmp_path / "renamed.bin")
    assert run_cli(captions, photo_dir, tmp_path / "renamed.bin", model="ViT-B-32") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'ViT-B-32'" in line and "shape mismatch" in line
    assert "positional_embedding (77, 384) vs (77, 512)" in line  # the first mismatching key, both shapes
    assert "1 missing: ln_final.weight" in line and "1 unexpected: visual.extra.weight" in line
    n = len(state) + 1  # the file's tensors and ViT-S-32's ln_final.weight
    assert f"no open_clip architecture fits them exactly (the closest: 'ViT-S-32' ({n - 2}/{n} tensors fit)" in line
    assert run_cli(captions, photo_dir, tmp_path / "renamed.bin") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit open_clip model 'ViT-S-32': 1 missing: ln_final.weight; 1 unexpected: visual.extra.weight" in line

    import argparse

    # a training checkpoint that pickles its arguments: weights_only=True refuses it
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": state}, tmp_path / "pickled.bin")
    assert run_cli(captions, photo_dir, tmp_path / "pickled.bin") == 2
    assert "pickled.bin: cannot read weights" in one_error_line(capsys.readouterr().err)


def test_default_model_name_names_the_architecture_the_weights_fit(tmp_path, photo_dir, weights, capsys,
                                                                   monkeypatch):
    """The seed's default --model_name ViT-H-14 with other weights: one line that says which architecture
    they fit, found before the real ViT-H-14 (seconds to build on a CPU) is ever built."""
    import open_clip

    def never(*args, **kwargs):
        raise AssertionError("the full model was built for weights that do not fit it")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", never)
    captions = write_json(tmp_path / "caps.json", CAPTIONS)
    argv = ["--image_info", str(captions), "--dataset_path", str(photo_dir), "--model_weights_path",
            str(weights["safetensors"]), "--device", "cpu", "--no_progress"]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit open_clip model 'ViT-H-14'" in line
    assert line.endswith("but fits 'ViT-S-32': pass --model_name ViT-S-32")


def test_fitting_models_is_exact_and_bounded():
    """Twins whose tensors have the same shapes are both named; other sizes of the same family are not;
    the search stops at its time budget and says what it left unchecked."""
    import time

    from modeltest.errors import ModelTestError
    from modeltest.metrics.clip import _meta_model, check_fit, fitting_models

    state = _meta_model("ViT-B-32").state_dict()  # shapes only: no memory, no initialization
    started = time.perf_counter()
    fits, closest_ones, unchecked = fitting_models(state)
    assert time.perf_counter() - started < 30  # a few seconds at most; generous for a busy CI machine
    assert fits == ["ViT-B-32", "ViT-B-32-quickgelu"] and closest_ones == [] and unchecked == []
    with pytest.raises(ModelTestError) as err:
        check_fit(_meta_model(MODEL), state, MODEL, "w.bin")
    assert "but fits 'ViT-B-32' or 'ViT-B-32-quickgelu': pass --model_name with the one they were trained as" in str(
        err.value
    )
    fits, closest_ones, unchecked = fitting_models(state, budget_s=0.0)
    assert fits == [] and "ViT-B-32" in unchecked


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path / name)


def captions_file(text: str):
    return lambda t: ["--image_info", _write(t, "c.json", text)]


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("bad json", captions_file('{"a.jpg": "x",}'), "c.json:1:"),
        ("not an object", captions_file('["a.jpg"]'), "expected a JSON object"),
        (
            "lengths",
            captions_file('{"image_file": ["a.jpg"], "model_answer": []}'),
            "'image_file' has 1 entries but 'model_answer' has 0",
        ),
        ("null caption", captions_file('{"coffee.png": null}'), "'coffee.png'"),
        ("no captions file", lambda t: ["--image_info", str(t / "nope.json")], "captions file not found"),
        ("batch size", lambda t: ["--batch_size", "0"], "--batch_size must be >= 1"),
        ("tolerance", lambda t: ["--tolerance", "-1"], "--tolerance"),
        ("weights file", lambda t: ["--model_weights_path", str(t / "nope.bin")], "nope.bin: file not found"),
        ("model name", lambda t: ["--model_name", "ViT-S-23"], "unknown open_clip model 'ViT-S-23' (did you"),
        ("npu", lambda t: ["--device", "npu"], "torch_npu"),
        ("device", lambda t: ["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, photo_dir, weights, capsys, case, args, message):
    caps = _write(tmp_path, "caps.json", json.dumps(CAPTIONS))
    base = {
        "--image_info": caps,
        "--dataset_path": str(photo_dir),
        "--model_weights_path": str(weights["bin"]),
        "--model_name": MODEL,
        "--device": "cpu",
    }
    extra = args(tmp_path)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    argv = [x for kv in base.items() for x in kv] + ["--no_progress"]
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_seed_style_device_index_needs_an_accelerator(tmp_path, photo_dir, weights, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a bare index means cuda:0 here")
    caps = write_json(tmp_path / "caps.json", CAPTIONS)
    argv = ["--image_info", str(caps), "--dataset_path", str(photo_dir), "--model_weights_path",
            str(weights["bin"]), "--model_name", MODEL, "--device", "0"]  # fmt: skip
    assert main(argv) == 2
    assert "needs an npu or cuda device" in one_error_line(capsys.readouterr().err)


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    argv = ["--image_info", str(tmp_path / "x.json"), "--dataset_path", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "modeltest.clip_score", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 2
    assert "x.json: captions file not found" in one_error_line(proc.stderr)
