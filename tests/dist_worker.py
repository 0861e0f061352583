"""Helpers of the distributed tests: `torchrun` (start processes on CPU, bounded in time), and what
tests/test_tensor_parallel.py runs in each process (under torchrun) and in its own (tp 1): the engine
on the tiny Qwen-VL, recording what the comparison needs.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py CKPT PHOTOS OUT
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def torchrun(nproc: int, *args: str, timeout: float = 300, env: dict | None = None, wait: bool = True):
    """`python -m torch.distributed.run --standalone --nproc_per_node nproc *args` on CPU with a 60 s
    collective timeout: the finished process (subprocess.TimeoutExpired past `timeout`), or with
    wait=False the running Popen."""
    env = {**os.environ, "MODELTEST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in DIST_ENV:
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

LM_PREFIXES = ("transformer.h.", "transformer.wte.", "lm_head.")


def prompts(photos: list[str]) -> list:
    # 36 blocks of 16 tokens: the two one-image prompts and a text one fill the cache when admitted
    # together, so their growth preempts; the two-image prompt (~570 tokens with its output) runs alone
    return [
        [{"image": photos[0]}, {"text": "What is in the picture? Answer:"}],
        f"<img>{photos[3]}</img>What colour is it?",
        "The quick brown fox jumps over the lazy dog, and then it runs away into the forest.",
        "1 2 3 4 5 6 7 8 9 10",
        [{"image": photos[1]}, {"image": photos[2]}, {"text": "Compare the two pictures."}],
    ]


def run(ckpt: str, photo_dir: str, tp: int) -> dict:
    """Greedy and seeded-sampled outputs (a cache small enough to preempt), every step's logits of the
    greedy run, this rank's language-model weights, and what the loader gave it."""
    from engine import LLM, SamplingParams

    torch.set_num_threads(1)
    photos = sorted(str(p) for p in Path(photo_dir).iterdir())
    llm = LLM(ckpt, dtype="float32", device="cpu", tensor_parallel_size=tp, block_size=16, num_blocks=36,
              max_model_len=1024, max_batch_size=5, progress=False)  # fmt: skip
    steps: dict[str, list[torch.Tensor]] = {}
    real_run = llm.runner.run

    def recording_run(seqs, *args, **kwargs):
        out = real_run(seqs, *args, **kwargs)
        for row, seq in zip(out, seqs, strict=True):
            steps.setdefault(seq.request_id, []).append(row.clone())
        return out

    llm.runner.run = recording_run
    greedy = llm.generate(prompts(photos), SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    del llm.runner.run
    preemptions = llm.scheduler.num_preemptions
    sampled = llm.generate(prompts(photos), [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40,
                                                            seed=i, logprobs=2) for i in range(5)], use_tqdm=False)  # fmt: skip
    params = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    return {
        "greedy": [o.token_ids for o in greedy],
        "texts": [o.text for o in greedy],
        "logits": [torch.stack(steps[o.request_id]) for o in greedy],
        "sampled": [o.token_ids for o in sampled],
        "logprobs": [o.logprobs for o in sampled],
        "preemptions": preemptions,
        "num_blocks": llm.config.num_blocks,
        "lm_bytes": sum(p.numel() * p.element_size() for n, p in params.items() if n.startswith(LM_PREFIXES)),
        "params": params,
        "kv_shape": tuple(llm.runner.kv_caches[0][0].shape),
    }


if __name__ == "__main__":
    ckpt, photo_dir, out = sys.argv[1:4]
    result = run(ckpt, photo_dir, int(os.environ["WORLD_SIZE"]))
    torch.save(result, f"{out}.rank{os.environ['RANK']}.pt")
