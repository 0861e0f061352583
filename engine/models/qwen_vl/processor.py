"""Qwen-VL image preprocessing, as visual.py's `image_transform` defines it: RGB, squashed to
448x448 with bicubic resampling (aspect ratio not kept), scaled to [0, 1], CLIP mean/std."""

from __future__ import annotations

import os

from ...errors import EngineError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 448


def load_image(source):
    """A path or PIL image -> RGB PIL image. URLs are not fetched (the engine never downloads)."""
    from PIL import Image, UnidentifiedImageError

    from ...image_utils import to_rgb

    try:
        if isinstance(source, Image.Image):
            return to_rgb(source, "in-memory image")
        path = os.fspath(source)
        if path.startswith(("http://", "https://")):
            raise EngineError(f"image URLs are not fetched: {path}; download the image and pass its path")
        try:
            with Image.open(path) as im:
                return to_rgb(im, path)
        except FileNotFoundError:
            raise EngineError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise EngineError(f"image unreadable: {path}: {e}") from None
    except ValueError as e:  # pixels no scaling can render
        raise EngineError(str(e)) from None


def resize(source, image_size: int = IMAGE_SIZE):
    """A path or PIL image -> its RGB pixels squashed to image_size x image_size (bicubic), uint8
    [3, H, W]: what a request keeps until its image reaches the vision tower (a quarter of the
    float32 pixels' bytes)."""
    import numpy as np
    import torch
    from PIL import Image

    img = load_image(source).resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize(pixels):
    """uint8 [..., 3, H, W] from `resize` -> float32 scaled to [0, 1] with CLIP's mean/std."""
    import torch

    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(3, 1, 1)
    return pixels.float().div(255).sub(mean).div(std)


def preprocess(images: list, image_size: int = IMAGE_SIZE):
    """Images (paths or PIL) -> pixel tensor [n, 3, image_size, image_size], float32."""
    import torch

    return torch.stack([normalize(resize(source, image_size)) for source in images])
