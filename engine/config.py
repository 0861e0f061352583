"""EngineConfig: the engine's knobs, checked when it is built (a bad value names its key)."""

from __future__ import annotations

from dataclasses import dataclass

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
    attention_backend: str | None = None

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
