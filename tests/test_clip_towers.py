"""Protects modeltest.metrics.clip_towers: the lean image and text forwards equal open_clip's own
encode_image / encode_text on every variant of the standard towers they accept (GELU and QuickGELU,
LayerScale, no ln_pre, LayerNorm after pooling, a patch size that does not divide the image, text cut
anywhere after the longest caption), and every other tower is left to open_clip.

The models are small open_clip CLIPs built from configs, with random weights; the text is open_clip's
real tokenizer."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["", "a cat", "two dogs running on a beach next to the sea at sunset", "a red bus " * 30]


def tiny_clip(vision: dict | None = None, text: dict | None = None, quick_gelu: bool = False):
    import open_clip
    import torch

    torch.manual_seed(0)
    vision_cfg = {
        "layers": 3,
        "width": 48,
        "head_width": 16,
        "patch_size": 16,
        "image_size": 64,
        **(vision or {}),
    }
    text_cfg = {"layers": 3, "width": 32, "heads": 4, **(text or {})}
    model = open_clip.CLIP(24, vision_cfg, text_cfg, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1/0: random ones exercise them
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias") or "ls_" in name:
                p.normal_(0.5 if name.endswith("weight") or "ls_" in name else 0.0, 0.2)
    return model


VARIANTS = {
    "default": {},
    "quick_gelu, layer scale": {
        "vision": {"ls_init_value": 0.3},
        "text": {"ls_init_value": 0.3},
        "quick_gelu": True,
    },
    "no ln_pre, ln after pool": {"vision": {"no_ln_pre": True, "final_ln_after_pool": True}},
    "patch does not divide the image": {"vision": {"image_size": 70}},
    "no text projection": {"text": {"proj_type": "none", "width": 24}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lean_towers_equal_open_clip(variant):
    import open_clip
    import torch

    from modeltest.metrics.clip_towers import image_encoder, text_encoder

    model = tiny_clip(**VARIANTS[variant])
    encode_image, encode_text = image_encoder(model), text_encoder(model)
    assert encode_image is not None and encode_text is not None and encode_text.lean
    size = model.visual.image_size
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, *size)
    tokens = open_clip.tokenize(CAPTIONS)  # [4, 77], the last one truncated
    with torch.inference_mode():
        torch.testing.assert_close(encode_image(pixels), model.encode_image(pixels), atol=2e-5, rtol=1e-4)
        full = model.encode_text(tokens)
        for cut in (77, int(tokens.argmax(dim=-1).max()) + 1):  # the context length; the longest text's EOT
            torch.testing.assert_close(encode_text(tokens[:, :cut]), full, atol=2e-5, rtol=1e-4)
        short = tokens[:3, : int(tokens[:3].argmax(dim=-1).max()) + 1]  # a batch cut after ITS longest text
        torch.testing.assert_close(encode_text(short), full[:3], atol=2e-5, rtol=1e-4)
    assert full.std(dim=0).min() > 1e-3  # the captions really encode differently


def test_other_towers_are_left_to_open_clip():
    import open_clip
    import torch

    from modeltest.metrics.clip_towers import image_encoder, text_encoder

    assert image_encoder(tiny_clip(vision={"attentional_pool": True})) is None
    assert image_encoder(tiny_clip(vision={"pool_type": "avg"})) is None
    assert text_encoder(tiny_clip(text={"pool_type": "last"})) is None
    assert text_encoder(tiny_clip(text={"no_causal_mask": True})) is None

    custom = tiny_clip(vision={"qk_norm": True}, text={"qk_norm": True})  # open_clip's custom blocks
    assert image_encoder(custom) is None
    encode_text = text_encoder(custom)  # still cut after the longest text, by open_clip's transformer
    assert encode_text is not None and not encode_text.lean
    tokens = open_clip.tokenize(CAPTIONS[:3])
    with torch.inference_mode():
        cut = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        torch.testing.assert_close(encode_text(cut), custom.encode_text(tokens), atol=2e-5, rtol=1e-4)
