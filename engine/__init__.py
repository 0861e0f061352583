"""modeltest's bundled inference engine, with vLLM's API:

    from engine import LLM, SamplingParams
    outs = LLM("/data/Qwen-VL").generate(prompts, SamplingParams(max_tokens=10))
    outs[0].outputs[0].text

    from engine import EngineArgs, LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model="/data/Qwen-VL"))
    engine.add_request("0", prompt, SamplingParams()); engine.step(); engine.abort_request("0")

The names below are the engine's public API (what the harness may use); they are imported on first
use, so `import engine` stays light.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "LLM": ".llm",
    "LLMEngine": ".llm_engine",
    "EngineStats": ".llm_engine",
    "check_model": ".llm_engine",
    "EngineArgs": ".config",
    "SamplingParams": ".sampling",
    "RequestOutputKind": ".sampling",
    "RequestOutput": ".sequence",
    "CompletionOutput": ".sequence",
    "EngineError": ".errors",
    "resolve_device": ".device",
    "DeviceError": ".device",
    "to_rgb": ".image_utils",
    "write_random_checkpoint": ".testing",
    "tiny_config": ".testing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
