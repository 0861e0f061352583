"""Qwen2-VL's image preprocessing, as transformers' Qwen2VLImageProcessor computes it (its torchvision
backend): dynamic resolution instead of a fixed size.

- `smart_resize`: the height and width rounded to multiples of patch_size x merge_size (28), scaled
  (keeping the aspect ratio as closely as possible) into [min_pixels, max_pixels];
- resize of the 8-bit RGB pixels to it, bicubic with antialiasing (torchvision), then (x - 255 mean)
  / (255 std) in float32 (CLIP's mean and std by default);
- patchify: 14x14 patches, ordered so that each 2x2 group the vision tower merges is contiguous, each
  patch repeated temporal_patch_size times (a still image as a 2-frame clip) and flattened to
  channel x frame x 14 x 14 values. Grid (1, H/14, W/14); the prompt holds H W / (14 14 4) image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_preprocessor_config(cls, raw: dict) -> ImageConfig:
        """From preprocessor_config.json: min_pixels / max_pixels, or size {shortest_edge, longest_edge}
        (the newer spelling of the same two numbers)."""
        size = raw.get("size") or {}
        d = cls()
        return cls(
            patch_size=raw.get("patch_size", d.patch_size),
            merge_size=raw.get("merge_size", d.merge_size),
            temporal_patch_size=raw.get("temporal_patch_size", d.temporal_patch_size),
            min_pixels=raw.get("min_pixels") or size.get("shortest_edge") or d.min_pixels,
            max_pixels=raw.get("max_pixels") or size.get("longest_edge") or d.max_pixels,
            mean=tuple(raw.get("image_mean", d.mean)),
            std=tuple(raw.get("image_std", d.std)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is resized to (see the module's docstring); ValueError past an aspect ratio of 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} pixels: its aspect ratio is beyond 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] at smart_resize's size."""
    from torchvision.transforms.v2 import functional as tvF

    size = smart_resize(pixels.shape[-2], pixels.shape[-1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return tvF.resize(pixels, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def patchify(pixels: torch.Tensor, cfg: ImageConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resized uint8 [3, h, w] -> (float32 patches [h w / 14², 3 x T x 14 x 14], grid (1, h/14, w/14))."""
    mean = torch.tensor(cfg.mean, device=pixels.device)[:, None, None] * 255
    std = torch.tensor(cfg.std, device=pixels.device)[:, None, None] * 255
    x = (pixels.float() - mean) / std
    c, h, w = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, c, p, p]
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)  # each patch as t identical frames
    return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)
