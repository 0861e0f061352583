"""Qwen2-VL's vision tower, as transformers' Qwen2VisionTransformerPretrainedModel computes it, and
Qwen2.5-VL's (Qwen2_5_VisionTransformerPretrainedModel); parameter names match their keys
(`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.*}`, `merger.{ln_q,mlp.0,mlp.2}`)
under the checkpoint's `visual.` prefix.

patches [N, 3 x 2 x 14 x 14] (processor.patchify, images concatenated) -> Conv3d patch embedding (no bias)
-> blocks: x + attn(LayerNorm(x)), x + mlp(LayerNorm(x)) (eps 1e-6; fused qkv with bias; 2-D rotary on
q and k in fp32: the first half of each head's rotary frequencies turn with the patch's row, the
second with its column; attention within each image only; mlp fc1 -> quick_gelu -> fc2) -> merger:
LayerNorm, each 2x2 group of patches (contiguous in the processor's order) concatenated, Linear ->
exact GELU -> Linear to the language model's width: [N / 4, hidden], image after image.

Qwen2.5-VL differs in: RMSNorm instead of LayerNorm (blocks and merger), a SwiGLU MLP (gate/up/down
with bias, silu), and window attention: the 2x2 merge groups are reordered window by window (windows
of window_size pixels, the image's edge windows smaller), every block but those in
fullatt_block_indexes attends within a window, and the merger's output goes back to the image's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the language model's width: what the merger outputs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    # Qwen2.5-VL
    windowed: bool = False  # RMSNorm, SwiGLU and window attention
    intermediate_size: int = 0  # the SwiGLU MLP's width
    window_size: int = 112  # pixels a side
    fullatt_block_indexes: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict, windowed: bool = False) -> VisionConfig:
        """config.json's vision_config. Qwen2.5-VL's names the tower's width hidden_size and the
        language model's out_hidden_size."""
        d = cls()
        rope = raw.get("rope_parameters") or {}
        keys = {k: raw.get(k, getattr(d, k)) for k in cls.__dataclass_fields__ if k not in ("rope_theta", "windowed")}
        if windowed:
            keys.update(embed_dim=raw["hidden_size"], hidden_size=raw["out_hidden_size"], hidden_act=raw.get("hidden_act", "silu"),
                        fullatt_block_indexes=tuple(raw.get("fullatt_block_indexes", ())))  # fmt: skip
        return cls(**keys, windowed=windowed, rope_theta=rope.get("rope_theta", raw.get("rope_theta", d.rope_theta)))


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "silu": F.silu,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def patch_positions(grids: list[tuple[int, int, int]], merge: int, device) -> torch.Tensor:
    """(row, column) of every patch [N, 2], in the processor's order (2x2 merge groups contiguous)."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        blocks = (h // merge, merge, w // merge, merge)
        rc = torch.stack([rows.reshape(blocks).transpose(1, 2).flatten(), cols.reshape(blocks).transpose(1, 2).flatten()], -1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x = patches.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.embed_dim)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # x: [N, embed_dim]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)  # [N, heads, head_dim] each
        cos, sin = cos[:, None, :], sin[:, None, :]  # fp32 [N, 1, head_dim]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        out = torch.cat([  # each image attends within itself
            F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
        ])  # fmt: skip
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.embed_dim, hidden), nn.Linear(hidden, cfg.embed_dim)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        width, inner = cfg.embed_dim, cfg.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(width, inner), nn.Linear(width, inner)
        self.down_proj = nn.Linear(inner, width)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6) if cfg.windowed else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = norm(cfg, cfg.embed_dim), norm(cfg, cfg.embed_dim)
        self.attn = VisionAttention(cfg)
        self.mlp = GatedMlp(cfg) if cfg.windowed else VisionMlp(cfg)

    def forward(self, x, lengths, cos, sin):
        x = x + self.attn(self.norm1(x), lengths, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg, cfg.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches [N, 3 x 2 x 14 x 14] of the images whose (t, h, w) grids are `grids`, concatenated ->
        [N / merge², hidden] (each image's tokens in order)."""
        cfg = self.config
        x = self.patch_embed(patches)
        head_dim = cfg.embed_dim // cfg.num_heads
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float, device=x.device) / (head_dim // 2)
        inv_freq = 1.0 / (cfg.rope_theta**quarter)  # [head_dim / 4]
        angles = (patch_positions(grids, cfg.spatial_merge_size, x.device)[..., None].float() * inv_freq).flatten(1)
        emb = torch.cat((angles, angles), dim=-1)  # [N, head_dim]: row angles, column angles, twice
        cos, sin = emb.cos(), emb.sin()
        lengths = [t * h * w for t, h, w in grids]
        if not cfg.windowed:
            for block in self.blocks:
                x = block(x, lengths, cos, sin)
            return self.merger(x)
        order, windows = window_order(grids, cfg)
        unit = cfg.spatial_merge_size**2
        x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, lengths if i in cfg.fullatt_block_indexes else windows, cos, sin)
        return self.merger(x)[torch.argsort(order)]


def window_order(grids: list[tuple[int, int, int]], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the merge groups of each image reordered window by window (windows of
    window_size pixels, cut short at the image's right and bottom edges), and each window's patch count."""
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merge groups a window side
    order, windows, first = [], [], 0
    for t, h, w in grids:
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        index = torch.arange(t * gh * gw).view(t, gh, gw) + first
        for frame in index:
            for r in range(0, gh, side):
                for c in range(0, gw, side):
                    window = frame[r : r + side, c : c + side].flatten()
                    order.append(window)
                    windows.append(len(window) * cfg.spatial_merge_size**2)
        first += t * gh * gw
    return torch.cat(order), windows
