"""Qwen-VL's tokenizer: tiktoken over `qwen.tiktoken`, as the original tokenization_qwen.py defines it.

Facts carried over from the original:
- the split pattern below and NFC normalization before encoding; special-token text anywhere in a
  prompt is encoded as that special token;
- special tokens follow the 151,643 BPE ranks: <|endoftext|> 151643, <|im_start|> 151644,
  <|im_end|> 151645, <|extra_0|>..<|extra_204|> 151646-151850, then <ref> </ref> <box> </box>
  <quad> </quad> <img> </img> <imgpad> = 151851-151859;
- an image span `<img>path</img>` becomes 258 ids: <img>, the path's UTF-8 bytes as ids 0-255
  (ids equal to byte values), <imgpad> up to 256 slots, </img>; a longer path is an error. The model
  replaces the 256 slots' embeddings with the vision output;
- decoding turns an image span back into `<img>path</img>` and keeps <ref>/<box> text;
  skip_special_tokens drops every id from <|endoftext|> up.
"""

from __future__ import annotations

import base64
import codecs
import unicodedata
from pathlib import Path

from ...errors import EngineError
from ..base import Tokenizer, TokenStream

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
IMG_SPAN = 256  # image slots between <img> and </img>
VOCAB_FILE = "qwen.tiktoken"


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f.read().splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise EngineError(f"{path}:{lineno}: not a tiktoken vocabulary line (base64 token, rank)") from None
    return ranks


class QwenVLTokenizer(Tokenizer):
    def __init__(self, vocab_file: str | Path):
        import tiktoken

        path = Path(vocab_file)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise EngineError(f"tokenizer vocabulary not found: {path} (Qwen-VL checkpoints ship {VOCAB_FILE})")
        self.vocab_file = path
        ranks = load_tiktoken_bpe(path)
        self.special_tokens = {t: i for i, t in enumerate((ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_TAGS, len(ranks))}
        self.encoding = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.img_start_id = self.special_tokens["<img>"]
        self.img_end_id = self.special_tokens["</img>"]
        self.img_pad_id = self.special_tokens["<imgpad>"]
        self.eos_token_id = self.eod_id
        self._token_bytes = {i: t for t, i in ranks.items()}
        self._token_bytes.update({i: t.encode() for t, i in self.special_tokens.items()})
        self._num_ranks = len(ranks)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        """Token ids for a raw Qwen-VL query, image spans expanded to 258 ids each.

        `allowed_special`: the special tokens whose text becomes that token (the original's default:
        all); any other special-token text is encoded as plain text. The chat format passes
        IMAGE_TAGS only, so "<|im_start|>" typed in a message stays text, as in the original."""
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        ids = self.encoding.encode(
            unicodedata.normalize("NFC", text), allowed_special=allowed_special, disallowed_special=()
        )
        try:
            return self._replace_spans(ids, self._image_span, strict=True)
        except _UnclosedSpan:
            raise EngineError(f"unclosed <img> in prompt: {text[:80]!r}") from None

    def _replace_spans(self, ids: list[int], replace, strict: bool) -> list[int]:
        """Rebuild `ids` with each closed <img>..</img> span replaced by `replace(inner ids)`.
        An unclosed <img> raises when `strict`; otherwise the rest is kept as it is."""
        out: list[int] = []
        pos = 0
        while (start := _find(ids, self.img_start_id, pos)) != -1:
            end = _find(ids, self.img_end_id, start)
            if end == -1:
                if strict:
                    raise _UnclosedSpan
                break
            out.extend(ids[pos:start])
            out.extend(replace(ids[start + 1 : end]))
            pos = end + 1
        out.extend(ids[pos:])
        return out

    def _image_span(self, inner: list[int]) -> list[int]:
        if any(i >= self._num_ranks for i in inner):
            raise EngineError("an image path may not contain special tokens")
        path = b"".join(self._token_bytes[i] for i in inner)
        if len(path) > IMG_SPAN:
            raise EngineError(f"image path is {len(path)} bytes; Qwen-VL's <img>..</img> span holds at most {IMG_SPAN}")
        return [self.img_start_id, *path, *([self.img_pad_id] * (IMG_SPAN - len(path))), self.img_end_id]

    def image_paths(self, ids: list[int]) -> list[tuple[int, str]]:
        """(position of <img>, path) for each image span in encoded ids, each checked to be as `encode`
        writes it (EngineError otherwise: ids may come from elsewhere)."""
        spans = []
        for start in (i for i, t in enumerate(ids) if t == self.img_start_id):
            slots = ids[start + 1 : start + 1 + IMG_SPAN]
            length = slots.index(self.img_pad_id) if self.img_pad_id in slots else len(slots)
            if not (
                len(slots) == IMG_SPAN
                and start + 1 + IMG_SPAN < len(ids)
                and ids[start + 1 + IMG_SPAN] == self.img_end_id
                and all(t < 256 for t in slots[:length])
                and all(t == self.img_pad_id for t in slots[length:])
            ):
                raise EngineError(
                    f"the image span at position {start} is not <img>, {IMG_SPAN} slots (the path's bytes, then "
                    "<imgpad>), </img>; encode the prompt with the model's tokenizer"
                )
            try:
                spans.append((start, bytes(slots[:length]).decode("utf-8")))
            except UnicodeDecodeError:
                raise EngineError(f"the image span at position {start} holds a path that is not UTF-8") from None
        return spans

    def span_path(self, inner: list[int], errors: str = "replace") -> str:
        """The path an image span's slots hold (ids are byte values up to <imgpad>)."""
        if self.img_pad_id in inner:
            inner = inner[: inner.index(self.img_pad_id)]
        return bytes(i for i in inner if i < 256).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """What one id decodes to outside an image span (ids past the vocabulary: nothing)."""
        return self._token_bytes.get(token_id, b"")

    def token_stream(self) -> QwenVLTokenStream:
        return QwenVLTokenStream(self)

    def decode(self, ids: list[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        def span_text(inner: list[int]) -> list[int]:
            path = self.span_path(inner, errors)
            return [self.img_start_id, *self.encoding.encode(path, disallowed_special=()), self.img_end_id]

        # generated text may hold an unclosed <img>: it is decoded as it is
        out = self._replace_spans(list(ids), span_text, strict=False)
        # the embedding has rows past the vocabulary (151,936 vs 151,860 ids); a model may pick one,
        # and it has no text: skip it instead of failing the whole decode
        out = [i for i in out if i < self.encoding.n_vocab]
        if skip_special_tokens:
            out = [i for i in out if i < self.eod_id]
        return self.encoding.decode(out, errors=errors)

    @staticmethod
    def from_list_format(parts: list[dict]) -> str:
        """The original `from_list_format`: 'Picture n: <img>path</img>\\n' per image, text as is."""
        text, n = "", 0
        for part in parts:
            if "image" in part:
                n += 1
                text += f"Picture {n}: <img>{part['image']}</img>\n"
            elif "text" in part:
                text += part["text"]
            elif "box" in part:
                if "ref" in part:
                    text += f"<ref>{part['ref']}</ref>"
                for box in part["box"]:
                    x1, y1, x2, y2 = (int(v) for v in box[:4])  # the original's %d truncates
                    text += f"<box>({x1},{y1}),({x2},{y2})</box>"
            else:
                raise EngineError(f"unsupported prompt part {part!r}; use image, text or box")
        return text


class QwenVLTokenStream(TokenStream):
    """Incremental `QwenVLTokenizer.decode` of generated ids: each id's bytes go through an incremental
    UTF-8 decoder (a character split over two ids appears when complete). From an <img> on, ids are
    held back: if a </img> follows, the slots between are an image path (ids read as byte values),
    else (at the end) they decode as ordinary ids, exactly as `decode` of the whole output does."""

    def __init__(self, tokenizer: QwenVLTokenizer):
        self.tok = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held: list[int] | None = None  # ids from an unclosed <img> on

    def push(self, token_id: int) -> str:
        tok = self.tok
        if self.held is not None:
            if token_id != tok.img_end_id:
                self.held.append(token_id)
                return ""
            path = tok.span_path(self.held[1:])
            self.held = None
            return self.utf8.decode(b"<img>" + path.encode() + b"</img>")
        if token_id == tok.img_start_id:
            self.held = [token_id]
            return ""
        return self.utf8.decode(tok.token_bytes(token_id))

    def _rest(self) -> bytes:
        buffered = self.utf8.getstate()[0]
        return buffered + b"".join(self.tok.token_bytes(i) for i in self.held or ())

    def pending(self) -> str:
        return self._rest().decode("utf-8", errors="replace")

    def finish(self) -> str:
        rest = self.utf8.decode(b"".join(self.tok.token_bytes(i) for i in self.held or ()), final=True)
        self.held = None
        return rest


class _UnclosedSpan(Exception):
    pass


def _find(ids: list[int], token: int, start: int) -> int:
    try:
        return ids.index(token, start)
    except ValueError:
        return -1
