"""Qwen-VL's language model, as the original modeling_qwen.py computes it at inference; parameter
names match its keys (`transformer.h.N.*`, `transformer.wte`, `lm_head`).

- RMSNorm in fp32, cast back, then times the weight;
- c_attn (with bias) -> q|k|v -> rotary embedding in fp32 over the first rotary_dim dims
  (half-rotated: [-x2, x1]) -> queries times the log-n factor (positions past seq_length) ->
  attention -> c_proj (no bias);
- MLP: c_proj(w1(x) * silu(w2(x))).
- Dynamic NTK: the rotary base is stretched by alpha = max(2**ceil(log2(len/seq_length) + 1) - 1, 1)
  where len is the prompt length at prefill; the original keeps that alpha for the whole generation.

Tokens from several sequences are packed along one dimension: x is [tokens, hidden]. Each sequence
has its own NTK factor (its request state); `step_context` builds the rotary cos/sin of every packed
token with its sequence's factor, and the log-n factors, once per step for all layers.
"""

from __future__ import annotations

import functools
import math

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
from .config import QwenVLConfig
from .processor import normalize
from .vision import VisionTransformer

LOGN_TABLE_LEN = 32767  # the original precomputes log-n factors for positions 1..32767


def ntk_alpha(prompt_len: int, seq_length: int) -> float:
    """The original's dynamic-NTK factor, decided once from the prompt length at prefill."""
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class RotaryEmbedding:
    """cos/sin for (position, alpha), computed exactly as the original's cache is (fp32 outer product)."""

    def __init__(self, dim: int, base: float, device):
        self.dim, self.base, self.device = dim, base, device
        self._inv_freq: dict[float, torch.Tensor] = {}

    def inv_freq(self, alpha: float) -> torch.Tensor:
        if alpha not in self._inv_freq:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            self._inv_freq[alpha] = 1.0 / (base ** (torch.arange(0, self.dim, 2, device=self.device).float() / self.dim))
        return self._inv_freq[alpha]

    def __call__(self, positions: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin(positions.float()[:, None] * self.inv_freq(alpha)[None, :])

    def packed(self, positions: torch.Tensor, token_seq: torch.Tensor, alphas: list[float]):
        """cos/sin [tokens, dim] of packed tokens, each with its sequence's alpha (alphas[token_seq])."""
        distinct = sorted(set(alphas))
        if len(distinct) == 1:
            return self(positions, distinct[0])
        table = torch.stack([self.inv_freq(a) for a in distinct])  # [distinct alphas, dim/2]
        which = torch.tensor([distinct.index(a) for a in alphas], device=positions.device)[token_seq]
        return self._cos_sin(positions.float()[:, None] * table[which])

    @staticmethod
    def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat((freqs, freqs), dim=-1)  # freqs: [tokens, dim/2] -> emb: [tokens, dim]
        return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=4)
def _logn_values(seq_length: int) -> torch.Tensor:
    values = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, LOGN_TABLE_LEN + 1)]
    return torch.tensor(values)


def logn_table(seq_length: int, device) -> torch.Tensor:
    """[LOGN_TABLE_LEN] fp32: log_{seq_length}(p + 1) for position p past seq_length, else 1."""
    return _logn_values(seq_length).to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, rotary_dim] fp32."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:].float()
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot = x_rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((x_rot, x_pass), dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class StepContext:
    """What every layer needs for one forward step, built once per step."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None):
        self.cos, self.sin, self.logn = cos, sin, logn  # [tokens, rotary_dim] fp32 each; [tokens] fp32


class LayerInputs:
    """A step's context with its attention metadata and backend, as every layer takes them."""

    def __init__(self, context: StepContext, meta: AttentionMetadata, attention: AttentionBackend):
        self.cos, self.sin, self.logn = context.cos, context.sin, context.logn
        self.meta, self.attention = meta, attention


class QWenAttention(nn.Module):
    """Tensor parallel: each rank computes heads/N heads (c_attn's q, k and v split by head, c_proj by
    its input) and keeps their K/V."""

    def __init__(self, cfg: QwenVLConfig, ctx: ParallelContext):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads // ctx.tp_size, cfg.head_dim
        proj = cfg.kv_channels * cfg.num_attention_heads
        self.c_attn = ColumnParallelLinear(cfg.hidden_size, 3 * proj, True, ctx, parts=3)
        self.c_proj = RowParallelLinear(proj, cfg.hidden_size, not cfg.no_bias, ctx)

    def forward(self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], step: LayerInputs) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.c_attn(x).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (t.view(tokens, self.heads, self.head_dim) for t in (q, k, v))  # [tokens, heads, head_dim]
        q = apply_rotary(q, step.cos, step.sin)
        k = apply_rotary(k, step.cos, step.sin)
        if step.logn is not None:
            q = q * step.logn.type_as(q)[:, None, None]
        out = step.attention.forward(q, k, v, kv_cache[0], kv_cache[1], step.meta)
        return self.c_proj(out.reshape(tokens, -1))


class QWenMLP(nn.Module):
    def __init__(self, cfg: QwenVLConfig, ctx: ParallelContext):
        super().__init__()
        bias = not cfg.no_bias
        self.w1 = ColumnParallelLinear(cfg.hidden_size, cfg.mlp_width, bias, ctx)
        self.w2 = ColumnParallelLinear(cfg.hidden_size, cfg.mlp_width, bias, ctx)
        self.c_proj = RowParallelLinear(cfg.mlp_width, cfg.hidden_size, bias, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, cfg: QwenVLConfig, ctx: ParallelContext):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg, ctx)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg, ctx)

    def forward(self, x, kv_cache, step: LayerInputs):
        x = x + self.attn(self.ln_1(x), kv_cache, step)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, cfg: QwenVLConfig, ctx: ParallelContext):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.h = nn.ModuleList(QWenBlock(cfg, ctx) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.visual = VisionTransformer(cfg.visual)


class QwenVLForCausalLM(CausalLM):
    """The whole model over one packed step: `forward` gives the last layer's hidden states (before the
    final norm, which `compute_logits` applies to the rows that are sampled only). Under tensor
    parallelism the language model is sharded (see engine/distributed.py) and the vision tower is
    replicated on every rank, as the seed does."""

    def __init__(self, cfg: QwenVLConfig, ctx: ParallelContext | None = None):
        super().__init__()
        ctx = ctx or ParallelContext()
        self.config = cfg
        self.transformer = QWenModel(cfg, ctx)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)
        self._rotary: RotaryEmbedding | None = None
        self._logn: torch.Tensor | None = None

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [n, 3, H, W] -> [n, 256, hidden]."""
        return self.transformer.visual(pixels)

    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Resized uint8 pixels [3, H, W] each (what requests keep while they wait) -> [256, hidden] each,
        in one vision-tower batch."""
        device = self.lm_head.weight.device
        return list(self.encode_images(normalize(torch.stack(images).to(device))).unbind(0))

    def step_context(self, positions: torch.Tensor, token_seq: torch.Tensor, states: list[float]) -> StepContext:
        """Rotary cos/sin with each sequence's NTK factor (`states`), and log-n factors, for the step."""
        cfg, device = self.config, positions.device
        if self._rotary is None or self._rotary.device != device:
            self._rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base, device)
            self._logn = logn_table(cfg.seq_length, device) if cfg.use_logn_attn else None
        cos, sin = self._rotary.packed(positions, token_seq, states)
        return StepContext(cos, sin, self._logn[positions] if self._logn is not None else None)

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_meta: AttentionMetadata,
        context: StepContext,
        attention: AttentionBackend,
        image_features: torch.Tensor | None = None,  # [rows, hidden]
        image_rows: torch.Tensor | None = None,  # [rows] packed rows that take the image features, in order
    ) -> torch.Tensor:
        step = LayerInputs(context, attn_meta, attention)
        x = self.transformer.wte(input_ids)  # [tokens, hidden]
        if image_features is not None:
            x[image_rows] = image_features.reshape(-1, x.shape[-1]).to(x.dtype)
        for layer, kv_cache in zip(self.transformer.h, kv_caches, strict=True):
            x = layer(x, kv_cache, step)
        return x  # [tokens, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(hidden))  # [rows, vocab]
