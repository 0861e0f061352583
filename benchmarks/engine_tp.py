"""Engine tensor parallelism: tp 1 vs tp 2 (and 4, 8 where the host allows) on the same Qwen-VL-shaped
random checkpoint and the same TextVQA-shaped workload, every setting started the same way (torchrun,
one process per rank; tp 1 too). Per rank: the bytes of its language-model weights (and their fraction
of tp 1's), of its vision tower (replicated) and of its KV cache, its peak host RSS (and on CUDA its
peak allocated memory), the median decode step and the wall time of the workload; and whether its
greedy tokens are identical to tp 1's. Then the speed-up of each tp over tp 1.

    python benchmarks/engine_tp.py [--tp 1,2,4] [--device cpu|cuda] [--shape reduced|tiny|small|full]
        [--requests N] [--max_tokens N] [--prompt_tokens 40] [--threads N] [--rounds N] [--dtype D]
        [--timeout 600] [--checkpoint_dir DIR]

The same file is the worker: the launcher starts `python -m torch.distributed.run --standalone
--nproc_per_node <tp> benchmarks/engine_tp.py --worker ...` for each tp (a subprocess timeout, and
MODELTEST_DIST_TIMEOUT=120 so a stuck collective fails instead of hanging) and reads one JSON result
per rank. Each rank builds `LLM(ckpt, tensor_parallel_size=tp, ...)` (float32 on CPU, bfloat16 on
CUDA), runs a warm-up, then `--rounds` timed generates of `--requests` requests (one 448x448 skimage
photo saved as JPEG + a ~40-token question each, greedy, exactly --max_tokens new tokens) and keeps
the fastest. The prefix cache and the image-feature cache are off so every round does the same work.

Shapes: reduced (the default on CPU: the real 151,936-row vocabulary, hidden 256, 4 layers, 4 heads,
MLP width 512, vision width 128 / 2 layers; its head count is raised to the largest tp asked for when
it is larger), tiny, small (the real widths, 2 text / 2 visual layers), full (Qwen-VL's; the default on
CUDA). The head count, the vocabulary and the MLP width must divide by every tp asked for.

What to look at. On CPU (gloo): the per-rank memory. Each rank should hold ~1/tp of tp 1's language
weights (embedding and LM head split by vocabulary rows, attention by heads, MLP by width) and 1/tp of
its KV cache, the whole vision tower, and the same tokens as tp 1 (fp32: expected bit-identical; the
script exits 1 if any rank's tokens differ from tp 1's). The CPU speed-up is NOT a tensor-parallel
speed-up: the tp processes share the host's cores (2 here, one thread each by default), so tp 4
oversubscribes them and the collectives add latency. On a machine with several GPUs (--device cuda,
one rank per GPU) the same table gives the real speed-up; targets there: the step time of tp N
approaching 1/N of tp 1's for the full shape (weight-bandwidth bound decode), and no rank holding more
than ~1/N of the language weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_generate  # noqa: E402
from engine_generate import device_name, make_prompts, save_photos, timed_generate  # noqa: E402
from engine_throughput import cpu_pressure_us, proc_kib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LM_PREFIXES = ("transformer.h.", "transformer.wte.", "lm_head.")
VISION_PREFIX = "transformer.visual."
# torchrun's variables: a launcher itself started under torchrun must not hand them to its children
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")  # fmt: skip
DIST_TIMEOUT_S = "120"
MIB = 2**20


# ---- shape and checkpoint -----------------------------------------------------------------------


def tp_config(shape: str, largest_tp: int) -> dict:
    """The shape's config.json, with the head count of the small random shapes raised to `largest_tp`
    when it does not divide it (hidden stays, head_dim shrinks); SystemExit when the model cannot be
    split that many ways."""
    from engine import tiny_config

    if shape == "reduced":
        config = tiny_config(
            hidden_size=256, layers=4, heads=4, visual_width=128, visual_layers=2, visual_heads=4
        )
    else:
        config = engine_generate.shape_config(shape)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if shape in ("reduced", "tiny") and heads % largest_tp and hidden % largest_tp == 0:
        config["num_attention_heads"] = largest_tp
        config["kv_channels"] = hidden // largest_tp
    sizes = {"heads": config["num_attention_heads"], "vocab": config["vocab_size"],
             "MLP width": config["intermediate_size"] // 2}  # fmt: skip
    bad = [f"{k} {v}" for k, v in sizes.items() if v % largest_tp]
    if bad:
        raise SystemExit(f"shape {shape}: tp {largest_tp} does not divide {', '.join(bad)}")
    return config


def weight_sizes(config: dict, dtype_name: str) -> dict[str, int]:
    """Bytes of the unsplit model's language weights, vision tower and the rest, counted on the meta
    device (nothing allocated): what tp 1 should hold, to size the host check before any run."""
    import torch

    from engine.config import DTYPES
    from engine.models.qwen_vl.config import QwenVLConfig
    from engine.models.qwen_vl.language import QwenVLForCausalLM

    elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    with torch.device("meta"):
        model = QwenVLForCausalLM(QwenVLConfig.from_dict(config, "engine_tp shape"))
    return split_bytes(((n, p.numel() * elem) for n, p in model.named_parameters()))


def split_bytes(named_sizes) -> dict[str, int]:
    sizes = {"lm": 0, "vision": 0, "other": 0}
    for name, size in named_sizes:
        kind = (
            "lm" if name.startswith(LM_PREFIXES) else "vision" if name.startswith(VISION_PREFIX) else "other"
        )
        sizes[kind] += size
    return sizes


# ---- the host --------------------------------------------------------------------------------------


def rank_estimate(sizes: dict[str, int], tp: int) -> int:
    """Rough bytes one rank needs on the host: ~0.6 GiB of runtime (torch, the tokenizer, gloo) plus
    twice its weights (a tensor read from the checkpoint and its converted copy can coexist while
    loading). An estimate for choosing the default tps, not a measurement."""
    return int(0.6 * 2**30) + 2 * (sizes["lm"] // tp + sizes["vision"] + sizes["other"])


def default_tps(device: str, sizes: dict[str, int]) -> tuple[list[int], str]:
    """(tps, why): 1, 2, 4, 8 up to the GPU count on CUDA; on CPU 1, 2 and 4 as far as host memory
    allows all ranks at once."""
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        tps = [t for t in (1, 2, 4, 8) if t <= n]
        return tps, f"{n} GPU(s)"
    avail = (proc_kib("MemAvailable", "/proc/meminfo") or 0) * 1024
    tps = [t for t in (1, 2, 4) if t == 1 or t * rank_estimate(sizes, t) <= 0.8 * avail]
    dropped = [t for t in (1, 2, 4) if t not in tps]
    why = f"{avail / 2**30:.1f} GiB available host memory"
    if dropped:
        why += f"; tp {', '.join(map(str, dropped))} left out (all ranks would not fit)"
    return tps, why


# ---- launcher ------------------------------------------------------------------------------------


def run_tp(
    tp: int, args, ckpt: Path, photo_dir: Path, out: Path, log: Path, threads: int
) -> tuple[bool, str]:
    """One torchrun of `tp` ranks of this file's worker, in its own session so a timeout can end the
    whole group (torchrun and its workers) by its process-group id. (ok, note)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = str(threads)
    env["MODELTEST_DIST_TIMEOUT"] = DIST_TIMEOUT_S
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp),
           str(Path(__file__).resolve()), "--worker", "--checkpoint_dir", str(ckpt), "--photo_dir", str(photo_dir),
           "--out", str(out), "--device", args.device, "--dtype", args.dtype, "--requests", str(args.requests),
           "--max_tokens", str(args.max_tokens), "--prompt_tokens", str(args.prompt_tokens),
           "--max_model_len", str(args.max_model_len), "--rounds", str(args.rounds),
           "--threads", str(threads)]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return False, f"timed out after {args.timeout:.0f} s"
    if rc != 0:
        return False, f"exit status {rc}"
    missing = [r for r in range(tp) if not (out / f"tp{tp}.rank{r}.json").is_file()]
    return (False, f"no result from rank(s) {missing}") if missing else (True, "")


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MIB:,.1f}"


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for j, (s, t) in enumerate(zip(x, y, strict=False)):
            if s != t:
                return f"request {i}, token {j}"
        if len(x) != len(y):
            return f"request {i}, length {len(x)} vs {len(y)}"
    return "none"


def report(results: dict[int, list[dict]], failed: dict[int, str], pressure: dict[int, float | None],
           on_cuda: bool) -> bool:  # fmt: skip
    """Prints the table, the per-tp summary and the speed-ups; returns whether every rank of every tp
    gave tp 1's tokens."""
    from tabulate import tabulate

    if not results:
        for tp, why in sorted(failed.items()):
            print(f"tp {tp}: FAILED ({why})")
        return False
    base = results.get(1, [None])[0]
    ref_tokens = base["token_ids"] if base else None
    all_same = True
    rows = []
    for tp, ranks in sorted(results.items()):
        for r in ranks:
            same_rank0 = r["token_ids"] == ranks[0]["token_ids"]
            if ref_tokens is None:
                same = (
                    "no tp 1"
                    if same_rank0
                    else f"no (vs rank 0: {first_difference(ranks[0]['token_ids'], r['token_ids'])})"
                )
            elif r["token_ids"] == ref_tokens:
                same = "yes"
            else:
                same = f"no ({first_difference(ref_tokens, r['token_ids'])})"
            all_same &= same_rank0 and (ref_tokens is None or r["token_ids"] == ref_tokens)
            frac = f"{r['lm_bytes'] / base['lm_bytes']:.3f}" if base else "n/a"
            row = [tp, r["rank"], mib(r["lm_bytes"]), frac, mib(r["vision_bytes"]), mib(r["kv_bytes"]),
                   mib(r["rss_before_llm"]), mib(r["peak_rss"]),
                   f"{r['rss_anon'] / MIB:,.0f} / {r['ckpt_mapped'] / MIB:,.0f}"]  # fmt: skip
            if on_cuda:
                row += [mib(r["cuda_peak_build"]), mib(r["cuda_peak_run"])]
            row += [f"{r['load_s']:.1f}", f"{r['prefill_ms']:,.1f}", f"{r['step_ms_median']:,.2f}",
                    f"{r['wall_s']:.2f}", same]  # fmt: skip
            rows.append(row)
    headers = ["tp", "rank", "LM weights MiB", "of tp 1", "vision MiB", "KV cache MiB", "RSS before LLM MiB",
               "peak RSS MiB", "end anon / ckpt-mapped MiB"]  # fmt: skip
    if on_cuda:
        headers += ["CUDA peak build MiB", "CUDA peak run MiB"]
    headers += ["load s", "prefill ms", "decode step ms p50", "wall s", "tokens = tp 1"]
    print(
        tabulate(
            rows, headers=headers, disable_numparse=True, colalign=("right",) * (len(headers) - 1) + ("left",)
        )
    )

    print()
    for tp, ranks in sorted(results.items()):
        total_rss = sum(r["peak_rss"] for r in ranks)
        wait = pressure.get(tp)
        extra = f", host CPU wait {wait:.0%} of the run" if wait is not None else ""
        blocks = {r["num_blocks"] for r in ranks}
        print(f"tp {tp}: peak RSS over its ranks {total_rss / MIB:,.0f} MiB in all; KV blocks per rank "
              f"{'/'.join(map(str, sorted(blocks)))}; {ranks[0]['decode_steps']} decode steps of "
              f"{ranks[0]['batch']} sequences{extra}")  # fmt: skip
    for tp, why in sorted(failed.items()):
        print(f"tp {tp}: FAILED ({why})")

    if base:
        print("\nspeed-up over tp 1 (rank 0; > 1 is faster):")
        for tp, ranks in sorted(results.items()):
            if tp == 1:
                continue
            r = ranks[0]
            print(f"  tp {tp}: wall {base['wall_s'] / r['wall_s']:.2f}x, decode step "
                  f"{base['step_ms_median'] / r['step_ms_median']:.2f}x, prefill "
                  f"{base['prefill_ms'] / r['prefill_ms']:.2f}x")  # fmt: skip
    return all_same


def launcher(args) -> int:
    import torch

    from engine.device import DeviceError, resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise SystemExit(str(e)) from None
    on_cuda = device.startswith("cuda")
    if not (device.startswith("cpu") or on_cuda):
        raise SystemExit(f"--device {device}: this benchmark runs cpu (gloo) or cuda (nccl)")
    args.device = "cuda" if on_cuda else "cpu"  # each rank takes its LOCAL_RANK's GPU
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    shape = args.shape or ("full" if on_cuda else "reduced")
    args.requests = args.requests or (16 if on_cuda else 4)
    args.max_tokens = args.max_tokens or (32 if on_cuda else 16)
    threads = args.threads or 1  # one OpenMP thread per rank: N ranks never ask for more than N threads

    try:
        asked = sorted({int(t) for t in args.tp.split(",")}) if args.tp else None
    except ValueError:
        asked = [0]
    if asked and asked[0] < 1:
        raise SystemExit(f"--tp {args.tp}: positive integers, e.g. 1,2,4")
    sizes = weight_sizes(tp_config(shape, 1), args.dtype)  # the head count changes no parameter's size
    tps, why = (asked, "asked for") if asked else default_tps(device, sizes)
    config = tp_config(shape, max(tps))
    if on_cuda and max(tps) > torch.cuda.device_count():
        raise SystemExit(f"tp {max(tps)} needs {max(tps)} GPUs; this host has {torch.cuda.device_count()}")
    if 1 not in tps:
        tps = [1, *tps]  # every figure is relative to tp 1
        why += "; tp 1 added (the reference)"

    work = Path(tempfile.mkdtemp(prefix="engine_tp_"))
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else work / f"qwen-vl-{shape}"
    started, load_start = time.perf_counter(), ", ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        print(f"checkpoint: {engine_generate.ensure_checkpoint(ckpt, shape, config)}", flush=True)
        photo_dir = work / "photos"
        save_photos(photo_dir)
        out = work / "results"
        out.mkdir()
        results: dict[int, list[dict]] = {}
        failed: dict[int, str] = {}
        pressure: dict[int, float | None] = {}
        for tp in tps:
            t0, psi0 = time.perf_counter(), cpu_pressure_us()
            ok, note = run_tp(tp, args, ckpt, photo_dir, out, work / f"tp{tp}.log", threads)
            seconds = time.perf_counter() - t0
            psi1 = cpu_pressure_us()
            pressure[tp] = None if psi0 is None or psi1 is None else (psi1 - psi0) / 1e6 / seconds
            if ok:
                results[tp] = [json.loads((out / f"tp{tp}.rank{r}.json").read_text()) for r in range(tp)]
                print(
                    f"tp {tp}: {tp} rank(s) done in {seconds:.1f} s (start-up and loading included)",
                    flush=True,
                )
            else:
                failed[tp] = note
                print(
                    f"tp {tp}: FAILED ({note}); the end of its log:\n{log_tail(work / f'tp{tp}.log')}",
                    flush=True,
                )

        any_rank = next((ranks[0] for ranks in results.values()), None)
        print(f"\nmachine: {os.cpu_count()} CPUs ({device_name('cpu')}), "
              f"{(proc_kib('MemTotal', '/proc/meminfo') or 0) / 2**20:.1f} GiB host memory, load average at the start {load_start}; "
              f"torch {torch.__version__}, python {platform.python_version()}; {threads} thread(s) per rank "
              f"(OMP_NUM_THREADS)")  # fmt: skip
        if on_cuda:
            names = sorted({r["device_name"] for ranks in results.values() for r in ranks}) or [
                device_name("cuda")
            ]
            print(f"devices: {torch.cuda.device_count()} x {', '.join(names)} (nccl), one GPU per rank")
        else:
            print("devices: CPU, gloo; every rank of every tp shares the same cores")
        v = config["visual"]
        print(f"model: shape {shape} (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
              f"{config['num_attention_heads']} heads, MLP width {config['intermediate_size'] // 2}, vocab "
              f"{config['vocab_size']:,}, vision width {v['width']} / {v['layers']} layers), {args.dtype}; unsplit: "
              f"language {sizes['lm'] / MIB:,.1f} MiB, vision {sizes['vision'] / MIB:,.1f} MiB, other "
              f"{sizes['other'] / MIB:,.3f} MiB (final norm)")  # fmt: skip
        prompt_len = (
            f"{any_rank['prompt_tokens']} prompt tokens each (one image = 256 of them)" if any_rank else ""
        )
        print(f"workload: {args.requests} requests at once, {prompt_len}, {args.max_tokens} new tokens each "
              f"(greedy, min_tokens = max_tokens), prefix and image caches off; fastest of {args.rounds} round(s) "
              f"after a warm-up; tps {', '.join(map(str, tps))} ({why}); max_model_len {args.max_model_len}")  # fmt: skip
        print("columns: LM weights = parameters named transformer.h.*, transformer.wte.*, lm_head.* on the rank; "
              "KV cache = llm.runner.kv_caches; RSS = /proc/self/status VmRSS before building the LLM (torch and "
              "the engine imported), peak = VmHWM at the end (the rank's whole life: loading, warm-up, workload), end "
              "= RssAnon / resident pages of the checkpoint files mapped at the end (/proc/self/smaps); "
              "prefill = the engine steps before every request had its first token; decode step = the median "
              "of the rest; wall = the timed generate.\n")  # fmt: skip

        same = report(results, failed, pressure, on_cuda)
        print(
            "\nmeasured: per-rank weight, KV and peak memory, tokens against tp 1, and the step and wall times of "
            "each setting, all from one run of this script."
        )
        if on_cuda:
            print("the speed-ups above are tensor parallelism's on these GPUs (one per rank, nccl); the vision "
                  "tower runs whole on every rank, so a prefill with images gains less than a decode step. Not "
                  "measured: multi-node runs. In bf16 the all-reduces sum in another order than tp 1's matmuls, so a "
                  "token that differs late in a request may be a flipped near-tie: --dtype float32 checks exactness.")  # fmt: skip
        else:
            cpus = os.cpu_count() or 1
            over = [t for t in tps if t * threads > cpus]
            crowd = (f"tp {', '.join(map(str, over))} run{'s' if len(over) == 1 else ''} more threads than there "
                     f"are cores, so ranks take turns" if over else "no tp here oversubscribes the cores")  # fmt: skip
            print(f"not measured: a tensor-parallel speed-up. The ranks are processes sharing this host's {cpus} "
                  f"cores, {threads} thread(s) each: tp N splits the work but adds no compute ({crowd}), every "
                  f"layer adds two gloo all-reduces over loopback (a collective waits for the slowest rank, so "
                  f"other load on the host lands in every step), and the vision tower runs whole on every rank. "
                  f"The CPU times show the cost of splitting, not what N devices would give.")  # fmt: skip
            print("what to read on CPU: the per-rank weight and KV columns (exact bytes). RSS is noisier than it "
                  "looks: ~all of 'RSS before LLM' is the torch runtime every rank repeats, and when the checkpoint's "
                  "dtype is the run's, the weights stay the checkpoint file's mapped pages (ckpt-mapped), resident "
                  "only once touched (the LM head every step, the embedding table only at the rows looked up) and "
                  "shared through the page cache by every rank of the host.")  # fmt: skip
        print(f"total wall time {time.perf_counter() - started:.0f} s; load average now "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
        if failed:
            print(f"FAIL: tp {', '.join(map(str, sorted(failed)))} did not finish")
            return 1
        if not same:
            print("FAIL: tokens differ between tp settings or ranks")
            return 1
        print("tokens: identical on every rank of every tp")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- worker (one rank, under torchrun) -----------------------------------------------------------------


def status_bytes(key: str) -> int:
    return (proc_kib(key) or 0) * 1024


def mapped_rss(folder: str) -> int:
    """Resident bytes of this process's mappings of files under `folder` (/proc/self/smaps): on CPU the
    loaded weights can be the checkpoint's own pages (safetensors hands out tensors over its mmap when
    the dtype matches), which count in RSS only once touched."""
    prefix = os.path.realpath(folder) + os.sep
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if not first.endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
                    parts = line.split(maxsplit=5)
                    inside = len(parts) == 6 and parts[5].strip().startswith(prefix)
                elif inside and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from engine import LLM, SamplingParams
    from engine.device import synchronize

    tp, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(args.threads)
    rss_before = status_bytes("VmRSS")
    start = time.perf_counter()
    llm = LLM(args.checkpoint_dir, tensor_parallel_size=tp, device=args.device, dtype=args.dtype,
              max_batch_size=args.requests, max_model_len=args.max_model_len, enable_prefix_caching=False,
              image_cache_gb=0, progress=False)  # fmt: skip
    load_s = time.perf_counter() - start
    device = llm.config.device
    on_cuda = device.startswith("cuda")
    sizes = split_bytes((n, p.numel() * p.element_size()) for n, p in llm.model.named_parameters())
    kv_bytes = sum(t.numel() * t.element_size() for pair in llm.llm_engine.runner.kv_caches for t in pair)
    cuda_peak_build = torch.cuda.max_memory_allocated(device) if on_cuda else None

    photos = sorted(str(p) for p in Path(args.photo_dir).glob("*.jpg"))
    prompts = make_prompts(llm.tokenizer, photos, args.requests, args.prompt_tokens, True)
    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    llm.generate(prompts, SamplingParams(max_tokens=2, min_tokens=2), use_tqdm=False)  # warm-up
    if on_cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    best = None
    for _ in range(args.rounds):
        if dist.is_initialized():
            dist.barrier()  # the ranks start each round together; their clocks then measure the same span
        outs, wall, steps = timed_generate(llm, prompts, params)
        if best is None or wall < best[1]:
            best = (outs, wall, steps)
    outs, wall, steps = best
    decode = [s for s, prefill in steps if not prefill]
    result = {
        "tp": tp,
        "rank": rank,
        "device_name": device_name(device),
        "lm_bytes": sizes["lm"],
        "vision_bytes": sizes["vision"],
        "other_bytes": sizes["other"],
        "kv_bytes": kv_bytes,
        "num_blocks": llm.config.num_blocks,
        "rss_before_llm": rss_before,
        "peak_rss": status_bytes("VmHWM"),
        "rss_anon": status_bytes("RssAnon"),
        "rss_file": status_bytes("RssFile"),
        "ckpt_mapped": mapped_rss(args.checkpoint_dir),
        "cuda_peak_build": cuda_peak_build,
        "cuda_peak_run": torch.cuda.max_memory_allocated(device) if on_cuda else None,
        "load_s": load_s,
        "wall_s": wall,
        "prefill_ms": sum(s for s, prefill in steps if prefill) * 1e3,
        "step_ms_median": statistics.median(decode) * 1e3 if decode else float("nan"),
        "decode_steps": len(decode),
        "batch": len(outs),
        "prompt_tokens": round(statistics.median(len(o.prompt_token_ids) for o in outs)),
        "token_ids": [list(o.token_ids) for o in outs],
    }
    out = Path(args.out) / f"tp{tp}.rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)  # the launcher never reads a half-written result
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default=None, help="comma-separated tp sizes (default: 1,2,4 on cpu as memory allows; "
                                               "1,2,4,8 up to the GPU count on cuda)")  # fmt: skip
    ap.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--shape", choices=("reduced", "tiny", "small", "full"), default=None,
                    help="default: reduced on cpu, full on cuda")  # fmt: skip
    ap.add_argument(
        "--requests", type=int, default=None, help="requests per generate (default: 4 cpu, 16 cuda)"
    )
    ap.add_argument(
        "--max_tokens", type=int, default=None, help="new tokens per request (default: 16 cpu, 32 cuda)"
    )
    ap.add_argument(
        "--prompt_tokens", type=int, default=40, help="question tokens per request (image not counted)"
    )
    ap.add_argument("--max_model_len", type=int, default=512, help="sizes the KV cache (requests x this)")
    ap.add_argument("--rounds", type=int, default=3, help="timed generates per tp; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per rank (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for each tp's torchrun")
    ap.add_argument(
        "--checkpoint_dir", default=None, help="default: a temp dir; reused when it holds this shape"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--photo_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.rounds < 1 or (args.requests is not None and args.requests < 1):
        raise SystemExit("--rounds and --requests must be >= 1")
    sys.exit(launcher(args))


if __name__ == "__main__":
    main()
