"""OpenAI messages and prompts -> the engine's prompt forms (engine/models/qwen_vl/prompts.py).

--chat-template chatml: the messages as the engine's chat form, which renders Qwen-VL-Chat's ChatML
exactly as the original `make_context` does (system message optional; image parts as
`Picture n: <img>...</img>\\n`, the original `from_list_format`); generation stops at <|im_end|>.
--chat-template raw (base models): every image part becomes an `<img>...</img>` span and every text
part its text, concatenated in order over all messages with nothing added, so `[image, "question
Answer:"]` is the base model's VQA prompt `<img>...</img>question Answer:` and answers as offline.
"auto" reads `chat_format` from the checkpoint's generation_config.json (Qwen-VL: "raw", Qwen-VL-Chat:
"chatml"), else chatml.

Images always reach the engine as decoded pixels, never as paths: an `<img>` span typed into text
would make the engine open that path, so text holding `<img>` or `</img>` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from .media import IMG_SPAN, MediaLimits
from .protocol import ImagePart, Message, ServeError, TextPart

TEMPLATES = ("auto", "chatml", "raw")


def resolve_template(template: str, model_path: Path) -> str:
    """chatml or raw; "auto": the checkpoint's generation_config.json chat_format, else chatml."""
    if template != "auto":
        return template
    try:
        config = json.loads((model_path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "chatml"
    return "raw" if isinstance(config, dict) and config.get("chat_format") == "raw" else "chatml"


def chat_prompt(messages: list[Message], template: str, media: MediaLimits):
    """The engine prompt for a chat request; images are read and checked here (ServeError on a bad one)."""
    parts = [(i, j, p) for i, m in enumerate(messages) for j, p in enumerate(_parts(i, m))]
    text = "".join(p.text for _, _, p in parts if isinstance(p, TextPart))
    if "<img>" in text or "</img>" in text:
        raise ServeError("text may not contain <img> or </img>: send images as image_url parts", param="messages")
    media.check_count(sum(isinstance(p, ImagePart) for _, _, p in parts), "messages")

    def image(i: int, j: int, part: ImagePart):
        return media.image_from_url(part.image_url.url, f"messages.{i}.content.{j}.image_url")

    if template == "raw":
        prompt, images = "", []
        for i, j, part in parts:
            if isinstance(part, ImagePart):
                images.append(image(i, j, part))
                prompt += f"<img>image {len(images)}</img>"
            else:
                prompt += part.text
        return {"prompt": prompt, "multi_modal_data": {"image": images}}
    chat = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            chat.append({"role": role, "content": m.content})
        else:
            chat.append({"role": role, "content": [{"image": image(i, j, p)} if isinstance(p, ImagePart)
                                                   else {"text": p.text} for j, p in enumerate(m.content)]})  # fmt: skip
    return chat


def _parts(i: int, m: Message) -> list:
    """A message's content as parts (a string is one text part)."""
    if m.content is None:
        raise ServeError(f"messages.{i}: content is missing (tool calls are not supported)", param=f"messages.{i}")
    if isinstance(m.content, str):
        return [TextPart(type="text", text=m.content)]
    if m.role != "user" and any(isinstance(p, ImagePart) for p in m.content):
        raise ServeError(f"messages.{i}: only user messages may hold images", param=f"messages.{i}")
    return list(m.content)


def completion_prompt(text: str, media: MediaLimits):
    """A completions prompt: Qwen-VL's raw query text; its `<img>path</img>` spans read from under
    --allowed-local-media-path and handed to the engine as pixels (the path stays the span's label)."""
    paths = IMG_SPAN.findall(text)
    if not paths:
        return text
    media.check_count(len(paths), "prompt")
    return {"prompt": text, "multi_modal_data": {"image": [media.local_image(p, "prompt") for p in paths]}}
