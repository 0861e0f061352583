"""The model registry: config.json's `model_type` -> the model family that runs it. The only place
the engine names a family; the core reaches models through `engine.models.base` alone."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import EngineError
from .base import ModelFamily, read_config

# model_type -> "module:class" of its family (imported when a checkpoint of that type is loaded)
REGISTRY: dict[str, tuple[str, str]] = {
    "qwen": ("engine.models.qwen_vl:QwenVLFamily", "Qwen-VL (Qwen/Qwen-VL, Qwen/Qwen-VL-Chat)"),
    "qwen2_vl": ("engine.models.qwen2_vl:Qwen2VLFamily", "Qwen2-VL (Qwen/Qwen2-VL-*)"),
    "qwen2_5_vl": ("engine.models.qwen2_vl:Qwen2VLFamily", "Qwen2.5-VL (Qwen/Qwen2.5-VL-*)"),
}


def supported() -> str:
    return ", ".join(f"{t!r} = {what}" for t, (_, what) in REGISTRY.items())


def load_family(model_path: str | Path, tp_size: int = 1) -> ModelFamily:
    """The family for the checkpoint in `model_path`, built from its config and tokenizer files."""
    folder = Path(model_path)
    raw, path = read_config(folder)
    model_type = raw.get("model_type", "qwen")  # early Qwen-VL exports wrote none
    if model_type not in REGISTRY:
        raise EngineError(f"{path}: model_type {model_type!r} is not a model the engine runs (supported: {supported()})")
    module, _, cls = REGISTRY[model_type][0].partition(":")
    family = getattr(importlib.import_module(module), cls)
    return family(folder, raw, path, tp_size)
