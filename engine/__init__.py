"""modeltest's bundled inference engine, with vLLM's API:

    from engine import LLM, SamplingParams
    outs = LLM("/data/Qwen-VL").generate(prompts, SamplingParams(max_tokens=10))

The names below are imported on first use, so `import engine.device` stays light.
"""

from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineError"]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from .sequence import RequestOutput

        return RequestOutput
    if name == "EngineError":
        from .errors import EngineError

        return EngineError
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
