"""Engine generate: prefill and decode tokens/s, TTFT (p50/p99), requests/s, vision-tower images/s and
peak memory of the bundled engine on a Qwen-VL-shaped model with random weights. Each request is a
~40-token question about one 448x448 photo (skimage's astronaut, coffee, chelsea, rocket) unless
--no_image. Targets: the default CPU run (tiny shape) finishes in under ~2 minutes; on CUDA the full
Qwen-VL shape in bf16 gives the figures to compare with the original HF code.

    python benchmarks/engine_generate.py [--device cpu|cuda] [--shape tiny|small|full] [--batch 8]
        [--prompt_tokens 40] [--max_tokens 32] [--no_image] [--checkpoint_dir DIR] [--keep]

Shapes: tiny (hidden 256, 2 layers, vision width 128 / 2 layers; the default on CPU), small (the
real widths with 2 text and 2 visual layers: ~1.8 B parameters, ~7 GiB in fp32), full (Qwen-VL:
32 layers, vision 48 layers, ~9.6 B parameters; the default on CUDA). Measured: prefill = a
generate with max_tokens=1 (prefill tokens/s = prompt tokens / engine step time, vision tower
included); decode = generated tokens after the first / (last finish_time - first first_token_time);
TTFT from RequestOutput.ttft (image preprocessing of the batch included); peak host RSS
(ru_maxrss; the checkpoint is written in a separate process so it does not count) and, on CUDA,
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "benchmark_shape.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
QUESTION_WORDS = (
    "Looking carefully at the picture, what is written on the sign next to the door, which color is the "
    "car parked in front of the red brick building on the left, and how many people can you count "
    "standing near the window of the small shop across the busy street in the late afternoon light?"
).split()


def shape_config(shape: str) -> dict:
    from engine.models.qwen_vl.random_checkpoint import tiny_config

    if shape == "tiny":
        return tiny_config(hidden_size=256, layers=2, heads=4, visual_width=128, visual_layers=2, visual_heads=4)
    real = dict(hidden_size=4096, heads=32, intermediate_size=22016, seq_length=2048, visual_width=1664,
                visual_heads=16, dtype="bf16")  # fmt: skip
    if shape == "small":
        return tiny_config(layers=2, visual_layers=2, **real)
    if shape == "full":
        return tiny_config(layers=32, visual_layers=48, **real)
    raise ValueError(f"unknown shape {shape!r}")


WRITER = """
import json, sys, time
import torch
from engine.models.qwen_vl.random_checkpoint import write_random_checkpoint
folder, config, dtype, shards = sys.argv[1], json.loads(sys.argv[2]), getattr(torch, sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
write_random_checkpoint(folder, config, shards=shards, dtype=dtype)
print(f"{time.perf_counter() - start:.1f}")
"""


def _write_checkpoint(folder: Path, config: dict, small: bool) -> float:
    """In a child process, so the generated state dict never counts in this process's peak RSS; bf16
    halves the disk for the big shapes (the engine converts on load)."""
    dtype, shards = ("float32", 1) if small else ("bfloat16", 4)
    cmd = [sys.executable, "-c", WRITER, str(folder), json.dumps(config), dtype, str(shards)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return float(done.stdout.split()[-1])


def ensure_checkpoint(folder: Path, shape: str, config: dict | None = None) -> str:
    """A random checkpoint of `shape` (its config: `config`, else shape_config(shape)) in `folder`;
    a folder already holding exactly this one is reused. Shared with engine_throughput.py."""
    config = config or shape_config(shape)
    marker = folder / MARKER
    if marker.is_file() and (folder / "config.json").is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("shape") == shape and saved.get("config") == config:
            return f"reused {folder}"
    if folder.exists() and any(folder.iterdir()) and not marker.is_file():
        raise SystemExit(f"{folder} is not empty and holds no {MARKER}: not overwriting it")
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors*"), *folder.glob("pytorch_model*"), marker]:
        old.unlink(missing_ok=True)  # another shape's files: its shard index would shadow the new weights
    seconds = _write_checkpoint(folder, config, small=shape in ("tiny", "reduced"))
    marker.write_text(json.dumps({"shape": shape, "config": config}))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return f"wrote {folder} ({size / 2**30:.2f} GiB in {seconds:.1f} s)"


def save_photos(folder: Path) -> list[str]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=90)
        paths.append(str(path))
    return paths


def make_prompts(tokenizer, photos: list[str], batch: int, prompt_tokens: int, with_image: bool) -> list[str]:
    prompts = []
    for i in range(batch):
        words: list[str] = [f"Q{i}:"]
        while len(tokenizer.encode(" ".join(words))) < prompt_tokens:
            words.append(QUESTION_WORDS[(len(words) + i) % len(QUESTION_WORDS)])
        question = " ".join(words)
        image = f"Picture 1: <img>{photos[i % len(photos)]}</img>\n" if with_image else ""
        prompts.append(f"{image}{question} Answer:")
    return prompts


def timed_generate(llm, prompts, params):
    """(outputs, wall seconds, [(seconds, prefill) of each engine step]); a step is a prefill step while
    some request has no token yet."""
    steps: list[tuple[float, bool]] = []
    engine = llm.llm_engine
    engine_step = engine.step

    def step():
        prefill = any(not seq.output_token_ids for seq in engine.requests.values())
        t0 = time.perf_counter()
        outputs = engine_step()
        steps.append((time.perf_counter() - t0, prefill))
        return outputs

    engine.step = step
    try:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        del engine.step
    return outputs, wall, steps


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda[:i], npu[:i]; default: the best available")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 otherwise")
    ap.add_argument("--shape", choices=("tiny", "small", "full"), default=None, help="default: tiny on cpu, full otherwise")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_tokens", type=int, default=40, help="question tokens per request (image span not counted)")
    ap.add_argument("--no_image", action="store_true", help="text-only prompts")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="measured repetitions of each generate")
    ap.add_argument("--max_model_len", type=int, default=2048, help="sizes the KV cache (batch x this)")
    ap.add_argument("--checkpoint_dir", default=None, help="default: a temp dir; reused when it holds this shape")
    ap.add_argument("--keep", action="store_true", help="keep the temp checkpoint (its path is printed)")
    args = ap.parse_args()

    import torch

    from engine import LLM, SamplingParams
    from engine.device import DeviceError, resolve_device, synchronize
    from engine.models.qwen_vl.processor import preprocess

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise SystemExit(str(e)) from None
    on_cpu = device.startswith("cpu")
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    shape = args.shape or ("tiny" if on_cpu else "full")
    work = Path(tempfile.mkdtemp(prefix="engine_generate_"))
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else work / f"qwen-vl-{shape}"
    try:
        print(f"checkpoint: {ensure_checkpoint(ckpt, shape)}")
        photos = save_photos(work / "photos")
        start = time.perf_counter()
        llm = LLM(ckpt, dtype=dtype, device=device, max_batch_size=args.batch, max_model_len=args.max_model_len,
                  progress=True)  # fmt: skip
        load_s = time.perf_counter() - start
        rss_after_load = peak_rss_gib()
        params = sum(p.numel() for p in llm.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        kv_bytes = sum(t.numel() * t.element_size() for pair in llm.runner.kv_caches for t in pair)
        prompts = make_prompts(llm.tokenizer, photos, args.batch, args.prompt_tokens, not args.no_image)

        prefill_params = SamplingParams(max_tokens=1, ignore_eos=True)
        decode_params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        timed_generate(llm, prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        ttfts, prefill_tps, prefill_s, decode_tps, itl, req_s, e2e_s = [], [], [], [], [], [], []
        prompt_lens = []
        for _ in range(args.rounds):
            outs, _, steps = timed_generate(llm, prompts, prefill_params)
            prompt_lens = [len(o.prompt_token_ids) for o in outs]
            prefill_s.append(sum(t for t, _ in steps))
            prefill_tps.append(sum(prompt_lens) / prefill_s[-1])
            ttfts += [o.ttft for o in outs]

            outs, wall, _ = timed_generate(llm, prompts, decode_params)
            ttfts += [o.ttft for o in outs]
            generated = sum(len(o.token_ids) - 1 for o in outs)
            span = max(o.finish_time for o in outs) - min(o.first_token_time for o in outs)
            decode_tps.append(generated / span if span > 0 else float("nan"))
            itl += [o.decode_time_per_token for o in outs if o.decode_time_per_token is not None]
            req_s.append(len(outs) / wall)
            e2e_s.append(wall)

        pixels = preprocess([photos[i % len(photos)] for i in range(args.batch)], llm.model_config.visual.image_size)
        with torch.inference_mode():
            llm.model.encode_images(pixels.to(device))  # warm-up
            synchronize(device)
            vision_s = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                llm.model.encode_images(pixels.to(device))
                synchronize(device)
                vision_s.append(time.perf_counter() - t0)

        med = statistics.median
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} CPUs (load average {load}), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), python {platform.python_version()}, "
              f"device {device}: {device_name(device)}")  # fmt: skip
        print(f"model: shape {shape}, {params / 1e9:.2f} B parameters, {dtype} weights {weight_bytes / 2**30:.2f} GiB, "
              f"KV cache {kv_bytes / 2**30:.2f} GiB; loaded in {load_s:.1f} s")  # fmt: skip
        print(f"requests: batch {args.batch}, {med(prompt_lens):.0f} prompt tokens each "
              f"({'text only' if args.no_image else 'one 448x448 image = 258 of them'}), max_tokens {args.max_tokens} "
              f"(ignore_eos), greedy; {args.rounds} rounds after one warm-up")  # fmt: skip
        from tabulate import tabulate

        rows = [
            ("prefill throughput", f"{med(prefill_tps):,.0f}", "prompt tokens/s", f"batch prefill step {med(prefill_s):.3f} s"),
            ("TTFT p50", f"{percentile(ttfts, 50) * 1e3:,.1f}", "ms", f"{len(ttfts)} requests"),
            ("TTFT p99", f"{percentile(ttfts, 99) * 1e3:,.1f}", "ms", ""),
            ("decode throughput", f"{med(decode_tps):,.1f}", "tokens/s", f"batch {args.batch}, tokens after the first"),
            ("inter-token latency", f"{statistics.mean(itl) * 1e3:,.1f}", "ms/token", "per request"),
            ("end to end", f"{med(req_s):,.2f}", "requests/s", f"generate of the batch {med(e2e_s):.2f} s"),
            ("vision tower", f"{args.batch / med(vision_s):,.1f}", "images/s", f"batch of {args.batch} 448x448"),
            ("peak host RSS", f"{peak_rss_gib():.2f}", "GiB", f"{rss_after_load:.2f} GiB after loading"),
        ]
        if device.startswith("cuda"):
            rows.append(("peak CUDA allocated", f"{torch.cuda.max_memory_allocated() / 2**30:.2f}", "GiB",
                         "measured part, weights and KV cache included"))  # fmt: skip
        print(tabulate(rows, headers=("metric", "value", "unit", "note"), colalign=("left", "right", "left", "left"),
                       disable_numparse=True))  # fmt: skip
    finally:
        if args.keep and not args.checkpoint_dir and (ckpt / MARKER).is_file():
            kept = Path(tempfile.gettempdir()) / f"engine_generate_{shape}_{os.getpid()}"
            shutil.move(str(ckpt), kept)
            print(f"kept the checkpoint: --checkpoint_dir {kept}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
