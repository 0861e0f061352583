"""Layers both halves of Qwen2-VL / Qwen2.5-VL use."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalized in fp32, cast back, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
