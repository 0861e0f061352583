"""Vision features cached per image: TextVQA asks several questions about the same picture, and the
vision tower (48 ViT layers plus the resampler in Qwen-VL) should run once per image, not once per
question. Keyed by a hash of the preprocessed pixels, so two different images never share an entry
whatever their file names; least recently used entries go first when the byte budget is full."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def pixel_key(pixels: torch.Tensor) -> str:
    """A content key for one preprocessed image [3, H, W]."""
    data = pixels.detach().contiguous().cpu().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = features
        self.bytes += size
