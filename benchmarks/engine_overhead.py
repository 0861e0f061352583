"""The engine's own work per step, with the model taken out: how long the host spends scheduling,
preparing the packed inputs, sampling and post-processing (detokenizing, stop checks, outputs)
around a forward pass, at batch 1, 64 and 256 in decode and for a 64-prompt prefill step.

    python benchmarks/engine_overhead.py [--batches 1,64,256] [--rounds 5] [--steps 10] [--threads N]
        [--output_kind final_only|delta|cumulative]

The real engine (LLMEngine, the tiny random Qwen-VL with the real 151,936-token vocabulary, CPU,
fp32) runs its real `step()`; only the model is replaced by a stub that returns fixed logits
(and zero image features), so what is left is the engine's host-side cost, which on an accelerator
must stay well under a decode step of the full model (~10 ms) or it holds the device back.
Requests: a TextVQA-shaped prompt each (an image and a ~40-token question, ~300 tokens), decoding
far past the measured steps, with RequestOutputKind FINAL_ONLY as LLM.generate submits them
(--output_kind delta: a RequestOutput per request per step, as a streaming server gets them). Each phase is timed inside `step()`: schedule (Scheduler.schedule),
prepare (ModelRunner.prepare plus the runner's work around the forward: image features, prefix-cache
bookkeeping), sample (the Sampler, argmax included: an accelerator does that on the device) and
postprocess (the rest of the step: appending tokens, detokenizing, stop checks, outputs). Model
time (the stub, copying the fixed logits) is excluded. Figures: the median over all measured steps;
the settings take turns (--rounds), so a change in the machine's load hits them all alike.

Sampling settings compared (each a whole batch): plain greedy; greedy with min_tokens (end tokens
masked every step), with stop_token_ids, with a repetition penalty, with stop strings; and sampled
rows (temperature 0.8, top-p 0.9, top-k 50, a seed each). Targets (2-core CPU): prepare <= 1 ms at
batch 64 and <= 3 ms at batch 256; schedule + postprocess <= 1 ms at batch 64; min_tokens, stop ids
and repetition penalty within 1.5x of the plain greedy batch's engine time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = {
    "greedy": {},
    "min_tokens": {"min_tokens": 400},
    "stop ids": {"stop_token_ids": [11, 13, 30]},
    "repetition penalty": {"repetition_penalty": 1.1},
    "stop strings": {"stop": ["\n\nQuestion:", "###"]},
    "sampled (top-p/top-k)": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
}
QUESTION = "what is written on the sign near the left edge of the picture, in the background behind the person?"


class Timers:
    """Wraps the engine's phases with timers; the model is a stub returning fixed logits."""

    def __init__(self, engine, vocab: int, max_rows: int):
        import torch

        self.times: dict[str, float] = defaultdict(float)
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(max_rows, vocab, generator=g)
        out = torch.empty_like(self.logits)  # the stub's output buffer: no allocation (or free) per step
        model, runner, sched = engine.model, engine.runner, engine.scheduler
        hidden = model.config.hidden_size

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.times[name] += time.perf_counter() - t0

            return wrapper

        model.forward = timed("model", lambda input_ids, *a, **k: input_ids[:, None].float())
        model.compute_logits = timed("model", lambda h: out[: h.shape[0]].copy_(self.logits[: h.shape[0]]))
        model.embed_images = timed("model", lambda images: [torch.zeros(256, hidden) for _ in images])
        sched.schedule = timed("schedule", sched.schedule)
        runner.prepare = timed("prepare", runner.prepare)
        runner.execute = timed("execute", runner.execute)
        engine.sampler = timed("sample", engine.sampler)
        self.engine = engine

    def step(self) -> dict[str, float]:
        """One engine step; its phases in ms."""
        self.times.clear()
        t0 = time.perf_counter()
        self.engine.step()
        total = time.perf_counter() - t0
        t = self.times
        prepare = t["prepare"] + t["execute"] - t["model"]
        engine = total - t["model"]
        post = engine - t["schedule"] - prepare - t["sample"]
        return {k: v * 1e3 for k, v in (("schedule", t["schedule"]), ("prepare", prepare), ("sample", t["sample"]),
                                        ("postprocess", post), ("engine", engine))}  # fmt: skip


def build(ckpt: Path, batch: int):
    from engine import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(model=ckpt, dtype="float32", device="cpu", max_batch_size=batch,
                                                 max_model_len=1024, num_blocks=batch * 8, progress=False,
                                                 max_prefill_tokens=batch * 320))  # fmt: skip


def add(engine, photo: str, batch: int, setting: dict, tag: str, kind: str = "final_only", turn: int = 0) -> None:
    from engine import RequestOutputKind, SamplingParams

    for i in range(batch):
        extra = {"seed": i} if "temperature" in setting else {}
        params = SamplingParams(max_tokens=600, ignore_eos=True, output_kind=RequestOutputKind[kind.upper()],
                                **setting, **extra)  # fmt: skip
        # numbered first, so no two prompts (of this or an earlier turn) share a KV block: each prefill
        # computes all its tokens
        engine.add_request(f"{tag}-{i}", f"({turn} {tag} {i}) <img>{photo}</img>{QUESTION} Answer:", params)


def cpu_name() -> str:
    from engine_generate import device_name

    return device_name("cpu")


def median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=10, help="measured decode steps per setting and round")
    ap.add_argument("--rounds", type=int, default=5, help="turns each setting takes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--output_kind", choices=("final_only", "delta", "cumulative"), default="final_only")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from skimage import data
    from tabulate import tabulate

    from engine import tiny_config, write_random_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="engine_overhead_"))
    ckpt = write_random_checkpoint(work / "tiny-qwen-vl", tiny_config(), seed=0)
    photo = str(work / "astronaut.jpg")
    Image.fromarray(data.astronaut()).save(photo)
    batches = [int(b) for b in args.batches.split(",")]
    rows, prefills = [], []
    for batch in batches:
        engine = build(ckpt, batch)
        timers = Timers(engine, engine.family.spec.vocab_size, batch)
        add(engine, photo, 1, {}, "warm-up")  # one-time setup (tables the first step builds) is not measured
        for _ in range(3):
            timers.step()
        engine.abort_request("warm-up-0")
        steps: dict[str, list[dict[str, float]]] = defaultdict(list)
        for turn in range(args.rounds):  # the settings take turns, so a change in machine load hits them all
            for name, setting in SETTINGS.items():
                add(engine, photo, batch, setting, name, args.output_kind, turn)
                prefill = timers.step()  # all prompts admitted and prefilled in one step
                if batch == 64 and name == "greedy":
                    prefills.append(prefill)
                for _ in range(2):
                    timers.step()
                steps[name] += [timers.step() for _ in range(args.steps)]
                engine.abort_request([f"{name}-{i}" for i in range(batch)])
        greedy = median(steps["greedy"])["engine"]
        for name in SETTINGS:
            decode = median(steps[name])
            rows.append((batch, name, *(f"{decode[k]:.2f}" for k in ("schedule", "prepare", "sample", "postprocess",
                                                                     "engine")), f"{decode['engine'] / greedy:.2f}x"))  # fmt: skip
        del engine, timers
    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), {torch.get_num_threads()} torch threads; engine work "
          f"per decode step in ms (median of {args.rounds} rounds x {args.steps} steps, the settings taking turns), "
          f"the model replaced by a stub with fixed logits over 151,936 ids; outputs {args.output_kind}")  # fmt: skip
    print(tabulate(rows, headers=("batch", "requests", "schedule", "prepare", "sample", "postprocess", "engine",
                                  "vs greedy"), disable_numparse=True))  # fmt: skip
    if prefills:
        print("\nprefill step, 64 prompts (~300 tokens each, an image each), greedy: " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in median(prefills).items()))  # fmt: skip
    print("\ntargets: prepare <= 1 ms at batch 64, <= 3 ms at batch 256; schedule + postprocess <= 1 ms at batch 64; "
          "min_tokens / stop ids / repetition penalty <= 1.5x greedy")  # fmt: skip


if __name__ == "__main__":
    main()
