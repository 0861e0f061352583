"""Qwen2-VL's multimodal rotary positions (M-RoPE), as transformers' Qwen2VLModel.get_rope_index and
Qwen2VLRotaryEmbedding compute them.

Every token has three position ids (temporal, height, width). A text token has the same one in all
three, counting on from the previous token. An image of T x H x W patches, merged spatial_merge x
spatial_merge into T x H' x W' tokens, placed after the text so far (next position p): its token
(t, h, w) (row-major over t, h, w) gets (p + t, p + h, p + w), and the text after it continues at
p + max(H', W'). A sequence's `delta` = (its largest position + 1) - its token count: a token generated
at index i has position i + delta in all three (as transformers' decode does with its rope_deltas).

The rotary frequencies: head_dim/2 of them, split in mrope_section parts (e.g. [16, 24, 24]); part k
takes its angles from the k-th position id (k % 3), then cos/sin are doubled to head_dim as usual, and
q/k are rotated half-wise ([-x2, x1]), like Llama's.
"""

from __future__ import annotations

import numpy as np
import torch


def mrope_positions(num_tokens: int, images: list[tuple[int, int, tuple[int, int, int]]],
                    merge: int) -> tuple[np.ndarray, int]:  # fmt: skip
    """Positions [3, num_tokens] (int64) of a prompt whose images are (first token, token count,
    (T, H, W) patch grid) in order, and its delta."""
    positions = np.empty((3, num_tokens), dtype=np.int64)
    token, nxt = 0, 0  # the next token to place, the next text position
    for start, length, (t, h, w) in images:
        text = start - token
        positions[:, token:start] = nxt + np.arange(text)
        nxt += text
        gh, gw = h // merge, w // merge
        if t * gh * gw != length:
            raise ValueError(f"an image span of {length} tokens does not hold a {t}x{h}x{w} grid merged {merge}x{merge}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, start : start + length] = nxt + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        nxt += max(gh, gw)
        token = start + length
    positions[:, token:] = nxt + np.arange(num_tokens - token)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


class MRotaryEmbedding:
    """cos/sin [tokens, head_dim] (fp32) of packed tokens' three position ids."""

    def __init__(self, head_dim: int, base: float, mrope_section: list[int], device):
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must add up to head_dim / 2 = {head_dim // 2}")
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
        # which of the three position ids each frequency takes its angle from
        self.axis = torch.cat([torch.full((n,), i % 3, device=device) for i, n in enumerate(mrope_section)])

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, tokens] -> (cos, sin), each [tokens, head_dim]."""
        freqs = positions.float()[..., None] * self.inv_freq  # [3, tokens, head_dim/2]
        picked = freqs.gather(0, self.axis.expand(1, freqs.shape[1], -1))[0]  # [tokens, head_dim/2]
        emb = torch.cat((picked, picked), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim] rotated by cos/sin [tokens, head_dim] (fp32), in x's dtype as
    transformers computes it (cos/sin cast to x's dtype first)."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
