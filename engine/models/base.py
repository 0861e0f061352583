"""The model interface: what a model family gives the engine's core, which knows no family.

A family (engine/models/<family>/) is found through the registry in engine/models/__init__.py by
config.json's `model_type`, and provides:

- `ModelFamily`: built from the checkpoint folder; its config (the facts the core sizes the KV cache
  and checks requests with: `spec`), tokenizer, prompt rendering (`process_prompt`) and image
  preprocessing (`load_images`), the per-request state its positions need (`request_state`), a dummy
  prompt for the warm-up, the mapping from checkpoint tensor names to parameter names (the module's
  parameters may carry their own `weight_loader`: engine/loader.py), and the model module;
- `CausalLM`, the module: `step_context` (whatever its layers need once per step, built from the
  packed positions: rotary cos/sin, scaling factors), `embed_images`, `forward` over a packed step,
  and `compute_logits` for the rows that are sampled.

Image placement is generic: a prompt's images are `ImageSpan`s, each a run of `length` placeholder
positions from `start` whose embeddings the family's image features replace; a family with a variable
number of tokens per image simply returns spans of different lengths.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EngineError


@dataclass
class ImageSpan:
    """One image in a prompt: positions start .. start + length - 1 take its features."""

    start: int
    length: int
    key: str  # content hash of the preprocessed image: the feature-cache and prefix-cache key
    data: Any = None  # the family's preprocessed image (kept compact) until its features are computed


@dataclass
class ProcessedPrompt:
    """A prompt rendered into token ids, with its images preprocessed."""

    text: str  # the rendered model input
    token_ids: list[int]
    images: list[ImageSpan] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)  # ends added by the prompt's format (chat turns)


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a model that the core needs."""

    num_layers: int
    num_kv_heads: int  # on this rank (all of them / tensor_parallel_size), as stored in the KV cache
    head_dim: int
    max_model_len: int  # the default context length
    max_model_len_limit: int | None = None  # beyond it the model cannot run; None: no hard limit
    limit_reason: str = ""  # why, for the error message
    checkpoint_dtype: str | None = None  # "bfloat16", "float16", "float32" or None


class Tokenizer(ABC):
    """What the core needs of a family's tokenizer (the family's prompt rendering uses the rest)."""

    eos_token_id: int

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_stream(self) -> TokenStream:
        """A fresh incremental decoder for one request's generated ids."""


class TokenStream(ABC):
    """Decodes generated ids as they come: `push` returns the text that is now final; text that later
    ids could still change (a partial UTF-8 character, an open image span) is held back and shown
    by `pending`. `finish` flushes it. The pushed deltas plus `finish` concatenate to
    `tokenizer.decode(all ids)`."""

    @abstractmethod
    def push(self, token_id: int) -> str: ...

    @abstractmethod
    def pending(self) -> str: ...

    @abstractmethod
    def finish(self) -> str: ...


class CausalLM(nn.Module):
    """A family's model module over one packed step (tokens of several sequences along one dimension)."""

    @abstractmethod
    def step_context(self, positions: torch.Tensor, token_seq: torch.Tensor, states: list) -> Any:
        """What every layer needs for this step, built once: positions [tokens], token_seq [tokens]
        (the row of each token's sequence in the step), states (each sequence's request state)."""

    @abstractmethod
    def embed_images(self, images: list) -> list[torch.Tensor]:
        """The features of each preprocessed image (`ImageSpan.data`): [span length, hidden] each."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_meta,  # engine.attention.AttentionMetadata
        context: Any,  # from step_context
        attention,  # engine.attention.AttentionBackend
        image_features: torch.Tensor | None = None,  # [rows, hidden]
        image_rows: torch.Tensor | None = None,  # [rows] packed rows that take them, in order
    ) -> torch.Tensor:  # hidden states [tokens, hidden]
        ...

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab]."""


class ModelFamily(ABC):
    """One model family, built from a checkpoint folder (engine.models.REGISTRY names it by model_type)."""

    warmup_tokens_per_image: int = 0  # the shortest prompt holding one image of the largest size

    spec: ModelSpec
    tokenizer: Tokenizer

    @abstractmethod
    def __init__(self, model_path: Path, raw_config: dict, config_path: Path, tp_size: int = 1):
        """Reads the config and tokenizer; refuses a tp_size the model cannot be split by (before
        anything loads)."""

    @abstractmethod
    def build_model(self, parallel=None) -> CausalLM:
        """The module for this rank (`parallel`: an engine.distributed.ParallelContext; None: one
        device), built on the current default device (the loader uses `meta`)."""

    @abstractmethod
    def checkpoint_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills, or None for tensors the model ignores."""

    @abstractmethod
    def process_prompt(self, prompt) -> ProcessedPrompt:
        """Render one prompt (any form the family accepts) into token ids and image spans whose
        `data` is still the image's source; EngineError names what is wrong with it."""

    @abstractmethod
    def load_images(self, prompt: ProcessedPrompt) -> None:
        """Read and preprocess the prompt's images (`data`) and set their content keys; called once
        the request is known to fit, so a prompt refused for its length reads no image."""

    @abstractmethod
    def request_state(self, prompt: ProcessedPrompt) -> tuple[Any, bytes]:
        """(state, cache salt) of a request with this prompt (its images loaded): the state is what `step_context`
        gets for it for its whole life (recomputation after a preemption included); the salt goes into
        its prefix-cache keys, so blocks computed under another state are never shared."""

    @abstractmethod
    def warmup_prompt(self, num_tokens: int, index: int, image=None) -> ProcessedPrompt:
        """A prompt of exactly num_tokens ids for the warm-up step, starting with an image of the
        largest size when it fits: `image` (from `warmup_image`), else a blank one (index tells
        prompts apart)."""

    @abstractmethod
    def warmup_image(self, source):
        """A warm-up image (a path or PIL image) read and prepared as a request's would be, before any
        weight loads (EngineError if it cannot be read)."""


def read_config(model_path: Path) -> tuple[dict, Path]:
    """A checkpoint folder's config.json as a dict, and its path; EngineError names what is wrong."""
    path = model_path / "config.json"
    if not path.is_file():
        raise EngineError(f"{path}: not found; a checkpoint folder has config.json, its tokenizer files and weights")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise EngineError(f"{path}: not UTF-8 text: {e}") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw, path
