"""Qwen-VL (v1): Qwen/Qwen-VL and Qwen/Qwen-VL-Chat, computed the way the original remote code does,
without running any of it. `QwenVLFamily` is what the engine's registry finds for model_type "qwen"."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ...errors import EngineError
from ..base import ImageSpan, ModelFamily, ModelSpec, ProcessedPrompt
from .config import QwenVLConfig
from .tokenizer import IMG_SPAN, QwenVLTokenizer

# buffers some exports carry that the original model ignores on load
IGNORED_SUFFIXES = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")


class QwenVLFamily(ModelFamily):

    def __init__(self, model_path: Path, raw_config: dict, config_path: Path, tp_size: int = 1):
        from ...distributed import check_divides
        from .language import LOGN_TABLE_LEN

        self.config = cfg = QwenVLConfig.from_dict(raw_config, str(config_path))
        check_divides(tp_size, {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
                                "the MLP width (intermediate_size / 2)": cfg.mlp_width}, str(config_path))  # fmt: skip
        self.tokenizer = QwenVLTokenizer(model_path)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise EngineError(
                f"{config_path}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens"
            )
        limit = LOGN_TABLE_LEN if cfg.use_logn_attn else None
        self.spec = ModelSpec(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_attention_heads // tp_size,
            head_dim=cfg.head_dim,
            max_model_len=cfg.max_position_embeddings if limit is None else min(cfg.max_position_embeddings, limit),
            max_model_len_limit=limit,
            limit_reason="the longest context Qwen-VL's log-n attention covers",
            checkpoint_dtype=cfg.torch_dtype,
        )

    def build_model(self, parallel=None):
        from .language import QwenVLForCausalLM

        return QwenVLForCausalLM(self.config, parallel)

    def checkpoint_name(self, name: str) -> str | None:
        return None if name.endswith(IGNORED_SUFFIXES) else name  # the original's names are the modules'

    def process_prompt(self, prompt) -> ProcessedPrompt:
        """Qwen-VL's prompt forms (engine/models/qwen_vl/prompts.py); images are referenced, not yet
        read (`load_images` reads them once the request is known to fit)."""
        from .prompts import render_prompt

        rendered = render_prompt(self.tokenizer, prompt)
        images = [ImageSpan(start + 1, IMG_SPAN, key="", data=source)
                  for start, source in zip(rendered.image_starts, rendered.images, strict=True)]  # fmt: skip
        ends = {self.tokenizer.im_end_id, self.tokenizer.im_start_id} if rendered.is_chat else set()
        return ProcessedPrompt(rendered.text, rendered.token_ids, images, ends)

    def load_images(self, prompt: ProcessedPrompt) -> None:
        """Read each image, squash it to the model's size (kept as uint8 until the vision tower runs)
        and key it by its pixels."""
        from ...image_cache import pixel_key
        from .processor import resize

        for image in prompt.images:
            image.data = resize(image.data, self.config.visual.image_size)
            image.key = pixel_key(image.data)  # the float pixels' key too: normalizing is one-to-one

    def request_state(self, prompt: ProcessedPrompt) -> tuple[float, bytes]:
        """The dynamic-NTK factor, fixed by the prompt's length (also when a preempted request is
        recomputed), as the original fixes it at prefill."""
        from .language import ntk_alpha

        n = len(prompt.token_ids)
        alpha = ntk_alpha(n, self.config.seq_length) if self.config.use_dynamic_ntk else 1.0
        return alpha, repr(alpha).encode()

    @cached_property
    def _warmup(self) -> tuple[list[int], list[int], object]:
        """The warm-up prompts' pieces, made once: an image span, a filler token, a blank image."""
        from PIL import Image

        from .processor import resize

        size = self.config.visual.image_size
        span = self.tokenizer.encode("<img>warm-up</img>")  # <img>, 256 slots, </img>
        return span, self.tokenizer.encode(" the"), resize(Image.new("RGB", (size, size)), size)

    @property
    def warmup_tokens_per_image(self) -> int:  # type: ignore[override]
        return len(self._warmup[0])

    def warmup_image(self, source):
        from .processor import resize

        return resize(source, self.config.visual.image_size)

    def warmup_prompt(self, num_tokens: int, index: int, image=None) -> ProcessedPrompt:
        span, filler, blank = self._warmup
        if num_tokens < len(span):
            return ProcessedPrompt("", filler * num_tokens)
        image = ImageSpan(1, IMG_SPAN, key=f"warm-up-{index}", data=blank if image is None else image)
        return ProcessedPrompt("", span + filler * (num_tokens - len(span)), [image])
