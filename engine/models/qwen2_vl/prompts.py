"""The prompt forms Qwen2-VL takes, rendered into token ids the way transformers' Qwen2VLProcessor does.

(a) a plain string, tokenized as it is (special tokens such as <|im_start|> recognized); each
    `<|vision_start|><|image_pad|><|vision_end|>` in it takes the next image of (d);
(b) a list of parts `{"image": path | PIL.Image}` / `{"text": str}`: one user message, rendered by the
    checkpoint's chat template (with its default system prompt) and the assistant's turn opened;
(c) chat messages `[{"role": ..., "content": str | parts}, ...]`, rendered the same way;
(d) vLLM's `{"prompt": (a) | (b) | (c), "multi_modal_data": {"image": image | [images]}}`; the image
    parts of (b) or (c) then only mark where the given images go, in order;
(e) vLLM's `{"prompt_token_ids": [...]}` (optionally with multi_modal_data): ids as `prompt_token_ids`
    gives them, each image already a run of as many <|image_pad|> as it has tokens.

Each image's single <|image_pad|> becomes as many as the image has tokens after the vision tower's 2x2
merge: (H / 14) (W / 14) / 4 at the size smart_resize gives it (only the image's header is read here).
Generation stops on the checkpoint's end tokens (generation_config.json's eos_token_id, <|im_end|>).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import EngineError
from .processor import ImageConfig, smart_resize
from .tokenizer import Qwen2VLTokenizer

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class RenderedPrompt:
    text: str
    token_ids: list[int]
    images: list  # one source (path or PIL image) per image, in order
    spans: list[tuple[int, int, tuple[int, int, int]]]  # (first token, tokens, (t, h, w) patch grid) per image


def image_size(source) -> tuple[int, int]:
    """(width, height) of a path or PIL image, reading only a file's header."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.size
    if not isinstance(source, (str, os.PathLike)):
        raise EngineError(f"an image must be a path or a PIL image, got {type(source).__name__}")
    try:
        with Image.open(source) as im:
            return im.size
    except FileNotFoundError:
        raise EngineError(f"image not found: {os.fspath(source)}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise EngineError(f"image unreadable: {os.fspath(source)}: {e}") from None


def _content(parts) -> tuple[list[dict], list]:
    """A message's content as the chat template takes it, and its images in order."""
    if isinstance(parts, str):
        return parts, []
    content, images = [], []
    for part in parts:
        if isinstance(part, dict) and "image" in part:
            content.append({"type": "image"})
            images.append(part["image"])
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        else:
            raise EngineError(f"a prompt part must be {{'image': ...}} or {{'text': str}}, got {part!r:.80}")
    return content, images


def image_tokens(source, image_cfg: ImageConfig) -> tuple[int, tuple[int, int, int]]:
    """An image's token count after the 2x2 merge, and its (t, h, w) patch grid."""
    width, height = image_size(source)
    h, w = smart_resize(height, width, image_cfg.factor, image_cfg.min_pixels, image_cfg.max_pixels)
    grid = (1, h // image_cfg.patch_size, w // image_cfg.patch_size)
    return grid[1] * grid[2] // image_cfg.merge_size**2, grid


def _from_ids(tok: Qwen2VLTokenizer, image_cfg: ImageConfig, ids: list, images: list) -> RenderedPrompt:
    """Form (e): each run of <|image_pad|> is the next image's span, which must be its length."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids):
        raise EngineError(f"prompt_token_ids must be a list of token ids below {tok.vocab_size}")
    pad, spans, i = tok.ids["<|image_pad|>"], [], 0
    while i < len(ids):
        if ids[i] != pad:
            i += 1
            continue
        run = i
        while i < len(ids) and ids[i] == pad:
            i += 1
        if len(spans) == len(images):
            raise EngineError(f"prompt_token_ids hold more image spans than the {len(images)} image(s) given")
        n, grid = image_tokens(images[len(spans)], image_cfg)
        if i - run != n:
            raise EngineError(f"prompt_token_ids: image {len(spans) + 1}'s span is {i - run} tokens; the image takes {n}")
        spans.append((run, n, grid))
    if len(spans) != len(images):
        raise EngineError(f"prompt_token_ids hold {len(spans)} image span(s) for {len(images)} image(s)")
    return RenderedPrompt(tok.decode(ids), list(ids), list(images), spans)


def render(tok: Qwen2VLTokenizer, image_cfg: ImageConfig, prompt) -> RenderedPrompt:
    given = None
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        given = (prompt.get("multi_modal_data") or {}).get("image")
        return _from_ids(tok, image_cfg, prompt["prompt_token_ids"], [] if given is None else
                         given if isinstance(given, list) else [given])  # fmt: skip
    if isinstance(prompt, dict):
        if "prompt" not in prompt:
            raise EngineError("a dict prompt needs 'prompt' (and optionally 'multi_modal_data': {'image': ...})")
        given = (prompt.get("multi_modal_data") or {}).get("image")
        given = [] if given is None else given if isinstance(given, list) else [given]
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        text, images = prompt, []
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages, images = [], []
        for m in prompt:
            content, found = _content(m.get("content") or "")
            messages.append({"role": m["role"], "content": content})
            images += found
        text = tok.render_chat(messages)
    elif isinstance(prompt, list) and prompt:
        content, images = _content(prompt)
        text = tok.render_chat([{"role": "user", "content": content}])
    else:
        raise EngineError(f"a prompt is a string, a list of parts, chat messages or a dict; got {type(prompt).__name__}")
    if given is not None:
        if images and len(images) != len(given):
            raise EngineError(f"the prompt's parts mark {len(images)} image(s) and multi_modal_data gives {len(given)}")
        images = given
    ids = tok.encode(text)
    pad = tok.ids["<|image_pad|>"]
    where = [i for i, t in enumerate(ids) if t == pad]
    if len(where) != len(images):
        raise EngineError(f"the prompt has {len(where)} image placeholder(s) ({PLACEHOLDER}) for {len(images)} image(s)")
    out, spans, last = [], [], 0
    for at, source in zip(where, images, strict=True):
        n, grid = image_tokens(source, image_cfg)
        out += ids[last:at]
        spans.append((len(out), n, grid))
        out += [pad] * n
        last = at + 1
    out += ids[last:]
    return RenderedPrompt(text, out, list(images), spans)
