"""Engine vs transformers on Qwen2-VL (or Qwen2.5-VL): the same random weights, the same TextVQA-shaped
workload, side by side in one process and one run: transformers' Qwen2VLForConditionalGeneration.generate
(the processor's chat template and images, left-padded batches, greedy) at batch 1 and at larger batch
sizes, and the bundled engine (`LLM.generate` of every request at once).

    python benchmarks/engine_qwen2_vl.py [--model qwen2_vl|qwen2_5_vl] [--requests 48] [--images 32]
        [--hf_batches 1,8,16] [--max_pixels 200704] [--threads N] [--checkpoint_dir DIR]

The checkpoint is written by transformers itself (save_pretrained) at a reduced shape: hidden 256, 4
layers, 4 heads / 2 KV heads, vision width 128 / 4 blocks (Qwen2.5-VL: windows of 112 px, full
attention in blocks 1 and 3), with a byte-level BPE tokenizer trained here (a few hundred tokens; no
Qwen2 vocabulary can be downloaded) and the real image processor capped at --max_pixels (default 448 x
448: 256 image tokens, as Qwen-VL's). Requests: one skimage photo (at its own size and aspect ratio) and
a ~40-token question each, images used once or twice, 10 new tokens (min_tokens = max_tokens, so both
systems do the same work). Printed: requests/s and generated tokens/s of each setting, the engine's ratio
to transformers at batch 1 and at its best batch size, and how many requests got the same token ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
          "immunohistochemistry", "hubble_deep_field", "retina", "clock", "colorwheel", "cell")  # fmt: skip
WORDS = ("what is written on the sign next to the door and which color is the car parked in front of the red brick "
         "building how many people can you count standing near the window of the small shop").split()  # fmt: skip


def write_checkpoint(out: Path, model: str, max_pixels: int) -> Path:
    """The reduced shape (see the module's docstring), by qwen2_vl_checkpoint's writer."""
    from qwen2_vl_checkpoint import write_qwen2_vl

    vision = (dict(depth=4, hidden_size=128, out_hidden_size=256, intermediate_size=256, num_heads=4, window_size=112,
                   fullatt_block_indexes=[1, 3]) if model == "qwen2_5_vl" else
              dict(depth=4, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2))  # fmt: skip
    text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})  # fmt: skip
    corpus = [" ".join(WORDS)] * 20 + ["user assistant Answer: question"] * 10
    return write_qwen2_vl(out, corpus, model, vocab=600, text=text, vision=vision, max_pixels=max_pixels)


def workload(folder: Path, requests: int, images: int) -> list[tuple[str, str]]:
    """(image path, question) per request: each photo used once or twice, adjacent, as TextVQA's."""
    import numpy as np
    import skimage.data
    from PIL import Image

    paths = []
    for i in range(images):
        arr = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
        arr = np.roll(arr, 7 * i, axis=1)  # distinct pixels for every image
        path = folder / f"photo{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    order = [paths[j // 2 if j < 2 * (requests - images) else j - (requests - images)] for j in range(requests)]
    rng = np.random.default_rng(0)
    return [(p, " ".join(rng.choice(WORDS, 40)) + "?") for p in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("qwen2_vl", "qwen2_5_vl"), default="qwen2_vl")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--hf_batches", default="1,8,16")
    ap.add_argument("--max_pixels", type=int, default=448 * 448)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint_dir", default=None)
    args = ap.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="engine_qwen2_vl_"))
    ckpt = work / args.model
    if not (ckpt / "config.json").is_file():
        write_checkpoint(ckpt, args.model, args.max_pixels)
    wl = workload(work, args.requests, min(args.images, args.requests))
    new = 10
    results = {}

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    hf = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    for batch in [int(b) for b in args.hf_batches.split(",")]:
        ids = []
        t0 = time.perf_counter()
        for start in range(0, len(wl), batch):
            chunk = wl[start : start + batch]
            texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                                   add_generation_prompt=True, tokenize=False) for _, q in chunk]  # fmt: skip
            inputs = processor(text=texts, images=[Image.open(p).convert("RGB") for p, _ in chunk], padding=True,
                               return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                out = hf.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            ids += out[:, inputs["input_ids"].shape[1] :].tolist()
        results[f"transformers batch {batch}"] = (time.perf_counter() - t0, ids)
        print(f"transformers batch {batch}: {results[f'transformers batch {batch}'][0]:.1f} s", file=sys.stderr)
    del hf

    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_batch_size=64, max_model_len=1024, progress=False)
    prompts = [[{"image": p}, {"text": q}] for p, q in wl]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, min_tokens=new), use_tqdm=False)
    results["engine"] = (time.perf_counter() - t0, [list(o.token_ids) for o in outs])

    engine_s, engine_ids = results["engine"]
    print(f"model {args.model} (reduced shape, fp32), {len(wl)} requests over {len(set(p for p, _ in wl))} images, "
          f"max_pixels {args.max_pixels}, {new} new tokens each; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads")  # fmt: skip
    print("system                    wall s   requests/s   gen tok/s   same token ids as engine")
    for name, (secs, ids) in results.items():
        same = sum(a == b for a, b in zip(ids, engine_ids, strict=True))
        print(f"{name:24s} {secs:7.1f} {len(wl) / secs:12.2f} {len(wl) * new / secs:11.1f}   {same}/{len(wl)}")
    hf_runs = {k: v for k, v in results.items() if k.startswith("transformers")}
    best = min(hf_runs, key=lambda k: hf_runs[k][0])
    if "transformers batch 1" in hf_runs:
        print(f"engine / transformers batch 1: {hf_runs['transformers batch 1'][0] / engine_s:.2f}x requests/s")
    print(f"engine / transformers best ({best}): {hf_runs[best][0] / engine_s:.2f}x requests/s")


if __name__ == "__main__":
    main()
