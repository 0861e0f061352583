"""Checkpoint writers for tests, `python -m modeltest selftest` and the benchmarks: small models with
random weights in a family's real on-disk format, so the real loading code runs without downloads.
Public (exported from `engine`) so the harness needs nothing from the engine's internals."""

from __future__ import annotations

from .models.qwen_vl.random_checkpoint import tiny_config, write_random_checkpoint

__all__ = ["tiny_config", "write_random_checkpoint"]
