"""Qwen2-VL's language model (Qwen2 with multimodal rotary positions), as transformers' Qwen2VLTextModel
computes it; parameter names match the checkpoint's (`model.embed_tokens`, `model.layers.N.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`).

- RMSNorm: in fp32, then weight x (the result cast back);
- attention: q/k/v projections with bias, fewer K/V heads than query heads (grouped-query attention, in
  the KV cache too), q and k rotated by M-RoPE (rope.py) in the model dtype, o_proj without bias;
- MLP: down(silu(gate(x)) * up(x)).

Tokens of several sequences are packed along one dimension: x is [tokens, hidden]. A sequence's state is
its prompt's M-RoPE positions and delta (`MRopeState`); `step_context` turns the step's packed token
indices into three position ids each (the prompt's own, or index + delta for generated tokens) and
their cos/sin, once per step for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import AttentionBackend, AttentionMetadata
from ...distributed import (
    ColumnParallelLinear,
    ParallelContext,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from ..base import CausalLM
from .layers import RMSNorm
from .processor import ImageConfig, patchify
from .rope import MRotaryEmbedding, apply_rotary
from .vision import VisionConfig, VisionTransformer


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> TextConfig:
        """From config.json: transformers >= 5 nests the language model's keys in text_config and the
        rotary ones in rope_parameters; the released checkpoints keep them at the top level with
        rope_scaling {mrope_section} and rope_theta."""
        text = {**raw, **(raw.get("text_config") or {})}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            tie_word_embeddings=raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class MRopeState:
    """A request's positions: its prompt's three position ids [3, prompt tokens] and its delta."""

    positions: torch.Tensor
    delta: int


class StepContext:
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # [tokens, head_dim] fp32 each


class Attention(nn.Module):
    """Tensor parallel: each rank computes heads/N query heads and kv_heads/N K/V heads."""

    def __init__(self, cfg: TextConfig, ctx: ParallelContext):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads // ctx.tp_size, cfg.num_key_value_heads // ctx.tp_size
        self.head_dim = cfg.head_dim
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_attention_heads * self.head_dim, True, ctx)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * self.head_dim, True, ctx)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * self.head_dim, True, ctx)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, False, ctx)

    def forward(self, x: torch.Tensor, kv_cache, context: StepContext, meta: AttentionMetadata,
                attention: AttentionBackend) -> torch.Tensor:  # fmt: skip
        tokens = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(tokens, self.heads, self.head_dim), context.cos, context.sin)
        k = apply_rotary(self.k_proj(x).view(tokens, self.kv_heads, self.head_dim), context.cos, context.sin)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        out = attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta)  # [tokens, heads, head_dim]
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, ctx: ParallelContext):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, False, ctx)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, False, ctx)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, ctx: ParallelContext):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ctx)

    def forward(self, x, kv_cache, context, meta, attention):
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, context, meta, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, ctx: ParallelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2VLLanguageModel(nn.Module):
    """The language half over one packed step: `forward` gives the last layer's hidden states (before
    the final norm, which `compute_logits` applies to the sampled rows only)."""

    def __init__(self, cfg: TextConfig, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext()
        self.text_config = cfg
        self.model = TextModel(cfg, ctx)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)
        self._rotary: MRotaryEmbedding | None = None

    def step_context(self, positions: torch.Tensor, token_seq: torch.Tensor, states: list[MRopeState]) -> StepContext:
        """M-RoPE cos/sin of the packed tokens: token index i of a sequence takes its prompt's position
        ids while i is in the prompt, else i + delta in all three."""
        cfg, device = self.text_config, positions.device
        if self._rotary is None or self._rotary.inv_freq.device != device:
            self._rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, list(cfg.mrope_section), device)
        lens = [s.positions.shape[1] for s in states]
        deltas = torch.tensor([s.delta for s in states], device=device)
        ids = (positions + deltas[token_seq]).expand(3, -1).clone()  # generated tokens: index + delta
        prompt = positions < torch.tensor(lens, device=device)[token_seq]
        for row in token_seq[prompt].unique().tolist():  # the sequences with prompt tokens in this step
            state = states[row]
            if state.positions.device != device:  # moved once per request, not every step
                state.positions = state.positions.to(device)
            mine = prompt & (token_seq == row)
            ids[:, mine] = state.positions[:, positions[mine]]
        return StepContext(*self._rotary(ids))

    def forward(self, input_ids, kv_caches, attn_meta, context, attention, image_features=None, image_rows=None):
        x = self.model.embed_tokens(input_ids)  # [tokens, hidden]
        if image_features is not None:
            x[image_rows] = image_features.reshape(-1, x.shape[-1]).to(x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, kv_cache, context, attn_meta, attention)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))  # [rows, vocab]


class Qwen2VLForCausalLM(Qwen2VLLanguageModel, CausalLM):
    """The whole model: the language half above and the vision tower (`visual`, replicated on every rank
    under tensor parallelism). Tied embeddings share one tensor between embed_tokens and lm_head."""

    def __init__(self, cfg: TextConfig, vision: VisionConfig, image_cfg: ImageConfig, ctx: ParallelContext | None = None):
        super().__init__(cfg, ctx)
        self.visual = VisionTransformer(vision)
        self.image_cfg = image_cfg
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Resized uint8 pixels [3, h, w] each -> [h w / (14 14 4), hidden] each, in one vision-tower batch."""
        device = self.lm_head.weight.device
        pieces = [patchify(image.to(device), self.image_cfg) for image in images]
        features = self.visual(torch.cat([p for p, _ in pieces]), [g for _, g in pieces])
        merge = self.image_cfg.merge_size**2
        return list(features.split([g[1] * g[2] // merge for _, g in pieces]))
