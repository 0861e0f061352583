"""Qwen-VL's config.json (the original configuration_qwen.py keys), read and checked up front.

Only the keys the computation depends on are kept; the rest of the file (auto_map, dropout
probabilities, flash-attention switches) does not change what the model computes at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ...errors import EngineError


@dataclass
class VisionConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    image_start_id: int = 151857

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # the original's int(d_model * mlp_ratio): 8192 for Qwen-VL


@dataclass
class QwenVLConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # the MLP width is half of it (w1 and w2 each intermediate_size // 2)
    layer_norm_epsilon: float = 1e-6
    seq_length: int = 2048  # where dynamic NTK and log-n scaling start
    max_position_embeddings: int = 8192
    rotary_emb_base: float = 10000
    rotary_pct: float = 1.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    torch_dtype: str | None = None
    visual: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    def check(self, where: str = "config.json") -> None:
        if self.hidden_size != self.kv_channels * self.num_attention_heads:
            raise EngineError(
                f"{where}: hidden_size {self.hidden_size} != kv_channels {self.kv_channels} x "
                f"num_attention_heads {self.num_attention_heads}; the original attention needs them equal"
            )
        if not 0 < self.rotary_pct <= 1 or self.rotary_dim % 2:
            raise EngineError(f"{where}: rotary_pct {self.rotary_pct} must give an even rotary dimension in (0, kv_channels]")
        v = self.visual
        if v.image_size % v.patch_size:
            raise EngineError(f"{where}: visual.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.heads:
            raise EngineError(f"{where}: visual.width {v.width} is not a multiple of visual.heads {v.heads}")
        if v.output_dim < 128 or v.output_dim % (v.output_dim // 128):
            raise EngineError(
                f"{where}: visual.output_dim {v.output_dim} must be >= 128 and divisible by its resampler "
                "head count (output_dim // 128)"
            )
        if v.output_dim != self.hidden_size:
            raise EngineError(f"{where}: visual.output_dim {v.output_dim} != hidden_size {self.hidden_size}")
        if math.isqrt(v.n_queries) ** 2 != v.n_queries:
            raise EngineError(f"{where}: visual.n_queries {v.n_queries} is not a square")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> QwenVLConfig:
        if raw.get("model_type") not in (None, "qwen"):
            raise EngineError(f"{where}: model_type {raw.get('model_type')!r} is not Qwen-VL (expected 'qwen')")
        if not isinstance(raw.get("visual"), dict):
            raise EngineError(
                f"{where}: no 'visual' section; this is a text-only Qwen checkpoint, not Qwen-VL "
                "(the engine runs Qwen/Qwen-VL and Qwen/Qwen-VL-Chat)"
            )
        if raw.get("scale_attn_weights", True) is not True:
            raise EngineError(
                f"{where}: scale_attn_weights {raw['scale_attn_weights']!r} is not supported; every Qwen-VL release "
                "scales attention by 1/sqrt(head_dim) (true)"
            )
        quant = raw.get("quantization_config")
        if quant:
            raise EngineError(
                f"{where}: quantized checkpoints ({quant.get('quant_method', 'unknown')}, {quant.get('bits', '?')}-bit) "
                "are not supported yet; use the bf16/fp16 release (Qwen/Qwen-VL or Qwen/Qwen-VL-Chat)"
            )
        kwargs = _pick(cls, raw, where)
        kwargs["visual"] = VisionConfig(**_pick(VisionConfig, raw["visual"], f"{where}: visual"))
        dtype = None
        for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
            if raw.get(flag):
                dtype = name
        kwargs["torch_dtype"] = dtype or raw.get("torch_dtype")
        config = cls(**kwargs)
        config.check(where)
        return config

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> QwenVLConfig:
        from ..base import read_config

        raw, path = read_config(Path(model_path))
        return cls.from_dict(raw, str(path))


def _pick(cls, raw: dict, where: str) -> dict:
    out = {}
    for f in fields(cls):
        if f.name in ("visual", "torch_dtype") or f.name not in raw:
            continue
        value = raw[f.name]
        kind = type(f.default)
        if kind is bool and not isinstance(value, bool):
            raise EngineError(f"{where}: key {f.name!r} must be true or false, got {value!r}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise EngineError(f"{where}: key {f.name!r} must be a number, got {value!r}")
        if kind is int and value != int(value):
            raise EngineError(f"{where}: key {f.name!r} must be an integer, got {value!r}")
        if kind in (int, float) and value <= 0 and f.name != "rotary_pct":
            raise EngineError(f"{where}: key {f.name!r} must be > 0, got {value!r}")
        out[f.name] = kind(value) if kind in (int, float) else value
    return out
