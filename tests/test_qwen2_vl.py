"""Protects the Qwen2-VL pieces built so far (engine/models/qwen2_vl/, not yet a registered family)
against transformers' own implementation, which is the reference:

- M-RoPE positions: text only, one image, two images of different grids with text between, an image
  first and an image last, equal to Qwen2VLModel.get_rope_index, with the same delta;
- the rotary cos/sin of those positions (and of decode positions continued by the delta) equal to
  Qwen2VLRotaryEmbedding's, and q/k rotated as apply_rotary_pos_emb does;
- image preprocessing (smart_resize, bicubic antialiased resize, normalization, the patch order the
  vision tower merges, 2 frames per still image) equal to Qwen2VLImageProcessor's pixel_values and grid
  on five real photos of different sizes and aspect ratios;
- the vision tower (patch embedding, 2-D rotary in merge order, attention within each image, quick_gelu
  MLP, 2x2 patch merger) equal to Qwen2VisionTransformerPretrainedModel loaded with the same weights
  (its own parameter names), on three images of different grids in one batch, and an image alone
  giving its rows of the batch;
- the tokenizer on the real Qwen2 vocabulary (built from dashscope's qwen.tiktoken with Qwen2's special
  tokens at their ids): encode, decode, streaming, and Qwen2-VL-Instruct's chat template (default system
  prompt) equal to transformers' tokenizer and apply_chat_template;
- Qwen2.5-VL's vision tower (RMSNorm, SwiGLU, window attention with edge windows, full-attention
  blocks) equal to transformers';
- both config.json layouts give the same text config;
- the language model (RMSNorm, q/k/v with bias, grouped-query attention, M-RoPE, SwiGLU) over the paged
  cache with the torch reference attention: a prefill with two images' features in place and a decode
  step at index + delta, logits within 1e-4 of transformers' language model with every parameter
  random and the same position ids.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from engine.models.qwen2_vl.rope import MRotaryEmbedding, apply_rotary, mrope_positions

IMAGE, START, END = 9, 7, 8  # token ids standing for <|image_pad|>, <|vision_start|>, <|vision_end|>
MERGE = 2


def _prompt(parts: list) -> tuple[list[int], list[tuple[int, int, tuple[int, int, int]]]]:
    """Token ids and image spans from parts: an int n = n text tokens, a (T, H, W) grid = an image."""
    ids, images = [], []
    for part in parts:
        if isinstance(part, int):
            ids += [100 + (len(ids) + i) % 50 for i in range(part)]
        else:
            t, h, w = part
            n = t * (h // MERGE) * (w // MERGE)
            ids.append(START)
            images.append((len(ids), n, part))
            ids += [IMAGE] * n + [END]
    return ids, images


def _reference(ids: list[int], images) -> tuple[torch.Tensor, int]:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    input_ids = torch.tensor([ids])
    if not images:  # transformers gives a text-only prompt plain positions
        return torch.arange(len(ids)).expand(3, -1), 0
    me = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE)),
                         get_vision_position_ids=functools.partial(Qwen2VLModel.get_vision_position_ids, None))  # fmt: skip
    types = (input_ids == IMAGE).int()
    grids = torch.tensor([grid for _, _, grid in images])
    pos, delta = Qwen2VLModel.get_rope_index(me, input_ids, types, image_grid_thw=grids)
    return pos[:, 0], int(delta[0, 0])


CASES = {
    "text": [12],
    "one image": [5, (1, 4, 6), 7],
    "two images": [3, (1, 6, 4), 4, (1, 8, 8), 6],
    "image first": [(1, 4, 4), 5],
    "image last": [4, (1, 2, 10)],
}


@pytest.mark.parametrize("parts", CASES.values(), ids=CASES.keys())
def test_mrope_positions_equal_transformers(parts):
    ids, images = _prompt(parts)
    positions, delta = mrope_positions(len(ids), images, MERGE)
    want, want_delta = _reference(ids, images)
    assert torch.equal(torch.from_numpy(positions), want) and delta == want_delta


def test_a_span_that_does_not_hold_its_grid_is_refused():
    with pytest.raises(ValueError, match="does not hold a 1x4x6 grid"):
        mrope_positions(20, [(2, 5, (1, 4, 6))], MERGE)


@pytest.mark.parametrize("section", [[2, 3, 3], [16, 24, 24]])
def test_rotary_cos_sin_and_rotation_equal_transformers(section):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    head_dim = 2 * sum(section)
    config = Qwen2VLConfig(text_config=dict(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=10000.0,
                                            rope_scaling={"type": "mrope", "mrope_section": section})).text_config  # fmt: skip
    ids, images = _prompt(CASES["two images"])
    positions, delta = mrope_positions(len(ids), images, MERGE)
    decode = torch.arange(len(ids), len(ids) + 5).expand(3, -1) + delta  # generated tokens
    pos = torch.cat([torch.from_numpy(positions), decode], dim=1)  # [3, tokens]
    q = torch.randn(1, 4, pos.shape[1], head_dim, generator=torch.Generator().manual_seed(0))
    cos_ref, sin_ref = Qwen2VLRotaryEmbedding(config)(q, pos[:, None, :])  # [1, tokens, head_dim]
    cos, sin = MRotaryEmbedding(head_dim, 10000.0, section, "cpu")(pos)
    assert torch.allclose(cos, cos_ref[0], atol=1e-6) and torch.allclose(sin, sin_ref[0], atol=1e-6)
    want, _ = apply_rotary_pos_emb(q, q, cos_ref, sin_ref)  # [1, heads, tokens, head_dim]
    got = apply_rotary(q[0].transpose(0, 1), cos, sin)  # [tokens, heads, head_dim]
    assert torch.allclose(got, want[0].transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("name", ["astronaut.jpg", "coffee.png", "chelsea.jpg", "rocket.png", "camera.png"])
def test_image_preprocessing_equals_transformers(photo_dir, name):
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from engine.models.qwen2_vl.processor import ImageConfig, patchify, resize

    raw = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 48, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    reference = Qwen2VLImageProcessor(**raw)(Image.open(photo_dir / name).convert("RGB"), return_tensors="pt")
    pixels = torch.from_numpy(np.array(Image.open(photo_dir / name).convert("RGB"))).permute(2, 0, 1)
    patches, grid = patchify(resize(pixels, ImageConfig.from_preprocessor_config(raw)), ImageConfig())
    assert [list(grid)] == reference["image_grid_thw"].tolist()
    assert grid[1] * grid[2] <= 48 * 4 and torch.allclose(patches, reference["pixel_values"], atol=1e-5)


def test_smart_resize_keeps_the_pixels_in_range_and_refuses_extreme_shapes():
    from engine.models.qwen2_vl.processor import smart_resize

    assert smart_resize(448, 448, 28, 56 * 56, 28 * 28 * 1280) == (448, 448)
    assert smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280) == (56, 56)  # small: scaled up to min_pixels
    h, w = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 64)  # large: scaled down under max_pixels
    assert (h, w) == (252, 168) and h * w <= 28 * 28 * 64  # floor(4000 / beta / 28) * 28, the same for 3000
    with pytest.raises(ValueError, match="aspect ratio is beyond 200"):
        smart_resize(10, 2500, 28, 56 * 56, 28 * 28 * 1280)


def _patches(photo_dir, names, max_pixels=28 * 28 * 24):
    import numpy as np
    from PIL import Image

    from engine.models.qwen2_vl.processor import ImageConfig, patchify, resize

    cfg = ImageConfig(max_pixels=max_pixels)
    out = [patchify(resize(torch.from_numpy(np.array(Image.open(photo_dir / n).convert("RGB"))).permute(2, 0, 1), cfg), cfg)
           for n in names]  # fmt: skip
    return torch.cat([p for p, _ in out]), [g for _, g in out]


def test_vision_tower_equals_transformers(photo_dir):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from engine.models.qwen2_vl.vision import VisionConfig, VisionTransformer

    raw = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, in_channels=3)  # fmt: skip
    torch.manual_seed(0)
    ref = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**raw), attn_implementation="eager").eval()
    with torch.no_grad():  # sharp attention (random init's is nearly uniform), so positions and order matter
        for block in ref.blocks:
            block.attn.qkv.weight.mul_(30)
    ours = VisionTransformer(VisionConfig.from_dict(raw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the checkpoint's names
    patches, grids = _patches(photo_dir, ["coffee.png", "rocket.png", "astronaut.jpg"])  # three grids
    assert len({g for g in grids}) == 3
    with torch.inference_mode():
        want = ref(patches, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(patches, grids)
    assert got.shape == (sum(h * w for _, h, w in grids) // 4, 48)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with torch.inference_mode():  # one image alone gives its rows of the batch: attention stays within an image
        alone = ours(patches[: grids[0][1] * grids[0][2]], grids[:1])
    assert torch.allclose(alone, got[: len(alone)], atol=1e-5)


def _text_reference(section=(2, 3, 3)):
    """A tiny Qwen2-VL from transformers with every parameter random (biases too; sharp attention), and
    the same weights under the engine's names."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": list(section)},
                         tie_word_embeddings=False),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4),
    )  # fmt: skip
    torch.manual_seed(0)
    ref = Qwen2VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    state = {k.replace("model.language_model.", "model."): v for k, v in ref.state_dict().items() if "visual" not in k}
    return ref, config.to_dict(), state


def _paged_step(model, ids, state, kv_caches, start, features=None, rows=None):
    """One prefill (start 0) or decode step of one sequence through the torch reference attention on a
    paged cache of 4-token blocks (block b at slot b * 4): logits of every new token."""
    from engine.attention import AttentionMetadata
    from engine.attention.torch import TorchAttention

    end = start + len(ids)
    blocks = list(range((end + 3) // 4))
    meta = AttentionMetadata(slot_mapping=torch.arange(start, end), block_tables=torch.tensor([blocks]),
                             context_lens=torch.tensor([end]), query_lens=[len(ids)], context_lens_list=[end],
                             block_size=4)  # fmt: skip
    index = torch.arange(start, end)
    context = model.step_context(index, torch.zeros_like(index), [state])
    hidden = model(torch.tensor(ids), kv_caches, meta, context, TorchAttention(), features, rows)
    return model.compute_logits(hidden)


def test_language_model_equals_transformers_on_a_paged_cache():
    from engine.models.qwen2_vl.language import MRopeState, Qwen2VLLanguageModel, TextConfig

    ref, raw, state = _text_reference()
    cfg = TextConfig.from_dict(raw)
    assert (cfg.num_key_value_heads, cfg.mrope_section, cfg.head_dim) == (2, (2, 3, 3), 16)
    ours = Qwen2VLLanguageModel(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids, images = _prompt([5, (1, 4, 6), 7, (1, 2, 4), 3])
    ids = [i % 300 for i in ids]
    positions, delta = mrope_positions(len(ids), images, MERGE)
    rows = torch.tensor([s + j for s, n, _ in images for j in range(n)])
    features = torch.randn(len(rows), 64, generator=torch.Generator().manual_seed(2))
    nxt = 17  # a generated token, decoded at index len(ids) with position len(ids) + delta
    with torch.inference_mode():
        embeds = ref.model.language_model.embed_tokens(torch.tensor([ids + [nxt]]))
        embeds[0, rows] = features
        all_pos = torch.cat([torch.from_numpy(positions), torch.full((3, 1), len(ids) + delta)], dim=1)
        hidden = ref.model.language_model(inputs_embeds=embeds, position_ids=all_pos[:, None, :]).last_hidden_state
        want = ref.lm_head(hidden)[0]  # [tokens, vocab]
        caches = [(torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)) for _ in range(2)]
        st = MRopeState(torch.from_numpy(positions), delta)
        prefill = _paged_step(ours, ids, st, caches, 0, features, rows)
        decode = _paged_step(ours, [nxt], st, caches, len(ids))
    assert torch.allclose(prefill, want[: len(ids)], atol=1e-4), (prefill - want[: len(ids)]).abs().max()
    assert torch.allclose(decode, want[len(ids) :], atol=1e-4), (decode - want[len(ids) :]).abs().max()


def test_both_config_layouts_give_the_same_text_config():
    from engine.models.qwen2_vl.language import TextConfig

    released = {  # Qwen2-VL-7B-Instruct's config.json: the language model's keys at the top level
        "model_type": "qwen2_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "vision_config": {"depth": 32},
    }  # fmt: skip
    nested = {"model_type": "qwen2_vl", "tie_word_embeddings": False, "vision_config": {"depth": 32},
              "text_config": {**{k: v for k, v in released.items() if k not in ("rope_theta", "rope_scaling")},
                              "rope_parameters": {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}}  # fmt: skip
    a, b = TextConfig.from_dict(released), TextConfig.from_dict(nested)
    assert a == b and (a.head_dim, a.num_key_value_heads, a.mrope_section) == (128, 4, (16, 24, 24))


def test_qwen2_5_vl_vision_tower_with_window_attention_equals_transformers(photo_dir):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from engine.models.qwen2_vl.vision import VisionConfig, VisionTransformer

    # windows of 56 px = 2x2 merge groups: the photos' grids are not multiples of it (edge windows)
    raw = dict(depth=4, hidden_size=32, out_hidden_size=48, intermediate_size=40, num_heads=4, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
               in_channels=3, hidden_act="silu")  # fmt: skip
    torch.manual_seed(0)
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**raw),
                                                               attn_implementation="eager").eval()  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight random and attention sharp: norms, windows and order all matter
        for name, p in ref.named_parameters():
            p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.5 * torch.randn(p.shape, generator=g))
    ours = VisionTransformer(VisionConfig.from_dict(raw, windowed=True)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    patches, grids = _patches(photo_dir, ["coffee.png", "rocket.png", "astronaut.jpg"], max_pixels=28 * 28 * 40)
    assert any((h // 2) % 2 for _, h, _ in grids) or any((w // 2) % 2 for _, _, w in grids)  # an edge window
    with torch.inference_mode():
        want = ref(patches, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(patches, grids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


# Qwen2-VL-Instruct's chat template (its tokenizer_config.json / chat_template.json), default system prompt included
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


@pytest.fixture(scope="module")
def qwen2_tokenizer_dir(tmp_path_factory):
    """Qwen2's tokenizer built from the real Qwen vocabulary (dashscope's qwen.tiktoken: the same byte-level
    BPE), Qwen2's pre-tokenizer pattern and its special tokens at their ids (151643 <|endoftext|> ...)."""
    import json
    from pathlib import Path

    import dashscope
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")  # fmt: skip
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=pattern).converted()
    tok.add_special_tokens(QWEN2_SPECIALS)
    out = tmp_path_factory.mktemp("qwen2tok")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": QWEN2_VL_TEMPLATE}))  # fmt: skip
    return out


TEXTS = ["Hello world, what's up? 12345", "你好，世界！這是一個測試。", "emoji 🚀🎉 and café naïve",
         "  leading spaces\n\nand\ttabs  ", "<|im_start|>user\nhi<|im_end|>", "x<|vision_start|><|image_pad|><|vision_end|>y",
         "The quick brown fox jumps over the lazy dog." * 3]  # fmt: skip


def test_the_tokenizer_equals_transformers_on_the_real_qwen2_vocabulary(qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    from engine.models.qwen2_vl.tokenizer import Qwen2VLTokenizer

    ours, ref = Qwen2VLTokenizer(qwen2_tokenizer_dir), AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    assert ours.ids["<|endoftext|>"] == 151643 and ours.ids["<|image_pad|>"] == 151655 and ours.eos_token_id == 151645
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        stream = ours.token_stream()
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(pieces) == ours.decode(ids)  # streamed deltas add up, partial characters held back
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "More"}]}]]  # fmt: skip
    for m in messages:
        assert ours.render_chat(m) == ref.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages[0]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
