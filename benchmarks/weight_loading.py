"""Weight loading: peak host memory and speed of the engine's loader on a generated bf16 checkpoint of
a few GB. Target (the issue): peak host memory while loading stays under 1.3x the checkpoint size
when the checkpoint is loaded in its own dtype.

    python benchmarks/weight_loading.py [--size_gb 3] [--format safetensors|bin] [--dir DIR] [--keep]

The checkpoint is a Qwen-VL-shaped model (hidden 2048, the layer count picked to reach --size_gb)
written one shard at a time (the engine's key names, from QwenVLForCausalLM on the meta device), so
the generator never holds more than a shard. Each load runs in a fresh process (its baseline RSS is
measured after importing torch and the engine) through `engine.LLM(path, dtype, device="cpu",
num_blocks=1)` (or --via load_weights); its files are first evicted from the page cache with
posix_fadvise (--warm keeps them cached). Two cases: bf16 loaded as bf16 (same dtype: the target
applies) and bf16 loaded as float32 (the model is then twice the checkpoint; the ratio against the
loaded model's size is reported too). ru_maxrss counts memory-mapped file pages once they are read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
MARKER = "benchmark_checkpoint.json"
MAX_TOTAL_GB = 8.0  # disk this benchmark may use
TARGET = 1.3


def model_config(size_gb: float) -> dict:
    """Qwen-VL's layout at hidden 2048 (vision width 1664), with text and visual layers picked so the
    bf16 checkpoint comes to about size_gb GiB."""
    from engine.models.qwen_vl.random_checkpoint import tiny_config

    def config(layers: int, visual_layers: int) -> dict:
        return tiny_config(hidden_size=2048, layers=layers, heads=16, intermediate_size=11008, visual_width=1664,
                           visual_layers=visual_layers, visual_heads=16, dtype="bf16")  # fmt: skip

    base = checkpoint_bytes(config(1, 1))
    per_layer = checkpoint_bytes(config(2, 1)) - base
    per_visual_layer = checkpoint_bytes(config(1, 2)) - base
    target = size_gb * GIB
    visual_layers = max(1, round(0.15 * target / per_visual_layer))
    layers = max(1, 1 + round((target - base - (visual_layers - 1) * per_visual_layer) / per_layer))
    return config(layers, visual_layers)


def meta_params(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    import torch

    from engine.models.qwen_vl.config import QwenVLConfig
    from engine.models.qwen_vl.language import QwenVLForCausalLM

    with torch.device("meta"):
        model = QwenVLForCausalLM(QwenVLConfig.from_dict(config, "benchmark config"))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def checkpoint_bytes(config: dict) -> int:
    import math

    return sum(2 * math.prod(shape) for _, shape in meta_params(config))  # bf16


def write_checkpoint(folder: Path, config: dict, fmt: str, shard_gb: float) -> None:
    """config.json, qwen.tiktoken, bf16 shards + index; each shard is generated, saved and freed in turn."""
    import math

    import torch

    from engine.models.qwen_vl.random_checkpoint import qwen_vocab_file
    from engine.models.qwen_vl.tokenizer import VOCAB_FILE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copyfile(qwen_vocab_file(), folder / VOCAB_FILE)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in meta_params(config):
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_gb * GIB:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        file = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        part = {}
        for name, shape in group:
            if name.endswith(".weight") and len(shape) == 1:  # norm weights
                part[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                part[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            weight_map[name] = file
            total += part[name].numel() * 2
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        del part
        print(f"  wrote {file}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so a load reads them from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the measured load, in a fresh process --------------------------------------------------------


def _status() -> dict[str, int]:
    """Bytes of VmRSS / VmHWM / RssAnon / RssFile from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def child(path: str, dtype: str, via: str) -> None:
    """Load, then read every weight once (a lazily memory-mapped tensor takes memory when first used);
    prints the figures as JSON. Peaks are VmHWM, this process's own high-water RSS: ru_maxrss would
    carry the parent's peak over fork + exec."""
    import torch

    import engine.llm  # noqa: F401  (the engine's imports count in the baseline)
    from engine import LLM
    from engine.loader import load_weights
    from engine.models import load_family

    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    baseline = _status()
    peaks = {"RssAnon": baseline["RssAnon"], "RssFile": baseline["RssFile"]}
    done = threading.Event()

    def sample():  # the largest anon and file-backed parts seen (VmHWM gives the exact total peak)
        while not done.wait(0.01):
            for key, value in _status().items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if via == "llm":
        model = LLM(path, dtype=dtype, device="cpu", num_blocks=1, progress=False).model
    else:
        family = load_family(path)
        with torch.device("meta"):
            model = family.build_model()
        load_weights(model, path, getattr(torch, dtype), "cpu", family.checkpoint_name)
    load_s = time.perf_counter() - start
    loaded = _status()
    start = time.perf_counter()
    with torch.inference_mode():
        for p in model.parameters():  # one element per 4 KiB page: every page read, nothing big allocated
            p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()
    touch_s = time.perf_counter() - start
    done.set()
    sampler.join()
    used = _status()
    result = {
        "load_s": load_s,
        "touch_s": touch_s,
        "baseline": baseline["VmRSS"],
        "peak_load": loaded["VmHWM"],
        "loaded_anon": loaded["RssAnon"],
        "loaded_file": loaded["RssFile"],
        "peak": used["VmHWM"],
        "peak_anon": peaks["RssAnon"],
        "peak_file": peaks["RssFile"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    print(json.dumps(result))


def measure(folder: Path, dtype: str, via: str, warm: bool) -> dict:
    if not warm:
        evict(weight_files(folder))
    cmd = [sys.executable, __file__, "--child", str(folder), "--dtype", dtype, "--via", via]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size_gb", type=float, default=3.0, help="checkpoint size in GiB (bf16)")
    ap.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    ap.add_argument("--shard_gb", type=float, default=2.0, help="shard size in GiB (Qwen-VL's release: ~2)")
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: a temp dir); reused if it holds this one; deleted unless --keep")
    ap.add_argument("--via", choices=("llm", "load_weights"), default="llm")
    ap.add_argument("--warm", action="store_true", help="load from the page cache (default: evict first)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype, args.via)
        return

    import torch
    from tabulate import tabulate

    if args.size_gb > MAX_TOTAL_GB:
        raise SystemExit(f"--size_gb {args.size_gb} is over this benchmark's {MAX_TOTAL_GB:.0f} GiB of disk")
    config = model_config(args.size_gb)
    wanted = {"config": config, "format": args.format, "shard_gb": args.shard_gb}
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="weight_loading_")) / "checkpoint"
    marker = folder / MARKER
    reuse = marker.is_file() and json.loads(marker.read_text()) == wanted
    if not reuse and folder.is_dir() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty and holds no matching {MARKER}: not overwriting it")
    try:
        if reuse:
            print(f"reusing {folder}")
        else:
            probe = folder
            while not probe.exists():
                probe = probe.parent
            free = shutil.disk_usage(probe).free
            need = args.size_gb * GIB * 1.05 + GIB
            if free < need:
                raise SystemExit(f"{free / GIB:.1f} GiB free on disk, {need / GIB:.1f} GiB needed")
            print(f"writing a {args.size_gb:g} GiB {args.format} checkpoint to {folder} "
                  f"({free / GIB:.0f} GiB free on disk) ...", flush=True)  # fmt: skip
            start = time.perf_counter()
            write_checkpoint(folder, config, args.format, args.shard_gb)
            marker.write_text(json.dumps(wanted))
            print(f"  written in {time.perf_counter() - start:.1f} s")
        files = weight_files(folder)
        ckpt = sum(p.stat().st_size for p in files)
        print(f"machine: {os.cpu_count()} CPUs (load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}), "
              f"torch {torch.__version__}; {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM")
        print(f"checkpoint: {ckpt:,} bytes ({ckpt / GIB:.2f} GiB) bf16 in {len(files)} {args.format} shard(s); "
              f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
              f"{config['visual']['layers']} visual layers (width {config['visual']['width']})")  # fmt: skip
        print(f"load: {'LLM(path, dtype, device=cpu, num_blocks=1)' if args.via == 'llm' else 'load_weights'} in a "
              f"fresh process, {'warm page cache' if args.warm else 'page cache evicted first'}")  # fmt: skip

        rows = []
        for label, dtype in (("bf16 -> bf16 (same dtype)", "bfloat16"), ("bf16 -> fp32 (converting)", "float32")):
            r = measure(folder, dtype, args.via, args.warm)
            extra = r["peak"] - r["baseline"]
            verdict = (" PASS" if extra / ckpt < TARGET else " FAIL") if dtype == "bfloat16" else ""
            rows.append((
                label,
                f"{r['model_bytes'] / GIB:.2f}",
                f"{r['baseline'] / GIB:.2f}",
                f"{r['peak_load'] / GIB:.2f}",
                f"{r['loaded_anon'] / GIB:.2f} / {r['loaded_file'] / GIB:.2f}",
                f"{r['peak'] / GIB:.2f}",
                f"{r['peak_anon'] / GIB:.2f} / {r['peak_file'] / GIB:.2f}",
                f"{extra / ckpt:.2f}x{verdict}",
                f"{r['peak'] / ckpt:.2f}x",
                f"{extra / r['model_bytes']:.2f}x",
                f"{r['load_s']:.1f} + {r['touch_s']:.1f}",
                f"{ckpt / 1e9 / (r['load_s'] + r['touch_s']):.2f}",
            ))  # fmt: skip
        headers = ("case", "model\nGiB", "baseline\nRSS GiB", "peak RSS\nload GiB", "after load\nanon/file",
                   "peak RSS\n+use GiB", "peak\nanon/file", "(peak-base)\n/ckpt", "peak\n/ckpt",
                   "(peak-base)\n/model", "load + use\ns", "GB/s")  # fmt: skip
        print(tabulate(rows, headers=headers, disable_numparse=True))
        print(f"target: same dtype, (peak - baseline) < {TARGET}x the checkpoint. baseline = RSS after importing "
              "torch and the engine (torch's shared libraries are file-backed); peak = VmHWM through the load "
              "and then a first read of every weight (memory-mapped tensors take their pages when first used); "
              "anon/file peaks sampled every 10 ms.")  # fmt: skip
    finally:
        if args.keep:
            print(f"kept the checkpoint: --dir {folder}")
        else:
            shutil.rmtree(folder if args.dir else folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
