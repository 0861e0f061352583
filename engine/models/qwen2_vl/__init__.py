"""Qwen2-VL (Qwen/Qwen2-VL-*) and Qwen2.5-VL (Qwen/Qwen2.5-VL-*), computed as transformers' own
implementations compute them: `Qwen2VLFamily` is what the engine's registry finds for model_type
"qwen2_vl" and "qwen2_5_vl" (the same language model; Qwen2.5-VL's vision tower has window attention
and RMSNorm/SwiGLU blocks).

rope.py (multimodal rotary positions), processor.py (dynamic-resolution image preprocessing),
vision.py (the vision tower), language.py (the language model over the paged cache: grouped-query
attention, M-RoPE from each request's positions, image features in place of their tokens),
tokenizer.py and prompts.py (the checkpoint's tokenizer and chat template)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ...errors import EngineError
from ..base import ImageSpan, ModelFamily, ModelSpec, ProcessedPrompt
from .language import TextConfig
from .processor import ImageConfig, smart_resize
from .tokenizer import Qwen2VLTokenizer, read_json
from .vision import VisionConfig

# transformers >= 5 may save the language model and the vision tower under model.; the released
# checkpoints (and transformers' own save_pretrained) use model. / visual. / lm_head
RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class Qwen2VLFamily(ModelFamily):
    def __init__(self, model_path: Path, raw_config: dict, config_path: Path, tp_size: int = 1):
        from ...distributed import check_divides

        try:
            self.text = cfg = TextConfig.from_dict(raw_config)
            self.vision = VisionConfig.from_dict(raw_config["vision_config"], windowed=raw_config.get("model_type") == "qwen2_5_vl")
        except KeyError as e:
            raise EngineError(f"{config_path}: no {e.args[0]}: not a Qwen2-VL config.json") from None
        check_divides(tp_size, {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads":
                                cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
                                "intermediate_size": cfg.intermediate_size}, str(config_path))  # fmt: skip
        self.tokenizer = Qwen2VLTokenizer(model_path)
        processor = read_json(model_path / "preprocessor_config.json") or \
            read_json(model_path / "processor_config.json").get("image_processor", {})  # fmt: skip
        self.image_cfg = ImageConfig.from_preprocessor_config(processor)
        generation = read_json(model_path / "generation_config.json").get("eos_token_id")
        ends = generation if isinstance(generation, list) else [generation] if generation is not None else []
        self.end_ids = {int(e) for e in ends} | {self.tokenizer.ids["<|im_end|>"], self.tokenizer.ids["<|endoftext|>"]}
        self.spec = ModelSpec(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads // tp_size,
            head_dim=cfg.head_dim,
            max_model_len=cfg.max_position_embeddings,
            checkpoint_dtype=raw_config.get("torch_dtype") or raw_config.get("dtype"),
        )

    def build_model(self, parallel=None):
        from .language import Qwen2VLForCausalLM

        return Qwen2VLForCausalLM(self.text, self.vision, self.image_cfg, parallel)

    def checkpoint_name(self, name: str) -> str | None:
        for old, new in RENAMES:
            if name.startswith(old):
                return new + name[len(old) :]
        if name == "lm_head.weight" and self.text.tie_word_embeddings:
            return None  # the embedding's tensor serves both
        return name

    def process_prompt(self, prompt) -> ProcessedPrompt:
        """Qwen2-VL's prompt forms (prompts.py); each image's size is read from its header here, its
        pixels by `load_images`."""
        from .prompts import render

        r = render(self.tokenizer, self.image_cfg, prompt)
        images = [ImageSpan(start, n, key="", data=source) for (start, n, _), source in zip(r.spans, r.images, strict=True)]
        return ProcessedPrompt(r.text, r.token_ids, images, set(self.end_ids))

    def load_images(self, prompt: ProcessedPrompt) -> None:
        """Read each image, resize it (uint8, kept until the vision tower runs) and key it by its pixels."""
        from ...image_cache import pixel_key

        for image in prompt.images:
            image.data = self._read(image.data)
            image.key = pixel_key(image.data)

    def _read(self, source):
        import numpy as np
        import torch
        from PIL import Image, UnidentifiedImageError

        from .processor import resize

        try:
            im = source if isinstance(source, Image.Image) else Image.open(source)
            pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except FileNotFoundError:
            raise EngineError(f"image not found: {source}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise EngineError(f"image unreadable: {source}: {e}") from None
        return resize(pixels, self.image_cfg)

    def request_state(self, prompt: ProcessedPrompt):
        """The prompt's M-RoPE positions and delta (rope.py), from its images' grids; no cache salt: the
        positions follow from the tokens and images a prefix-cache key already holds."""
        import torch

        from .language import MRopeState
        from .rope import mrope_positions

        p = self.image_cfg.patch_size
        spans = [(im.start, im.length, (1, im.data.shape[-2] // p, im.data.shape[-1] // p)) for im in prompt.images]
        positions, delta = mrope_positions(len(prompt.token_ids), spans, self.image_cfg.merge_size)
        return MRopeState(torch.from_numpy(positions), delta), b""

    @cached_property
    def _largest(self) -> tuple[int, int]:
        """The size (h, w) of the largest image: a square of max_pixels."""
        side = int(self.image_cfg.max_pixels**0.5)
        c = self.image_cfg
        return smart_resize(side, side, c.factor, c.min_pixels, c.max_pixels)

    @property
    def warmup_tokens_per_image(self) -> int:  # type: ignore[override]
        h, w = self._largest
        return h * w // self.image_cfg.factor**2 + 2  # <|vision_start|>, the pads, <|vision_end|>

    def warmup_image(self, source):
        return self._read(source)

    def warmup_prompt(self, num_tokens: int, index: int, image=None) -> ProcessedPrompt:
        import torch

        filler = self.tokenizer.encode(" the")[:1]
        data = image if image is not None else torch.zeros(3, *self._largest, dtype=torch.uint8)
        tokens = data.shape[-2] * data.shape[-1] // self.image_cfg.factor**2
        if num_tokens < tokens + 2:
            return ProcessedPrompt("", filler * num_tokens)
        ids = self.tokenizer.ids
        head = [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * tokens + [ids["<|vision_end|>"]]
        span = ImageSpan(1, tokens, key=f"warm-up-{index}", data=data)
        return ProcessedPrompt("", head + filler * (num_tokens - len(head)), [span])
