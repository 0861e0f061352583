"""The decode stall chunked prefill removes: a few requests decoding while long prompts arrive, run
with enable_chunked_prefill off and on, side by side in one run.

    python benchmarks/engine_chunked_prefill.py [--decoders 4] [--long 4] [--long_tokens 1500]
        [--images 2] [--every 20] [--budget 256] [--rounds 2] [--attention_backend torch|sdpa] [--threads N]

Workload (the tiny random Qwen-VL with the real 151,936-token vocabulary, fp32, CPU, through
LLMEngine's add_request / step): `--decoders` short requests start together and decode for the whole
run (greedy, ignore_eos); once they are decoding, a long prompt (`--images` photos and text, about
`--long_tokens` tokens, 4 new tokens) arrives every `--every` steps, `--long` of them. Without
chunked prefill a long prompt is computed in one step, and every running decode waits for it; with
it, a step computes at most `--budget` tokens (max_num_batched_tokens): the decodes, then a chunk of
the prompt (an image span is never split, so a step may hold one span beyond the budget).

Reported per mode: the running decodes' inter-token gaps (time between a decoder's consecutive
tokens, as a streaming client sees them: the wall clock after the step that produced each) as max,
p99 and median; the long prompts' mean time to first token; and total throughput (generated tokens
and prompt + generated tokens per second over the whole workload). The modes take turns for
`--rounds` rounds on two engines built once (the machine's load drifts), figures over all rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FILLER = "The quick brown fox jumps over the lazy dog near the river bank, and then it runs away. "


def build(ckpt: Path, chunked: bool, args):
    from engine import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(
        model=ckpt, dtype="float32", device="cpu", block_size=16, num_blocks=1024, max_model_len=4096,
        max_batch_size=args.decoders + 4, enable_chunked_prefill=chunked,
        max_num_batched_tokens=args.budget if chunked else None, attention_backend=args.attention_backend,
        enable_prefix_caching=False, progress=False))  # fmt: skip


def long_prompt(engine, photos: list[str], images: int, tokens: int, turn: int, i: int) -> str:
    """`images` pictures and filler text, about `tokens` tokens; numbered so no two share a block."""
    head = f"({turn} {i}) " + "".join(f"Picture {k + 1}: <img>{photos[(i + k) % len(photos)]}</img>\n"
                                      for k in range(images))  # fmt: skip
    text = FILLER
    while len(engine.prompt_token_ids(head + text + FILLER)) < tokens:
        text += FILLER
    return head + text + "Summarize the pictures:"


def workload(engine, args, photos: list[str], turn: int) -> dict:
    """One run of the mixed workload; the decoders' gaps, the long prompts' TTFT, token counts, time."""
    from engine import RequestOutputKind, SamplingParams

    delta = SamplingParams(max_tokens=2000, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    longs = [long_prompt(engine, photos, args.images, args.long_tokens, turn, i) for i in range(args.long)]
    shorts = [f"({turn} {d}) Tell me a long story about a lighthouse keeper." for d in range(args.decoders)]
    prompt_tokens = sum(len(engine.prompt_token_ids(p)) for p in longs + shorts)
    t0 = time.perf_counter()
    for d, prompt in enumerate(shorts):
        engine.add_request(f"d{d}", prompt, delta)
    last: dict[str, float] = {}
    gaps: list[float] = []
    generated = 0
    arrived, ttft = 0, []
    step = 0
    while arrived < args.long or any(r.startswith("l") for r in engine.requests):
        if arrived < args.long and step >= args.warm_steps + arrived * args.every:
            engine.add_request(f"l{arrived}", longs[arrived], SamplingParams(max_tokens=4, ignore_eos=True))
            arrived += 1
        outs = engine.step()
        stamp = time.perf_counter()
        step += 1
        for out in outs:
            generated += len(out.token_ids)
            if out.request_id.startswith("d") and step > args.warm_steps:
                if out.request_id in last:
                    gaps.append(stamp - last[out.request_id])
            last[out.request_id] = stamp
            if out.finished and out.request_id.startswith("l"):
                ttft.append(out.ttft)
        if step > 100_000:
            raise RuntimeError("the workload did not finish")
    elapsed = time.perf_counter() - t0
    engine.abort_request([f"d{d}" for d in range(args.decoders)])
    return {"gaps": gaps, "ttft": ttft, "generated": generated, "tokens": generated + prompt_tokens,
            "elapsed": elapsed, "steps": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoders", type=int, default=4, help="requests decoding throughout")
    ap.add_argument("--long", type=int, default=4, help="long prompts arriving")
    ap.add_argument("--long_tokens", type=int, default=1500, help="about this many tokens each")
    ap.add_argument("--images", type=int, default=2, help="images in each long prompt")
    ap.add_argument("--every", type=int, default=20, help="steps between long prompts")
    ap.add_argument("--warm_steps", type=int, default=5, help="decode steps before the first long prompt")
    ap.add_argument("--budget", type=int, default=256, help="max_num_batched_tokens with chunked prefill")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--attention_backend", default=None, help="torch (the CPU default) or sdpa")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    import torch
    from engine_generate import device_name, percentile
    from PIL import Image
    from skimage import data
    from tabulate import tabulate

    from engine import tiny_config, write_random_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="engine_chunked_prefill_"))
    ckpt = write_random_checkpoint(work / "tiny-qwen-vl", tiny_config(), seed=0)
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos.append(str(work / f"{name}.png"))
        Image.fromarray(getattr(data, name)()).save(photos[-1])
    modes = {"unchunked": build(ckpt, False, args), f"chunked ({args.budget} tokens)": build(ckpt, True, args)}
    results: dict[str, list[dict]] = {name: [] for name in modes}
    for turn in range(args.rounds):
        for name, engine in modes.items():
            results[name].append(workload(engine, args, photos, turn))
    rows = []
    for name, runs in results.items():
        gaps = [g * 1e3 for r in runs for g in r["gaps"]]
        elapsed = sum(r["elapsed"] for r in runs)
        ttft = [t for r in runs for t in r["ttft"]]
        rows.append((name, f"{max(gaps):.1f}", f"{percentile(gaps, 99):.1f}", f"{statistics.median(gaps):.1f}",
                     f"{statistics.mean(ttft) * 1e3:.0f}", f"{sum(r['generated'] for r in runs) / elapsed:.1f}",
                     f"{sum(r['tokens'] for r in runs) / elapsed:.0f}", sum(r["steps"] for r in runs)))  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs ({device_name('cpu')}), {torch.get_num_threads()} torch threads; "
          f"attention {modes['unchunked'].runner.attention.name}; tiny random Qwen-VL (151,936-token vocabulary), fp32; {args.decoders} decoders, {args.long} long prompts "
          f"(~{args.long_tokens} tokens, {args.images} images each) every {args.every} steps; {args.rounds} rounds, "
          "the modes taking turns")  # fmt: skip
    print(tabulate(rows, headers=("mode", "decode gap max ms", "p99 ms", "median ms", "long TTFT ms",
                                  "generated tok/s", "total tok/s", "steps"), disable_numparse=True))  # fmt: skip


if __name__ == "__main__":
    main()
