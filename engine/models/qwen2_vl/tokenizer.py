"""Qwen2-VL's tokenizer and chat template, read from the checkpoint's own files: tokenizer.json through
the `tokenizers` library (byte-level BPE; the added special tokens such as <|im_start|> and
<|image_pad|> are matched in text), the chat template from chat_template.jinja, chat_template.json or
tokenizer_config.json, rendered with jinja2 in a sandbox (a template is data, never code that runs).
Decoding drops special tokens, as transformers' batch_decode(skip_special_tokens=True) does."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import EngineError
from ..base import Tokenizer, TokenStream

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def read_json(path: Path) -> dict:
    """An optional JSON file of the checkpoint folder ({} when absent); EngineError when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None


class Qwen2VLTokenizer(Tokenizer):
    def __init__(self, model_path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = model_path / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{path}: not found; a Qwen2-VL checkpoint folder has tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's own message says what is wrong
            raise EngineError(f"{path}: not a tokenizers file ({e})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise EngineError(f"{path}: no {', '.join(missing)}: not a Qwen2-VL tokenizer")
        self.ids = {s: vocab[s] for s in SPECIALS}
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special} | set(self.ids.values())
        config = read_json(model_path / "tokenizer_config.json")
        self.eos_token_id = vocab.get(config.get("eos_token") or "<|im_end|>", self.ids["<|im_end|>"])
        self.chat_template = self._template(model_path, config)
        self._size = max(vocab.values()) + 1

    @staticmethod
    def _template(model_path: Path, config: dict) -> str | None:
        jinja = model_path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        return read_json(model_path / "chat_template.json").get("chat_template") or config.get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self._special], skip_special_tokens=True)

    def token_stream(self) -> TokenStream:
        return _Stream(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template over `messages` (transformers' apply_chat_template with
        tokenize=False)."""
        if not self.chat_template:
            raise EngineError("this checkpoint has no chat template (chat_template.jinja, chat_template.json or "
                              "tokenizer_config.json): send a plain text prompt")  # fmt: skip
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise EngineError(f"the chat template refused the messages: {message}")

        # transformers' settings and helpers, so a template renders as apply_chat_template renders it
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise EngineError(f"the checkpoint's chat template does not parse: {e}") from None
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


class _Stream(TokenStream):
    """Incremental decoding: the text of all ids so far, minus what was already given; a trailing
    partial UTF-8 character (U+FFFD) waits for the next id."""

    def __init__(self, tok: Qwen2VLTokenizer):
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new

    def pending(self) -> str:
        return self.tok.decode(self.ids)[len(self.shown) :]

    def finish(self) -> str:
        new = self.pending()
        self.shown += new
        return new
