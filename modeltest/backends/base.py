"""The backend interface: generate for a batch of multimodal requests -> text, token counts, timings.

A request is a list of parts, each {"image": ...} or {"text": str}, in order; an image is a path, a
PIL.Image, an `ImageBytes` (encoded bytes, decoded by `open_image` only when a backend needs the pixels)
or an undecoded `datasets` Image cell ({"bytes", "path"}). Each
backend renders the parts the way its model expects and reports the rendered model input back in
`Generation.prompt`. `Request.list_format` asks a raw-query backend (engine) for Qwen-VL's
`from_list_format` rendering (`Picture 1: <img>path</img>\\n` before the text); a chat-template
backend (hf) places the image its own way and ignores it. A failure that belongs to one request (an
unreadable image) is returned in that request's `Generation.error`; an exception from `generate` is
isolated by the runner.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelTestError


@dataclass
class Request:
    id: Any
    parts: list[dict]
    max_new_tokens: int
    min_new_tokens: int = 0
    list_format: bool = False  # Qwen-VL `from_list_format` ("Picture n: <img>..</img>\n") for raw prompts
    # need_logits: return the whole output distribution of the first `distributions` tokens (0: none) in
    # Generation.extra["logprobs"] ([tokens, vocab] float32) with extra["token_ids"]
    distributions: int = 0
    chat: bool = False  # use_chat_template / is_chat_model: the parts are the user turn of a chat
    max_input_tokens: int | None = None  # requested_max_input_length: a longer prompt fails its sample ...
    truncate_input: bool = False  # ... or, need_truncate_input, loses text from the left to fit

    @property
    def images(self) -> list:
        return [p["image"] for p in self.parts if "image" in p]


@dataclass
class Generation:
    text: str = ""
    prompt: str | None = None
    input_tokens: int | None = 0  # None: not known (an endpoint that reports no usage)
    output_tokens: int | None = 0
    e2e_time: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TimedBatch:
    """A performance batch as a backend ran it (task_type performance, modeltest/tasks/performance.py).
    Times are time.perf_counter() seconds: `submitted` just before the first request was handed over,
    token_times[i][k] when request i's token k was ready (after the device finished the step that made
    it)."""

    submitted: float
    input_tokens: list[int]  # per request, as the model counted them (image span included)
    token_times: list[list[float]]
    peak_memory_bytes: int | None = None  # the device's, during the batch (None: a CPU has no such counter)
    engine: dict = field(default_factory=dict)  # what the scheduler did: concurrency, preemptions, cache hits


class Backend(ABC):
    """One model on one device (or a tensor-parallel group)."""

    name: str = "backend"
    supports_tp: bool = False
    # requests per generate() call the backend schedules best; None: the run's --batch_size
    window: int | None = None
    # True: generate(requests, on_result=f) calls f(index, generation) as each request finishes,
    # so the runner saves it at once instead of after the whole call
    streams: bool = False
    # True: a server elsewhere runs the model (no model folder, no device of this machine); check() is then
    # also every run's pre-flight, and names the served model the run's paths need
    remote: bool = False
    # True: the backend runs task_type performance (image_span_tokens, run_timed)
    times_tokens: bool = False

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Generation]:
        """Greedy generation for each request, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (optional)."""

    def image_span_tokens(self) -> int:
        """The tokens one image takes in a prompt (a performance case's input length counts them)."""
        raise NotImplementedError

    def run_timed(self, input_len: int, output_len: int, batch_size: int, with_image: bool, seed: int) -> TimedBatch:
        """Run `batch_size` requests at once, each exactly `input_len` prompt tokens (one image first with
        `with_image`; its span counted) and exactly `output_len` generated tokens (no early end), different
        from each other and from every other seed's (no prefix or image cache can serve them), and time
        every token. SampleError when the batch cannot run (the case's error)."""
        raise NotImplementedError

    @classmethod
    def check(cls, model_cfg, tp: int = 1) -> None:
        """What loading would check first, without loading (`--check_only`); ModelTestError if not."""
        check_model_path(model_cfg)


class SampleError(Exception):
    """A failure that belongs to one sample: it is recorded and the run continues."""


@dataclass(frozen=True, repr=False)
class ImageBytes:
    """An encoded image (JPEG, PNG, ... as parquet files and `datasets` store them) and a name for it.
    Datasets hold these, not pixels: 5,000 decoded TextVQA images would take ~10 GB, their files ~1 GB.
    `open_image` decodes one when a backend needs it; `name` labels it in prompts, logs and
    samples.jsonl (a file name, so the dataset fingerprint's basename rule applies)."""

    data: bytes
    name: str

    def __repr__(self) -> str:  # never dump the bytes into a log
        return f"ImageBytes({self.name!r}, {len(self.data)} bytes)"


def image_name(image) -> str | None:
    """How an image is named in a rendered prompt: its path, or its name when it is held in memory."""
    if isinstance(image, ImageBytes):
        return image.name
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, dict):
        return image.get("path")
    return None


def open_image(image):
    """Open and fully decode an image (a path, PIL.Image, ImageBytes or undecoded `datasets` cell) as RGB;
    SampleError names the problem."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image, getattr(image, "filename", "") or "in-memory image")
    if isinstance(image, dict) and image.get("bytes"):  # a `datasets` Image cell stored undecoded
        image = ImageBytes(image["bytes"], image.get("path") or "embedded image")
    if isinstance(image, ImageBytes):
        return _decode(io.BytesIO(image.data), image.name)
    if isinstance(image, dict):
        image = image.get("path") or ""
    path = os.fspath(image)
    if not os.path.exists(path):
        raise SampleError(f"image not found: {path}")
    return _decode(path, path)


def _decode(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im, name)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError(f"image unreadable: {name}: {e}") from None


def to_rgb(im, name: str):
    """engine.to_rgb (16-bit and float images scaled, not clipped), an unrenderable image a SampleError."""
    from engine import to_rgb as engine_to_rgb

    try:
        return engine_to_rgb(im, name)
    except ValueError as e:
        raise SampleError(str(e)) from None


def fit_input(request: Request, parts: list[dict], count, encode, decode) -> tuple[list[dict], int]:
    """`parts` (the request's, as the backend renders them) made to fit request.max_input_tokens, and
    the tokens cut. `count(parts)` is the rendered prompt's length in the model's tokens (image
    tokens and any chat wrapping included). Longer than the limit: SampleError, or with
    request.truncate_input the text parts lose tokens from the left (the first text first; an image
    span is never cut) until it fits."""
    limit = request.max_input_tokens
    if limit is None:
        return parts, 0
    n = count(parts)
    if n <= limit:
        return parts, 0
    if not request.truncate_input:
        raise SampleError(f"the prompt is {n} tokens, more than requested_max_input_length {limit}; set "
                          "need_truncate_input: true to cut its text from the left")  # fmt: skip
    parts, start = [dict(p) for p in parts], n
    while n > limit:
        i = next((k for k, p in enumerate(parts) if "text" in p and p["text"]), None)
        if i is None:
            raise SampleError(f"the prompt's images alone are {n} tokens, more than requested_max_input_length "
                              f"{limit}: no text is left to cut")  # fmt: skip
        ids = encode(parts[i]["text"])
        parts[i]["text"] = decode(ids[min(len(ids), n - limit):])  # re-encoding may differ by a token: count again
        n = count(parts)
    return parts, start - n


def render_qwen_prompt(parts: list[dict], list_format: bool = False) -> str:
    """Qwen-VL's raw query format: images as <img>path</img> spans, text as is. With `list_format`,
    the original `from_list_format`: each image as `Picture {n}: <img>path</img>\\n`."""
    out = []
    n = 0
    for p in parts:
        if "image" in p:
            img = p["image"]
            name = image_name(img)
            n += 1
            span = f"<img>{name or '<in-memory image>'}</img>"
            out.append(f"Picture {n}: {span}\n" if list_format else span)
        else:
            out.append(p["text"])
    return "".join(out)


BACKENDS = ("engine", "hf", "openai")


def backend_class(name: str) -> type[Backend]:
    """The class of the named backend (nothing is loaded)."""
    from ..errors import unknown_name

    if name == "hf":
        from .hf import HFBackend

        return HFBackend
    if name == "engine":
        from .engine import EngineBackend

        return EngineBackend
    if name == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend
    raise unknown_name("backend", name, BACKENDS)


def create_backend(name: str, model_cfg, device: str | None, tp: int = 1, batch_size: int = 1,
                   progress: bool = True) -> Backend:  # fmt: skip
    """Build the named backend for `model_cfg` (loads the model; `progress`: its loading bar).
    `batch_size` is the run's --batch_size: the engine runs that many sequences at once (the seed's
    meaning); the hf backend gets that many requests per call from the runner. The openai backend loads
    nothing: an endpoint runs the model (num_concurrent requests in flight)."""
    if name == "openai":
        return backend_class(name)(model_cfg)
    if name == "hf":
        return backend_class(name)(model_cfg, device=device, tp=tp, progress=progress)
    return backend_class(name)(model_cfg, device=device, tp=tp, batch_size=batch_size, progress=progress)


def check_model_path(model_cfg) -> str:
    path = model_cfg.model_path
    if not path:
        raise ModelTestError("no model_path: set model_path in the model config or pass --model_path")
    if not os.path.isdir(path):
        raise ModelTestError(f"model_path does not exist or is not a folder: {path} (set --model_path)")
    return path
