"""Qwen-VL's vision tower, as the original visual.py computes it; parameter names match its keys
(`transformer.visual.*`) so the checkpoint loads with no renaming.

pixels [n, 3, 448, 448] -> conv1 (14x14 patches, no bias) -> + positional_embedding (256 stored
positions resized bicubically to the 32x32 patch grid) -> ln_pre -> ViT blocks (fused in_proj split
q|k|v *per head*, exact-erf GELU, LayerNorm eps 1e-6) -> resampler (256 learned queries with the
stored pos_embed; keys get the resized pos_embed, values none; kv_proj without bias; ln_q / ln_kv;
torch's nn.MultiheadAttention) -> ln_post -> x @ proj -> [n, 256, output_dim].
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def resize_pos(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """A square table of positions [L, C] resized bicubically (in fp32) to `tokens` positions."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(tokens)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, src, src]
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)  # [tgt*tgt, C]


class VisualAttention(nn.Module):
    """softmax(q k^T / sqrt(head_dim)) v over the 1,024 patches of each image, through torch's fused
    scaled_dot_product_attention: the original's bmm, softmax, bmm up to rounding (within 1e-6 in
    fp32), without materializing the [images x heads, 1024, 1024] scores: on 2 CPU cores the reduced
    benchmark shape's tower (width 128, 2 layers) took 0.54-0.70 s for 22 images, against 1.00-1.09 s
    the original's way, which `fused = False` computes (the benchmarks' transformers baseline)."""

    fused = True

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape  # x: [n, L, width]
        qkv = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # per head: [n, heads, L, head_dim]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = (t.reshape(n * self.heads, length, self.head_dim) for t in (q, k, v))
            probs = torch.bmm(q / math.sqrt(self.head_dim), k.transpose(1, 2)).softmax(dim=-1)  # [n*heads, L, L]
            out = torch.bmm(probs, v).view(n, self.heads, length, self.head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # nn.GELU's default: the exact erf form


class VisualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width)
        self.mlp = VisualMLP(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.output_dim
        self.pos_embed = nn.Parameter(torch.empty(cfg.n_queries, dim), requires_grad=False)
        self.query = nn.Parameter(torch.empty(cfg.n_queries, dim))
        self.kv_proj = nn.Linear(cfg.width, dim, bias=False) if cfg.width != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, dim // 128)
        self.ln_q = LayerNorm(dim)
        self.ln_kv = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # x: [n, L, width]
        key_pos = resize_pos(self.pos_embed, x.shape[1])  # [L, dim]
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, n, dim]
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, n, 1)  # [Q, n, dim]
        out = self.attn(q + self.pos_embed.unsqueeze(1), kv + key_pos.unsqueeze(1), kv, need_weights=False)[0]
        return out.permute(1, 0, 2)  # [n, Q, dim]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, cfg.width))  # fixed at 256 in the original
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = VisualTransformer(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = LayerNorm(cfg.output_dim)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x)  # [n, width, grid, grid]
        x = x.flatten(2).permute(0, 2, 1)  # [n, grid*grid, width]
        x = x + resize_pos(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))  # [n, Q, output_dim]
        return x @ self.proj
