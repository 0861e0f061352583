"""EngineArgs (what a user passes, with vLLM's names as synonyms) and EngineConfig (the engine's
resolved knobs), checked when the engine is built: a bad value names its key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EngineError

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype, device: str, checkpoint_dtype: str | None) -> torch.dtype:
    """"auto": the checkpoint's dtype (bf16 for Qwen-VL) on an accelerator, float32 on CPU, as the
    original code picks its precision when no flag is set."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise EngineError(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cpu"):
            return torch.float32
        return DTYPES.get(checkpoint_dtype or "bfloat16", torch.bfloat16)
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


@dataclass
class EngineConfig:
    model: str
    dtype: torch.dtype
    device: str
    block_size: int = 128
    max_batch_size: int = 16
    max_model_len: int = 8192
    max_prefill_tokens: int | None = None
    num_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    memory_fraction: float = 0.9  # of the device's memory the engine may use (the seed's NPU_MEMORY_FRACTION)
    reserved_memory_gb: float = 0.0  # kept back from that (the seed's RESERVED_MEMORY_GB)
    image_cache_gb: float = 0.5  # vision features kept per distinct image (0 disables)
    enable_prefix_caching: bool = True  # reuse full KV blocks whose content (tokens, images) matches
    # a step's max_prefill_tokens budget covers decodes and prefills; longer prompts go in chunks
    enable_chunked_prefill: bool = True
    attention_backend: str | None = None
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (engine/cuda_graphs.py)

    def __post_init__(self):
        for key in ("block_size", "max_batch_size", "max_model_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineError(f"{key} must be a positive integer, got {value!r}")
        for key in ("max_prefill_tokens", "num_blocks"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EngineError(f"{key} must be a positive integer or None, got {value!r}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise EngineError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if self.image_cache_gb < 0:
            raise EngineError(f"image_cache_gb must be >= 0 (0 disables it), got {self.image_cache_gb!r}")
        if not 0 < self.memory_fraction <= 1:
            raise EngineError(f"memory_fraction (NPU_MEMORY_FRACTION) must be in (0, 1], got {self.memory_fraction!r}")
        if self.reserved_memory_gb < 0:
            raise EngineError(f"reserved_memory_gb (RESERVED_MEMORY_GB) must be >= 0, got {self.reserved_memory_gb!r}")
        if self.max_prefill_tokens is None:
            self.max_prefill_tokens = max(self.max_model_len, 8192)
        for key in ("enable_chunked_prefill", "enforce_eager"):
            if not isinstance(getattr(self, key), bool):
                raise EngineError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.enable_chunked_prefill and self.max_prefill_tokens < self.max_batch_size:
            # else the running decodes could take the whole budget and a prompt would never advance
            raise EngineError(
                f"max_num_batched_tokens (max_prefill_tokens) {self.max_prefill_tokens} is smaller than "
                f"max_num_seqs (max_batch_size) {self.max_batch_size}: with chunked prefill a step's token "
                "budget must hold one decode per running sequence; raise it or set enable_chunked_prefill=False"
            )


DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MEMORY_FRACTION = 0.9  # of the device's total memory the engine may use (weights, activations, KV)

# vLLM's argument name -> this engine's (both are accepted; given together they must agree)
SYNONYMS = {
    "max_num_seqs": "max_batch_size",
    "gpu_memory_utilization": "memory_fraction",
    "max_num_batched_tokens": "max_prefill_tokens",
}


@dataclass
class EngineArgs:
    """Everything `LLM(...)` and `LLMEngine.from_engine_args` take. vLLM's names work as synonyms:
    max_num_seqs = max_batch_size, gpu_memory_utilization = memory_fraction, max_num_batched_tokens =
    max_prefill_tokens. enable_chunked_prefill (on by default, as in vLLM v1): a step's
    max_prefill_tokens budget is shared by the running decodes (first) and the prefills, and a prompt
    longer than what is left is prefilled a chunk per step, so long prompts do not stall running
    decodes; False: the budget counts prompt tokens only and a prompt is computed in one step.
    enforce_eager (vLLM's name): on CUDA, decode steps replay CUDA graphs captured at start-up
    (engine/cuda_graphs.py) unless this is True.
    tensor_parallel_size > 1 runs under torchrun, one process per device (engine/distributed.py).
    trust_remote_code is accepted for compatibility and changes nothing: the engine never imports or
    runs code from a model folder."""

    model: str | Path
    dtype: str | torch.dtype = "auto"
    device: str | None = None
    block_size: int = 128
    max_batch_size: int | None = None  # sequences running at once (default 16)
    max_model_len: int | None = None
    max_prefill_tokens: int | None = None
    num_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    memory_fraction: float | None = None  # else NPU_MEMORY_FRACTION, else 0.9
    reserved_memory_gb: float | None = None  # else RESERVED_MEMORY_GB, else 0
    warmup: bool | None = None
    warmup_images: list[str] | None = None  # the warm-up's images (the seed's warm_up_image_path); None: blank
    image_cache_gb: float = 0.5
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str | None = None
    enforce_eager: bool = False
    seed: int = 0
    progress: bool = True
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None

    def __post_init__(self):
        for vllm_name, name in SYNONYMS.items():
            ours, theirs = getattr(self, name), getattr(self, vllm_name)
            if theirs is None:
                continue
            if ours is not None and ours != theirs:
                raise EngineError(f"{name}={ours!r} and {vllm_name}={theirs!r} disagree: they are the same setting, give one")
            setattr(self, name, theirs)
        if self.max_batch_size is None:
            self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise EngineError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise EngineError(f"trust_remote_code must be true or false, got {self.trust_remote_code!r}")

    def engine_config(self, device: str, checkpoint_dtype: str | None, max_model_len: int) -> EngineConfig:
        return EngineConfig(
            model=str(self.model),
            dtype=resolve_dtype(self.dtype, device, checkpoint_dtype),
            device=device,
            block_size=self.block_size,
            max_batch_size=self.max_batch_size,
            max_model_len=max_model_len,
            max_prefill_tokens=self.max_prefill_tokens,
            num_blocks=self.num_blocks,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            memory_fraction=env_knob("NPU_MEMORY_FRACTION", self.memory_fraction, DEFAULT_MEMORY_FRACTION),
            reserved_memory_gb=env_knob("RESERVED_MEMORY_GB", self.reserved_memory_gb, 0.0),
            image_cache_gb=self.image_cache_gb,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_chunked_prefill=self.enable_chunked_prefill,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
        )


def env_knob(name: str, value: float | None, default: float) -> float:
    """An explicit argument, else the seed's environment variable, else the default."""
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise EngineError(f"environment variable {name}={raw!r} is not a number") from None
