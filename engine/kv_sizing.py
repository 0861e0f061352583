"""How many KV blocks the engine gets: `num_blocks`, or `kv_cache_memory_gb`, or what the device has
left after a warm-up step (accelerators, the seed's way), or a share of host memory (cpu); never more
than a full batch of max_model_len sequences needs. The decision is logged (logger `engine`)."""

from __future__ import annotations

import logging
import os

import torch

from .block_manager import BlockManager, blocks_for
from .config import EngineConfig
from .device import (
    MemoryInfo,
    available_memory,
    empty_cache,
    memory_info,
    now,
    peak_memory,
    reset_peak_memory,
)
from .distributed import ParallelContext
from .errors import EngineError
from .model_runner import ModelRunner
from .models.base import CausalLM, ModelFamily
from .sampling import SamplingParams
from .sequence import Sequence

logger = logging.getLogger("engine")

ACTIVATION_RESERVE = 2 << 30  # bytes kept free for activations on an accelerator sized without a warm-up
CPU_KV_SHARE = 0.5  # at most this share of the host's available memory goes to the KV cache on CPU


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def kv_budget(info: MemoryInfo, peak: int, fraction: float, reserved_gb: float) -> tuple[float, str]:
    """Bytes for the KV cache after a warm-up, the seed's formula: fraction x device memory - reserved
    - the warm-up's peak (weights + activations) - memory used outside this process's allocator
    (the driver context, other processes)."""
    others = max(0, info.total - info.free - info.torch_reserved)
    reserved = reserved_gb * (1 << 30)
    budget = fraction * info.total - reserved - peak - others
    why = (f"{fraction:.0%} of {_gib(info.total)} GiB device memory - {reserved_gb:g} GiB reserved - "
           f"{_gib(peak)} GiB warm-up peak - {_gib(others)} GiB used outside torch")  # fmt: skip
    return budget, why


def size_kv_cache(c: EngineConfig, family: ModelFamily, model: CausalLM, warmup: bool | None,
                  parallel: ParallelContext | None = None, images: list | None = None) -> int:  # fmt: skip
    """Blocks for the KV cache (see the module's docstring); under tensor parallelism the fewest any
    rank of the group has room for, so all ranks hold the same blocks."""
    per_block = ModelRunner.kv_bytes_per_block(family.spec, c.block_size, c.dtype)
    wanted = c.max_batch_size * blocks_for(c.max_model_len, c.block_size)
    info = memory_info(c.device)
    if warmup is None:
        warmup = info is not None and c.num_blocks is None and c.kv_cache_memory_gb is None
    peak = profile_run(c, family, model, images) if warmup else None
    if c.num_blocks is not None:
        num, why = c.num_blocks, "num_blocks"
    else:
        if c.kv_cache_memory_gb is not None:
            budget, why = c.kv_cache_memory_gb * (1 << 30), "kv_cache_memory_gb"
        elif info is None:  # the processes torchrun started on this host share its memory
            procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            budget = available_memory(c.device) * CPU_KV_SHARE / procs
            why = f"{CPU_KV_SHARE:.0%} of available host memory" + (f" / {procs} processes on this host" if procs > 1 else "")
        elif peak is not None:
            budget, why = kv_budget(memory_info(c.device), peak, c.memory_fraction, c.reserved_memory_gb)
        else:
            budget = info.free * c.memory_fraction - c.reserved_memory_gb * (1 << 30) - ACTIVATION_RESERVE
            why = (f"{c.memory_fraction:.0%} of {_gib(info.free)} GiB free device memory - {c.reserved_memory_gb:g} "
                   f"GiB reserved - {_gib(ACTIVATION_RESERVE)} GiB for activations (no warm-up)")  # fmt: skip
        num = min(wanted, int(budget // per_block))
        if num == wanted:
            why = f"a full batch: {c.max_batch_size} x max_model_len {c.max_model_len}; within {why}"
        else:
            why = f"{why}; a full batch of {c.max_batch_size} x max_model_len {c.max_model_len} wants {wanted} blocks"
    if parallel is not None and parallel.tp_size > 1:
        fewest = parallel.min_int(num)
        if fewest < num:
            num, why = fewest, f"the fewest of the {parallel.tp_size} tensor-parallel ranks; here {why}"
    if num < 1:
        raise EngineError(
            f"no room for the KV cache ({why}): one block of {c.block_size} tokens needs {per_block / 2**20:.1f} MiB; "
            "lower block_size or max_model_len, or set kv_cache_memory_gb / num_blocks"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)",
        num, c.block_size, num * c.block_size, num * per_block / 2**30, why,
    )  # fmt: skip
    return num


@torch.inference_mode()
def profile_run(c: EngineConfig, family: ModelFamily, model: CausalLM, images: list | None = None) -> int | None:
    """The seed's warm-up: one prefill step as large as the scheduler can build (max_prefill_tokens
    tokens over up to max_batch_size sequences, each long enough starting with an image of the
    largest size — `images` in turn (EngineArgs.warmup_images, the seed's warm_up_image_path), else a
    blank one — all images through the vision tower at once) on a throwaway KV cache. Returns the
    device's peak bytes in use (weights + activations, the throwaway cache excluded); None on cpu."""
    total = min(c.max_prefill_tokens, c.max_batch_size * c.max_model_len)
    span = family.warmup_tokens_per_image
    n = max(-(-total // c.max_model_len), min(c.max_batch_size, max(1, total // span)))
    lengths = [total // n + (i < total % n) for i in range(n)]
    seqs = []
    for i, length in enumerate(lengths):
        prompt = family.warmup_prompt(length, i, images[i % len(images)] if images else None)
        seqs.append(Sequence(seq_id=-1 - i, request_id=f"warm-up-{i}", prompt="", prompt_token_ids=prompt.token_ids,
                             params=SamplingParams(max_tokens=1), end_ids=frozenset(), images=prompt.images,
                             state=family.request_state(prompt)[0]))  # fmt: skip
    blocks = sum(blocks_for(length, c.block_size) for length in lengths)
    reset_peak_memory(c.device)
    bm = BlockManager(blocks, c.block_size, prefix_caching=False)
    runner = ModelRunner(model, family.spec, bm, c.dtype, c.device, c.attention_backend)
    for seq in seqs:
        bm.allocate(seq)
    images = sum(len(seq.images) for seq in seqs)
    t0 = now(c.device)
    runner.run(seqs)
    elapsed = now(c.device) - t0
    peak = peak_memory(c.device)
    del runner, bm, seqs
    empty_cache(c.device)
    throwaway = blocks * ModelRunner.kv_bytes_per_block(family.spec, c.block_size, c.dtype)
    shown = "not measured on cpu" if peak is None else f"peak {_gib(peak - throwaway)} GiB (weights + activations)"
    logger.info("warm-up: %d tokens in %d sequences, %d images, %.2f s; %s",
                total, n, images, elapsed, shown)  # fmt: skip
    return None if peak is None else peak - throwaway
