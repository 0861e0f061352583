"""Decode graphs on a GPU: the same engine with and without CUDA graphs (enforce_eager), side by side in one
run on one random checkpoint: whether the graphs were captured, their greedy tokens against eager's
(identical is expected), decode ms per step at each batch size (RequestOutput's token times) and the
speed-up. Needs CUDA (the graphs exist only there); the capture's CPU stand-in is in
tests/test_cuda_graphs.py.

    python benchmarks/cuda_graphs.py [--shape small|tiny|full] [--batches 1,8,32] [--tokens 64]
        [--checkpoint_dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_generate  # noqa: E402


def decode_ms(llm, prompts: list[str], tokens: int) -> tuple[float, list[list[int]]]:
    """ms per decode step of a batch of `prompts` (the median over requests of (last - first token time) /
    (tokens - 1)), and their greedy tokens."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens)
    llm.generate(prompts, SamplingParams(max_tokens=2, min_tokens=2), use_tqdm=False)  # warm-up
    outs = llm.generate(prompts, params, use_tqdm=False)
    steps = [(o.finish_time - o.first_token_time) / (tokens - 1) * 1e3 for o in outs]
    return statistics.median(steps), [list(o.token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("tiny", "small", "full"), default="small")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--checkpoint_dir", default=None)
    args = ap.parse_args()

    import torch

    from engine import LLM

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda_graphs.py needs a CUDA GPU (decode graphs exist only there)")
    batches = [int(b) for b in args.batches.split(",")]
    folder = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="cuda_graphs_"))
    ckpt = engine_generate.ensure_checkpoint(folder, args.shape)
    prompts = [f"Question {i}: " + " ".join(engine_generate.QUESTION_WORDS) for i in range(max(batches))]
    results = {}
    for eager in (True, False):
        t0 = time.perf_counter()
        llm = LLM(ckpt, dtype="bfloat16", device="cuda", attention_backend="cuda", max_batch_size=max(batches),
                  max_model_len=1024, enforce_eager=eager, progress=False)  # fmt: skip
        built = time.perf_counter() - t0
        captured = llm.llm_engine.runner.graphs is not None
        results[eager] = {b: decode_ms(llm, prompts[:b], args.tokens) for b in batches}
        print(f"{'eager' if eager else 'graphs'}: built in {built:.1f} s, graphs captured: {captured}")
        del llm
        torch.cuda.empty_cache()
    print(f"device {torch.cuda.get_device_name()}, shape {args.shape}, bf16, {args.tokens} tokens per request")
    print("batch   eager ms/step   graphs ms/step   speed-up   same tokens")
    for b in batches:
        (e_ms, e_ids), (g_ms, g_ids) = results[True][b], results[False][b]
        print(f"{b:5d}   {e_ms:13.2f}   {g_ms:14.2f}   {e_ms / g_ms:7.2f}x   {e_ids == g_ids}")


if __name__ == "__main__":
    main()
