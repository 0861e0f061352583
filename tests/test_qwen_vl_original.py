"""Protects the acceptance criterion of the engine: on checkpoints in the original format it computes
what the ORIGINAL Qwen-VL remote code computes. tests/data/qwen_vl_original_golden.json holds the
original code's outputs (transformers 4.32, fp32, CPU) on this suite's two tiny checkpoints — made
by tests/data/make_qwen_vl_golden.py — for text, one image, two images, prompts past seq_length
(dynamic NTK + log-n, > 2048 tokens and on a seq_length-32 model) and a ChatML chat with history:
the tokenizer's ids must be identical, the greedy tokens identical, and the fp32 logits within 1e-4
at sampled prompt positions and at every generation step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import SamplingParams

GOLDEN = json.loads((Path(__file__).parent / "data" / "qwen_vl_original_golden.json").read_text())
TOL = 1e-4


def _cases():
    for name, entry in GOLDEN["checkpoints"].items():
        for case in entry["cases"]:
            yield pytest.param(name, case, id=f"{name}-{case['case']}")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    import numpy as np
    import skimage.data
    from PIL import Image

    out = tmp_path_factory.mktemp("golden_photos")
    paths = {}
    for name, expected in GOLDEN["photo_sums"].items():
        arr = getattr(skimage.data, name)()
        assert int(np.asarray(arr, dtype=np.int64).sum()) == expected, f"skimage's {name} photo changed"
        paths[name] = str(out / f"{name}.png")
        Image.fromarray(arr).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def engines(qwen_vl_ckpt, qwen_vl_ckpt_short):
    from engine import LLM

    out = {}
    for name, path in (("ckpt", qwen_vl_ckpt), ("ckpt_short", qwen_vl_ckpt_short)):
        _check_same_weights(path, GOLDEN["checkpoints"][name]["weights"])
        out[name] = LLM(path, dtype="float32", device="cpu", max_batch_size=4, block_size=64, num_blocks=160,
                        progress=False)  # fmt: skip
    return out


def _check_same_weights(folder: Path, expected: dict[str, float]) -> None:
    from safetensors import safe_open

    sums = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                sums.update({k: float(st.get_tensor(k).double().sum()) for k in expected if k in st.keys()})
        elif f.suffix == ".bin":
            state = torch.load(f, weights_only=True)
            sums.update({k: float(state[k].double().sum()) for k in expected if k in state})
    for key, value in expected.items():
        assert sums[key] == pytest.approx(value, rel=1e-9, abs=1e-6), (
            f"{folder}: {key} is not the tensor the golden file was made from (did the random checkpoint "
            "writer or torch's RNG change?); regenerate with tests/data/make_qwen_vl_golden.py"
        )


def _prompt(case: dict, photos: dict[str, str]):
    if case["case"] == "chat":
        messages = []
        for query, answer in case["history"]:
            messages += [{"role": "user", "content": query.format(**photos)}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": case["query"]}]
    if "parts" in case:
        return [{k: v.format(**photos) for k, v in part.items()} for part in case["parts"]]
    return case["prompt"].format(**photos)


def _without_paths(ids: list[int]) -> list[int]:
    """The ids with each image span's 256 slots blanked: they hold the image's path bytes, which
    differ between machines, and the model replaces them with the image's features anyway."""
    ids = list(ids)
    for i, t in enumerate(ids):
        if t == 151857:  # <img>
            ids[i + 1 : i + 257] = [-1] * 256
    return ids


def _check_rows(got: torch.Tensor, expected: list[dict], what: str) -> None:
    probe = GOLDEN["probe_ids"]
    for rec, row in zip(expected, got, strict=True):
        diff_top = (row[rec["top_ids"]] - torch.tensor(rec["top_values"])).abs().max().item()
        diff_probe = (row[probe] - torch.tensor(rec["probe_values"])).abs().max().item()
        assert max(diff_top, diff_probe) < TOL, f"{what} row {rec['row']}: logits differ by {max(diff_top, diff_probe):.2e}"


@pytest.mark.parametrize("name, case", list(_cases()))
def test_matches_original_code(engines, photos, name, case):
    llm = engines[name]
    prompt = _prompt(case, photos)

    # tokens: the original tokenizer's ids (image spans, ChatML layout, history)
    seq = llm.llm_engine._make_sequence("golden", prompt, SamplingParams(max_tokens=1))
    assert _without_paths(seq.prompt_token_ids) == _without_paths(case["input_ids"])

    # the whole prefill, at the sampled positions (computed in full: no prefix-cache match here)
    llm.block_manager.prefix_caching = False
    try:
        llm.block_manager.allocate(seq)
        logits = llm.runner.run([seq], all_rows=True)
    finally:
        llm.block_manager.free(seq)
        llm.block_manager.prefix_caching = True
    _check_rows(logits[[r["row"] for r in case["prefill"]]], case["prefill"], "prefill")

    # greedy generation through the paged engine, every step's logits captured
    steps = []
    run = llm.runner.run

    def capture(seqs, all_rows=False):
        out = run(seqs, all_rows)
        steps.append(out[0].clone())
        return out

    llm.runner.run = capture
    try:
        out = llm.generate(prompt, SamplingParams(max_tokens=GOLDEN["new_tokens"]), use_tqdm=False)[0]
    finally:
        llm.runner.run = run
    assert out.token_ids == case["generated_ids"]
    _check_rows(torch.stack(steps), case["steps"], "generation step")
