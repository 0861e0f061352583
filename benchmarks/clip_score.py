"""CLIP score throughput: the batched scorer (modeltest.metrics.clip.ClipScorer: batches, image decoding in
a thread pool ahead of the model) against a one-image-at-a-time loop like the seed's clip_score_qwenvl.py,
on the same model object, images and captions, in one run. Targets (the issue): batched >= 3x the loop on
CPU; on an H100, ViT-H-14 in fp16 >= 1,000 images/s.

    python benchmarks/clip_score.py            # CPU: ViT-S-32, fp32; a few minutes on 2 cores
    python benchmarks/clip_score.py --device cuda --model_name ViT-H-14   # fp16 by default off the CPU

Weights are random (open_clip's init): throughput does not depend on them. Images are JPEGs at COCO's
usual 640x480, cut from scikit-image's photos when it is installed (else smooth synthetic images), with
captions of 8-25 words. Besides the two end-to-end figures it prints decoding alone (the thread pool,
no model) and the model alone (pre-decoded batches): if decoding is slower than the model, PIL is the
bottleneck. Peak memory: the accelerator's max allocated per phase, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("a man woman child dog cat bus train plate of food sitting standing next to on the table street "
         "red blue white large small holding riding with in front of near building field water sky two three "
         "people player ball bench kitchen room window tree grass").split()  # fmt: skip


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    try:
        import skimage.data

        sources = []
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "cat"):
            arr = getattr(skimage.data, name)()
            sources.append(Image.fromarray(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]))
    except ImportError:  # smooth random images: JPEG-coded like photos, unlike white noise
        tiles = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(8)]
        sources = [Image.fromarray(t).resize((640, 480), Image.BICUBIC) for t in tiles]
    w, h = size
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        # a random crop (at least half of each side), resized to w x h: every file decodes differently
        cw, ch = (int(rng.integers(d // 2, d + 1)) for d in src.size)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        paths.append(folder / f"{i:06d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 25))) for _ in range(n)]


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device == "cpu":
        import os

        return f"cpu ({os.cpu_count()} cores)"
    return device


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device) / 2**30
    return None


def seed_loop(scorer, images: list[Path], captions: list[str]) -> list[float]:
    """The seed's loop (clip_score_qwenvl.py): open, preprocess and tokenize one image and its caption,
    then, under no_grad, open_clip's own encode_text (77 tokens) and encode_image, one at a time."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = []
    for path, caption in zip(images, captions, strict=True):
        img = scorer.preprocess(Image.open(path)).unsqueeze(0).to(scorer.device, scorer.input_dtype)
        tok = scorer.tokenizer([caption]).to(scorer.device)
        with torch.no_grad():
            text_ft = scorer.model.encode_text(tok).float()
            img_ft = scorer.model.encode_image(img).float()
            out.append(F.cosine_similarity(img_ft, text_ft).item())
    return out


def model_only(scorer, images: list[Path], captions: list[str], batch_size: int, passes: int = 2) -> float:
    """Seconds for the model on pre-decoded batches (the accelerator's own rate); the best of `passes`."""
    import torch

    pixels = torch.stack([scorer.load_image(p) for p in images[:batch_size]])
    pixels = pixels.to(scorer.device, scorer.input_dtype)
    _, buckets = scorer.tokenize(captions[:batch_size])
    buckets = [b.to(scorer.device) for b in buckets]
    batches = -(-len(images) // batch_size)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            synchronize(scorer.device)
            t0 = time.perf_counter()
            for _ in range(batches):
                scorer.encode_image(pixels)
                scorer.encode_texts(buckets)
            synchronize(scorer.device)
            best = min(best, time.perf_counter() - t0)
    return best * len(images) / (batches * len(pixels))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i] or npu[:i] (default cpu)")
    p.add_argument(
        "--model_name", help="open_clip architecture (default: ViT-S-32 on cpu, ViT-H-14 elsewhere)"
    )
    p.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], help="default: fp32 on cpu, fp16 elsewhere"
    )
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, help="decoding threads (default: CPU count, at most 16)")
    p.add_argument("--image_size", default="640x480", help="WxH of the generated JPEGs (default 640x480)")
    p.add_argument(
        "--chunk", type=int,
        help="images per turn: the batched scorer and the loop take turns on chunks of this many images, so "
             "a change in the machine's load hits both alike (default: the batch size on cpu, where batches "
             "are not pipelined anyway; all the images elsewhere)",
    )  # fmt: skip
    p.add_argument("--dir", help="keep the generated images here (default: a temporary folder)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from engine.device import resolve_device
    from modeltest.metrics.clip import ClipScorer

    device = resolve_device(args.device)
    on_cpu = device == "cpu"
    model_name = args.model_name or ("ViT-S-32" if on_cpu else "ViT-H-14")
    precision = args.precision or ("fp32" if on_cpu else "fp16")
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="clip_bench_")
    folder = Path(args.dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        images = make_images(folder, args.num_images, size)
        captions = make_captions(args.num_images)
        print(f"{len(images)} JPEGs {size[0]}x{size[1]} written in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        scorer = ClipScorer(model_name, None, device, precision, args.num_workers)
        built = time.perf_counter() - t0
        print(f"{model_name} {precision} on {device} (random weights) built in {built:.1f}s; ", end="")
        print(f"torch threads {torch.get_num_threads()}, decoding threads {scorer.num_workers}")
        lean = [name for name, on in zip(("image", "text"), scorer.lean_towers, strict=True) if on]
        print(f"scorer towers: {' and '.join(lean) or 'none'} through clip_towers' lean forward, "
              "the rest through open_clip's; the loop: open_clip's own")  # fmt: skip

        # warm-up: allocator, kernels, tokenizer cache, the OS page cache for the files
        scorer.score(images[: args.batch_size], [captions[: args.batch_size]], args.batch_size)
        seed_loop(scorer, images[:2], captions[:2])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(scorer.num_workers) as pool:
            list(pool.map(scorer.load_image, images))
        decode_s = time.perf_counter() - t0
        reset_peak(scorer.device)
        model_s = model_only(scorer, images, captions, args.batch_size)
        peak_model = peak_gib(scorer.device)

        chunk = args.chunk or (args.batch_size if on_cpu else len(images))
        batched_s = loop_s = 0.0
        batched, looped, turns = [], [], []
        peaks: dict[str, list[float]] = {"batched": [], "loop": []}  # per turn; none on the CPU
        for start in range(0, len(images), chunk):
            part, texts = images[start : start + chunk], captions[start : start + chunk]
            reset_peak(scorer.device)
            t0 = time.perf_counter()
            batched.extend(scorer.score(part, [texts], args.batch_size).cos[0])  # host numbers: device done
            b = time.perf_counter() - t0
            peaks["batched"].append(peak_gib(scorer.device))
            reset_peak(scorer.device)
            t0 = time.perf_counter()
            looped.extend(seed_loop(scorer, part, texts))
            lo = time.perf_counter() - t0
            peaks["loop"].append(peak_gib(scorer.device))
            batched_s, loop_s = batched_s + b, loop_s + lo
            turns.append(lo / b)
        batched, looped = np.array(batched), np.array(looped)
        peak_batched, peak_loop = (None if on_cpu else max(peaks[k]) for k in ("batched", "loop"))
    finally:
        if tmp is not None:
            tmp.cleanup()

    n = len(images)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ratio = loop_s / batched_s

    def line(label: str, seconds: float, note: str = "", peak: float | None = None) -> None:
        mem = f"   peak device memory {peak:.2f} GiB" if peak is not None else ""
        print(f"  {label:<18}{n / seconds:9.1f} images/s   ({seconds:.2f}s{note}){mem}")

    print(f"\nimages: {n}, batch size {args.batch_size}, {model_name} {precision} on {device_label(device)}")
    line("batched scorer", batched_s, "", peak_batched)
    line("one at a time", loop_s, ", the seed's loop", peak_loop)
    spread = f"   (turns of {chunk} images: {min(turns):.2f}x to {max(turns):.2f}x)" if len(turns) > 1 else ""
    print(f"  {'ratio':<18}{ratio:9.2f}x{spread}")
    line("decoding only", decode_s, f", {scorer.num_workers} threads, no model")
    line("model only", model_s, ", pre-decoded batches", peak_model)
    print(f"  {'peak host RSS':<18}{rss_gib:9.2f} GiB")
    print(f"  max |batched - loop| cos: {np.max(np.abs(batched - looped)):.2e}")
    if on_cpu:
        print(f"target (CPU): batched >= 3x the loop: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}x)")
    else:
        rate = n / batched_s
        met = "met" if rate >= 1000 else "NOT met"
        print(f"target (H100, ViT-H-14 fp16): >= 1,000 images/s: {met} ({rate:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
