"""Protects Qwen-VL image preprocessing: bit-identical to the original visual.py transform (torchvision
Resize((448, 448), BICUBIC) -> ToTensor -> Normalize(CLIP mean/std)) on real photos."""

import pytest
import torch
from PIL import Image

from engine.errors import EngineError
from engine.models.qwen_vl.processor import CLIP_MEAN, CLIP_STD, normalize, preprocess, resize


def _original_transform():
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose([
        transforms.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])  # fmt: skip


def test_matches_the_original_transform(photo_dir):
    paths = sorted(photo_dir.iterdir())[:3]  # non-square, grey and colour photos among them
    ours = preprocess(paths)
    ref = torch.stack([_original_transform()(Image.open(p).convert("RGB")) for p in paths])
    assert ours.shape == (3, 3, 448, 448) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_requests_keep_uint8_pixels_until_the_vision_tower(photo_dir, qwen_vl_llm):
    """A waiting request holds its image as resized uint8 (a quarter of float32's bytes); normalizing
    it later gives exactly the original transform's pixels, and the content key is unchanged."""
    from engine import SamplingParams
    from engine.image_cache import pixel_key

    photo = sorted(photo_dir.iterdir())[0]
    small = resize(photo)
    assert small.dtype == torch.uint8 and small.shape == (3, 448, 448)
    assert torch.equal(normalize(small), _original_transform()(Image.open(photo).convert("RGB")))
    seq = qwen_vl_llm.llm_engine._make_sequence("r", f"<img>{photo}</img>What is it?", SamplingParams(max_tokens=2))
    assert seq.images[0].data.dtype == torch.uint8 and [im.key for im in seq.images] == [pixel_key(small)]


def test_bad_images(tmp_path):
    with pytest.raises(EngineError, match="image not found"):
        preprocess([tmp_path / "nope.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(EngineError, match="image unreadable"):
        preprocess([tmp_path / "bad.jpg"])
    with pytest.raises(EngineError, match="not fetched"):
        preprocess(["https://example.com/a.jpg"])
