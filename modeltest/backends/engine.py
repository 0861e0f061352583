"""The `engine` backend: the bundled paged-attention engine (engine.LLM).

The engine's Qwen-VL model is built in its own issue; until it lands this backend says so clearly
instead of failing somewhere deep.
"""

from __future__ import annotations

from ..errors import ModelTestError
from .base import Backend, Generation, Request, check_model_path


class EngineBackend(Backend):
    name = "engine"
    supports_tp = True

    def __init__(self, model_cfg, device: str | None = None, tp: int = 1):
        check_model_path(model_cfg)
        try:
            from engine import LLM  # noqa: F401
        except ImportError:
            raise ModelTestError(
                "the bundled engine has no model runner yet (engine.LLM is not available in this version); "
                "use --backend hf for models transformers runs natively, or --predictions to score answers "
                "made elsewhere"
            ) from None

    def generate(self, requests: list[Request]) -> list[Generation]:  # pragma: no cover - lands with engine.LLM
        raise NotImplementedError
