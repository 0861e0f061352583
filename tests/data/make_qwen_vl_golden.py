"""Makes tests/data/qwen_vl_original_golden.json: what the ORIGINAL Qwen-VL remote code computes on
the test suite's tiny random checkpoints, so CI can check the engine against it without the original
code (which no longer imports under transformers 5).

This project never ships or runs that code itself. To regenerate, in a separate environment with
transformers 4.32 (+ tiktoken, einops, transformers_stream_generator, torchvision, scikit-image):

    1. write the two checkpoints exactly as tests/conftest.py does (fixtures qwen_vl_ckpt and
       qwen_vl_ckpt_short), e.g. with this project's engine.models.qwen_vl.random_checkpoint;
    2. python tests/data/make_qwen_vl_golden.py --code DIR_WITH_modeling_qwen.py_etc \\
           --ckpt ckpt=PATH_A --ckpt ckpt_short=PATH_B --out tests/data/qwen_vl_original_golden.json

`--code` is a folder with the original modeling_qwen.py, visual.py, tokenization_qwen.py,
configuration_qwen.py and qwen_generation_utils.py (from the Qwen/Qwen-VL-Chat release). Each
checkpoint is copied to a scratch folder next to those files and loaded with trust_remote_code.

Recorded per case: the prompt (image paths as {name} placeholders), the original tokenizer's ids,
the greedy ids (eos 151643 ends; chat also stops on <|im_end|>/<|im_start|>), and fp32 logits at a
few prompt positions and at every generation step, as top-8 (id, value) pairs plus the values at
fixed probe ids. Fingerprints of the weights and photos let the test see that its inputs are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

PROBE_IDS = [0, 13, 220, 1000, 50000, 100000, 151643, 151850]
PHOTOS = ("astronaut", "coffee", "chelsea")
FINGERPRINT_KEYS = ("transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.c_attn.weight",
                    "transformer.visual.conv1.weight", "transformer.visual.attn_pool.query")  # fmt: skip
NEW_TOKENS = 16
TEXT = "The quick brown fox jumps over the lazy dog. 你好，世界！今天天气很好。Qwen-VL is a vision-language model."


def long_text(words: int) -> str:
    return " ".join(f"item {i} is number {i * 7 % 1000}." for i in range(words))


def cases(name: str) -> list[dict]:
    if name == "ckpt":  # seq_length 2048
        return [
            {"case": "text", "prompt": TEXT},
            {"case": "one_image", "prompt": "Picture 1: <img>{astronaut}</img>\nWhat is this? Answer:"},
            {"case": "two_images", "parts": [{"image": "{astronaut}"}, {"image": "{coffee}"},
                                             {"text": "What differs between the two pictures?"}]},  # fmt: skip
            {"case": "long_text", "prompt": long_text(330) + " Summarize:"},  # > 2048 tokens: NTK alpha 3, log-n
            {"case": "long_image", "prompt": "<img>{chelsea}</img>" + long_text(320) + " What animal is it?"},
            {"case": "chat", "history": [("Picture 1: <img>{coffee}</img>\nWhat is in the cup?", "Coffee.")],
             "query": "And what colour is the saucer?"},  # fmt: skip
        ]
    return [  # ckpt_short: seq_length 32
        {"case": "text_under_seq", "prompt": "Hello world, this is short."},
        {"case": "text_alpha3", "prompt": long_text(5)},
        {"case": "text_alpha15", "prompt": long_text(22)},
        {"case": "one_image", "prompt": "<img>{chelsea}</img>What animal is it? Answer:"},
    ]


def from_list_format(parts: list[dict]) -> str:
    """The original tokenizer's from_list_format. Copies of tokenization_qwen.py in circulation differ
    in one character: 'Picture n: <img>' (the Qwen-VL README's examples, the seed) or 'Picture n:<img>'
    (some later copies). The spaced form is written here, and the engine renders it the same way."""
    text, n = "", 0
    for part in parts:
        if "image" in part:
            n += 1
            text += f"Picture {n}: <img>{part['image']}</img>\n"
        else:
            text += part["text"]
    return text


def fingerprint_weights(folder: str) -> dict[str, float]:
    import torch

    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
    out = {}
    for f in files:
        path = os.path.join(folder, f)
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        for k in FINGERPRINT_KEYS:
            if k in state:
                out[k] = float(state[k].double().sum())
    return out


def rows_record(logits, rows) -> list[dict]:
    import torch

    out = []
    for r in rows:
        row = logits[r].float()
        values, ids = torch.topk(row, 8)
        out.append({"row": int(r), "top_ids": ids.tolist(), "top_values": values.tolist(),
                    "probe_values": row[PROBE_IDS].tolist()})  # fmt: skip
    return out


def main() -> None:
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--code", required=True)
    p.add_argument("--ckpt", action="append", required=True, help="name=path")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="qwen_vl_golden_")
    images = {}
    fingerprints = {}
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        images[name] = os.path.join(work, f"{name}.png")
        Image.fromarray(arr).save(images[name])
        fingerprints[name] = int(np.asarray(arr, dtype=np.int64).sum())

    result = {"probe_ids": PROBE_IDS, "new_tokens": NEW_TOKENS, "photo_sums": fingerprints, "checkpoints": {}}
    for spec in args.ckpt:
        name, path = spec.split("=", 1)
        folder = os.path.join(work, name)
        shutil.copytree(path, folder)
        for f in os.listdir(args.code):
            if f.endswith(".py"):
                shutil.copy(os.path.join(args.code, f), folder)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
            json.dump({"tokenizer_class": "QWenTokenizer",
                       "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, fh)  # fmt: skip
        with open(os.path.join(folder, "generation_config.json"), "w") as fh:
            json.dump({"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                       "max_window_size": 6144, "do_sample": False}, fh)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        mod = __import__(type(model).__module__, fromlist=["make_context"])
        entry = {"weights": fingerprint_weights(path), "cases": []}
        for case in cases(name):
            fill = {k: v for k, v in images.items()}
            stop_words = None
            if case["case"] == "chat":
                history = [(q.format(**fill), a) for q, a in case["history"]]
                raw_text, ids = mod.make_context(tok, case["query"], history=history,
                                                 system="You are a helpful assistant.", chat_format="chatml")  # fmt: skip
                stop_words = mod.get_stop_words_ids("chatml", tok)
            else:
                prompt = case.get("prompt") or from_list_format(case["parts"])
                ids = tok.encode(prompt.format(**fill))
            x = torch.tensor([ids])
            with torch.no_grad():
                prefill = model(input_ids=x, use_cache=False).logits[0]
                kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, output_scores=True,
                              return_dict_in_generate=True, eos_token_id=151643, pad_token_id=151643)  # fmt: skip
                if stop_words:
                    kwargs["stop_words_ids"] = stop_words
                g = model.generate(x, **kwargs)
            new = g.sequences[0, len(ids):].tolist()
            steps = torch.stack([s[0] for s in g.scores])
            T = len(ids)
            record = {k: v for k, v in case.items() if k != "history"}
            if "history" in case:
                record["history"] = [list(h) for h in case["history"]]
            record.update({
                "input_ids": ids,
                "generated_ids": new,
                "prefill": rows_record(prefill, sorted({0, T // 3, 2 * T // 3, T - 1})),
                "steps": rows_record(steps, range(len(new))),
            })  # fmt: skip
            entry["cases"].append(record)
            print(name, case["case"], T, new)
        result["checkpoints"][name] = entry
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
