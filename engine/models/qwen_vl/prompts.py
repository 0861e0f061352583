"""The prompt forms Qwen-VL takes, rendered into token ids the way the original does.

(a) a raw query string with `<img>path</img>` spans (the original tokenizer's convention);
(b) a list of parts `{"image": path | PIL.Image}` / `{"text": str}` / `{"ref", "box"}`, rendered by
    the original `from_list_format` ("Picture n: <img>path</img>\\n" per image);
(c) chat messages `[{"role": "system"|"user"|"assistant", "content": str | parts}, ...]` ending with a
    user turn, rendered in ChatML by the original `make_context` (default system prompt, history
    dropped oldest-first beyond max_window_size); generation stops on <|im_end|> / <|im_start|>;
(d) vLLM's `{"prompt": str, "multi_modal_data": {"image": image | [images]}}`: the prompt's
    `<img>...</img>` spans take the given images (paths or PIL) in order; "prompt" may also be (b) or
    (c), whose image parts then only label the spans;
(e) vLLM's `{"prompt_token_ids": [...]}` (optionally with multi_modal_data): ids as the tokenizer
    makes them, image spans included (<img>, 256 slots holding the path's bytes then <imgpad>, </img>).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import EngineError
from .tokenizer import IMAGE_TAGS, QwenVLTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_WINDOW_SIZE = 6144  # the original chat's history budget in tokens


@dataclass
class RenderedPrompt:
    text: str
    token_ids: list[int]
    images: list  # one source (path or PIL image) per image span, in token order
    image_starts: list[int]  # position of each span's <img>
    is_chat: bool = False


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


class _Images:
    """Gives in-memory images a span label and remembers which label stands for which image."""

    def __init__(self):
        self.by_label: dict[str, object] = {}

    def label(self, image) -> str:
        if _is_pil(image):
            name = f"in-memory image {len(self.by_label) + 1}"
            self.by_label[name] = image
            return name
        if isinstance(image, (str, os.PathLike)):
            return os.fspath(image)
        raise EngineError(f"an image must be a path or a PIL image, got {type(image).__name__}")

    def parts_text(self, parts: list) -> str:
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise EngineError("a prompt's parts must be a list of {'image': ...} / {'text': ...} dicts")
        named = [{**p, "image": self.label(p["image"])} if "image" in p else p for p in parts]
        return QwenVLTokenizer.from_list_format(named)


def _chat_tokens(tokenizer: QwenVLTokenizer, messages: list, images: _Images) -> tuple[str, list[int]]:
    """The original make_context (chatml) for a message list."""

    def content_text(message, i):
        content = message.get("content")
        if isinstance(content, list):
            return images.parts_text(content)
        if not isinstance(content, str):
            raise EngineError(f"chat message {i}: 'content' must be a string or a list of parts")
        return content

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise EngineError(f"chat message {i}: needs 'role' system, user or assistant and 'content'")
    system = DEFAULT_SYSTEM
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system = content_text(turns.pop(0), 0)
    roles = [m["role"] for m in turns]
    if not roles or roles[-1] != "user" or any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(roles)):
        raise EngineError(
            f"chat messages must alternate user/assistant after an optional system message and end with a user "
            f"message; got roles {[m['role'] for m in messages]}"
        )
    texts = [content_text(m, k) for k, m in enumerate(turns)]
    query, history = texts[-1], list(zip(texts[:-1:2], texts[1:-1:2], strict=True))

    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")

    def role_tokens(role: str, content: str) -> list[int]:
        return tokenizer.encode(role, allowed_special=IMAGE_TAGS) + nl + tokenizer.encode(content, allowed_special=IMAGE_TAGS)

    system_tokens = im_start + role_tokens("system", system) + im_end
    raw = ""
    context: list[int] = []
    for turn_query, turn_response in reversed(history):
        turn = nl + im_start + role_tokens("user", turn_query) + im_end + nl
        turn += im_start + role_tokens("assistant", turn_response) + im_end
        if len(system_tokens) + len(turn) + len(context) >= MAX_WINDOW_SIZE:
            break
        context = turn + context
        raw = f"\n<|im_start|>user\n{turn_query}<|im_end|>\n<|im_start|>assistant\n{turn_response}<|im_end|>" + raw
    tokens = system_tokens + context + nl + im_start + role_tokens("user", query) + im_end + nl
    tokens += im_start + tokenizer.encode("assistant") + nl
    raw = f"<|im_start|>system\n{system}<|im_end|>" + raw + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return raw, tokens


def render_prompt(tokenizer: QwenVLTokenizer, prompt) -> RenderedPrompt:
    images = _Images()
    is_chat = False
    given: list | None = None
    if isinstance(prompt, str):
        text = prompt
        ids = tokenizer.encode(text)
    elif isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            if "prompt" in prompt:
                raise EngineError("a dict prompt gives 'prompt' or 'prompt_token_ids', not both")
            ids = _token_ids(tokenizer, prompt["prompt_token_ids"])
            text = tokenizer.decode(ids)
        elif isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
            ids = tokenizer.encode(text)
        elif isinstance(prompt.get("prompt"), list):  # parts or chat messages whose spans take the given images
            inner = render_prompt(tokenizer, prompt["prompt"])
            if not (prompt.get("multi_modal_data") or {}).get("image"):
                return inner
            text, ids, is_chat = inner.text, inner.token_ids, inner.is_chat
        else:
            raise EngineError(
                "a dict prompt needs 'prompt' (a string, a list of parts or chat messages) or 'prompt_token_ids' "
                "(a list of ids), and optionally 'multi_modal_data'"
            )
        data = prompt.get("multi_modal_data") or {}
        unknown = set(data) - {"image"}
        if unknown:
            raise EngineError(f"multi_modal_data: unsupported key(s) {sorted(unknown)}; Qwen-VL takes 'image'")
        if "image" in data:
            given = data["image"] if isinstance(data["image"], list) else [data["image"]]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, dict) and "role" in p for p in prompt):
        text, ids = _chat_tokens(tokenizer, prompt, images)
        is_chat = True
    elif isinstance(prompt, list) and prompt:
        text = images.parts_text(prompt)
        ids = tokenizer.encode(text)
    else:
        raise EngineError(
            f"unsupported prompt {str(prompt)[:80]!r}: use a string, a list of image/text parts, chat messages, "
            "{'prompt': ..., 'multi_modal_data': {'image': ...}} or {'prompt_token_ids': [...]}"
        )
    spans = tokenizer.image_paths(ids)
    if given is not None:
        if len(given) != len(spans):
            raise EngineError(
                f"the prompt has {len(spans)} <img>...</img> span(s) but multi_modal_data gives {len(given)} image(s)"
            )
        sources = list(given)
    else:
        sources = [images.by_label.get(label, label) for _, label in spans]
    if not ids:
        raise EngineError("empty prompt")
    return RenderedPrompt(text, ids, sources, [pos for pos, _ in spans], is_chat)


def _token_ids(tokenizer: QwenVLTokenizer, ids) -> list[int]:
    """Checked token ids: known ids (their image spans are checked as every prompt's are, by
    `tokenizer.image_paths`)."""
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise EngineError("prompt_token_ids must be a list of integers")
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise EngineError(f"prompt_token_ids: {bad} is not a token id (the vocabulary has {tokenizer.vocab_size})")
    return list(ids)
