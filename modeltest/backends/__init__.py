"""Backends turn requests into generations: `engine` (the bundled engine), `hf` (transformers),
`openai` (any OpenAI-compatible endpoint) and `predictions` (answers made elsewhere, for score-only mode)."""

from .base import BACKENDS, Backend, Generation, Request, SampleError, create_backend, open_image

__all__ = ["BACKENDS", "Backend", "Generation", "Request", "SampleError", "create_backend", "open_image"]
