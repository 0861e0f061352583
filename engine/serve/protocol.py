"""What goes over the wire: OpenAI's request bodies as pydantic models (checked on arrival, so a bad
field is a 400 naming it), the error body `{"error": {"message", "type", "param", "code"}}`, and the
response and stream-chunk dicts of chat completions and completions, field for field as OpenAI
returns them (https://platform.openai.com/docs/api-reference/chat, .../completions).

Besides OpenAI's fields, the requests take vLLM's extra sampling parameters (top_k, min_tokens,
repetition_penalty, ignore_eos, stop_token_ids), which the engine has. Fields the engine cannot honour
(n > 1, non-zero frequency/presence penalties, echo, best_of, suffix) are refused by name rather than
ignored; unknown fields are refused as OpenAI refuses them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               503: "server_error", 500: "server_error"}  # fmt: skip


class ServeError(Exception):
    """A request the server answers with an OpenAI error body and this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.headers = message, status, param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}  # fmt: skip


# ---- requests --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Qwen-VL sees every image at 448x448


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


SEED_RANGE = {"ge": -(1 << 63), "le": (1 << 64) - 1}  # what torch.Generator.manual_seed takes


class _SamplingRequest(_Strict):
    """The fields chat completions and completions share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """The engine's SamplingParams fields for this request (max_tokens None: what the context has
        room for, decided when the prompt's length is known); fields it cannot honour are a ServeError."""
        if self.stream_options is not None and not self.stream:
            raise ServeError("stream_options is only allowed with stream: true", param="stream_options")
        if self.n != 1:
            raise ServeError(f"n={self.n}: this server returns one choice per request; send n=1 (or separate "
                             "requests)", param="n")  # fmt: skip
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ServeError(f"{name} is not supported by this engine; use repetition_penalty", param=name)
        return {
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "repetition_penalty": self.repetition_penalty,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "seed": self.seed,
            "logprobs": logprobs,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def to_sampling(self) -> dict[str, Any]:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ServeError(f"max_tokens={a} and max_completion_tokens={b} disagree: give one", param="max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ServeError("top_logprobs needs logprobs: true", param="top_logprobs")
        return self.sampling(a if a is not None else b, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_sampling(self) -> dict[str, Any]:
        if self.echo:
            raise ServeError("echo is not supported: the prompt is not returned with the completion", param="echo")
        if self.best_of not in (None, 1):
            raise ServeError(f"best_of={self.best_of}: only 1 is supported", param="best_of")
        if self.suffix:
            raise ServeError("suffix is not supported (no fill-in-the-middle)", param="suffix")
        return self.sampling(self.max_tokens, self.logprobs)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ServeError(f"prompt: a list of {len(self.prompt)} prompts; send one prompt per request",
                             param="prompt")  # fmt: skip
        return self.prompt[0]


# ---- responses -------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One request's identity in every response body and chunk."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex}", model, int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _reply(r: Reply, obj: str, choices: list, **fields) -> dict:
    """OpenAI's envelope around a response's or chunk's choices (id, object, created, model)."""
    return {"id": r.id, "object": obj, "created": r.created, "model": r.model, "choices": choices, **fields}


def _chunk_usage(with_usage: bool) -> dict:
    return {"usage": None} if with_usage else {}  # OpenAI: null on every chunk but the last with include_usage


def chat_response(r: Reply, text: str, finish_reason: str | None, logprobs: dict | None, use: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": finish_reason}  # fmt: skip
    return _reply(r, "chat.completion", [choice], usage=use)


def chat_chunk(r: Reply, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None,
               with_usage: bool = False) -> dict:  # fmt: skip
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _reply(r, "chat.completion.chunk", [choice], **_chunk_usage(with_usage))


def completion_response(r: Reply, text: str, finish_reason: str | None, logprobs: dict | None, use: dict) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _reply(r, "text_completion", [choice], usage=use)


def completion_chunk(r: Reply, text: str, finish_reason: str | None = None, logprobs: dict | None = None,
                     with_usage: bool = False) -> dict:  # fmt: skip
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _reply(r, "text_completion", [choice], **_chunk_usage(with_usage))


def usage_chunk(r: Reply, obj: str, use: dict) -> dict:
    """The last chunk of a stream with include_usage: no choices, the request's usage."""
    return _reply(r, obj, [], usage=use)


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: {json}` (or `data: [DONE]`) and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ---- logprobs --------------------------------------------------------------------------------------


def _text(token_bytes) -> str:
    return token_bytes.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[dict[int, float]], token_ids: list[int], top: int, token_bytes) -> dict:
    """OpenAI's chat `logprobs.content`: per generated token its text, logprob, bytes (a token may hold
    part of a UTF-8 character, which its text shows as U+FFFD) and the `top` most likely alternatives.
    Each engine entry holds the top ids and the chosen one."""

    def item(token_id: int, logprob: float) -> dict:
        raw = token_bytes(token_id)
        return {"token": _text(raw), "logprob": logprob, "bytes": list(raw)}

    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        content.append({**item(token_id, entry[token_id]), "top_logprobs": [item(t, lp) for t, lp in best]})
    return {"content": content}


def completion_logprobs(entries: list[dict[int, float]], token_ids: list[int], top: int, token_bytes,
                        offset: int = 0) -> dict:  # fmt: skip
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs ({text: logprob} of the
    `top` most likely) and text_offset (each token's start in the text, from `offset`)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = _text(token_bytes(token_id))
        tokens.append(text)
        token_logprobs.append(entry[token_id])
        tops.append({_text(token_bytes(t)): lp for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:top]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
