"""The `openai` backend: any OpenAI-compatible endpoint (python -m engine.serve, vLLM, a hosted API) runs
the model; this side only sends chat completions and reads the answers.

Each request becomes one streamed chat completion: one user message whose content holds the request's
parts in order - each image as an `image_url` data URL (the file's own bytes for the formats the OpenAI
API takes, JPEG, PNG, GIF and WebP, mime type from the content; anything else, and PIL images, as PNG)
and each text as a `text` part - with `max_tokens` = the request's max_new_tokens, `temperature` 0
(greedy) and `stream_options.include_usage`, so TTFT (to the first content delta) and the token counts
(the endpoint's `usage`) come with the answer. An endpoint that sends no usage gets no token counts in
the record (None, and `usage_reported: false`), never a guess.

Up to `num_concurrent` requests are in flight (asyncio, openai.AsyncOpenAI, a semaphore); each result
goes to `on_result` as it finishes, so the runner saves it at once and a killed run resumes. Transient
failures (connection errors, timeouts, 408/409/429/5xx) are retried by the openai client itself, with
its exponential backoff and the server's Retry-After honoured, up to `max_retries` times; a request
that still fails, or that the endpoint refuses (a 400: the prompt is too long, ...), is that sample's
error naming the status and the endpoint's message. `check()` asks GET /models once, before any work:
an endpoint that cannot be reached, refuses the key or does not serve the model stops the run there.

task_type performance (`run_timed`): a batch is that many streamed chat completions sent at once, each
prompt random filler words (one token each) sized so the endpoint counts exactly the input length, with
vLLM's ignore_eos / min_tokens for an exact output length and logprobs so every token is timed as its chunk
arrives (see run_timed).

The API key (`--api_key`, `api_key` in the model config, else $OPENAI_API_KEY, else "EMPTY" as vLLM's
examples send to a server started without --api-key) goes only into the Authorization header: config
dumps leave it out (config.to_dict) and every message this module makes has it masked.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import io
import json
import os
import time

from ..errors import ModelTestError
from .base import Backend, Generation, ImageBytes, Request, SampleError, TimedBatch, image_name, open_image

# the formats the OpenAI API takes as image input, sent as they are; any other is decoded and sent as PNG
SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
NO_KEY = "EMPTY"  # what vLLM's examples send to a server that checks no key
LIST_TIMEOUT_S = 30.0  # GET /models answers at once from a server that is up
TASK_NAME = "modeltest request"  # each request's asyncio task is named so, with its id
WINDOW = 1024  # requests per generate() call; at its end the last few drain before the next window starts

# Performance prompts (task_type performance) are runs of these words, each one token with its leading space in
# Qwen's vocabulary and in most BPE vocabularies; the endpoint's own counts check that before they are used.
FILLER_WORDS = tuple(f" {w}" for w in (
    "the of and to in is it for on with as at by from this that be are was not or an have has but all one two "
    "new more time year day way man world life work part place case week number group point home water room "
    "money story fact month book eye job word side kind head house friend hour game line").split())  # fmt: skip
PERF_IMAGE = 448  # pixels a side: a performance request's random-noise image

# Per request (one asyncio task each): when its latest attempt was sent and how many there were, set by the
# HTTP client's request hook, which runs once per attempt (the openai client's retries included).
_ATTEMPT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("modeltest_openai_attempt", default=None)


class OpenAIBackend(Backend):
    name = "openai"
    streams = True
    remote = True
    times_tokens = True

    @classmethod
    def check(cls, model_cfg, tp: int = 1) -> None:
        """The endpoint answers GET /models (asked once) with this key and serves the model: fills
        model_cfg.served_model when it was not given and the endpoint lists exactly one (and model_name,
        left empty when no model config was given, with it). ModelTestError naming the URL otherwise."""
        import openai

        url, key = _base_url(model_cfg), _api_key(model_cfg)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=model_cfg.max_retries,
                               timeout=min(model_cfg.timeout, LIST_TIMEOUT_S))  # fmt: skip
        where = f"{url.rstrip('/')}/models"
        try:
            served = [m.id for m in client.models.list()]
        except openai.APIStatusError as e:
            raise ModelTestError(_redact(_refusal(e, where), key)) from None
        except openai.APITimeoutError:
            raise ModelTestError(f"{where} did not answer within {client.timeout} s; is the server up and "
                                 "ready (python -m engine.serve prints 'listening on' when it is)?") from None  # fmt: skip
        except openai.APIConnectionError as e:
            raise ModelTestError(_redact(f"cannot reach the endpoint at {url} ({_cause(e)}): start the server, or pass "
                                         "the right --base_url (e.g. http://127.0.0.1:8000/v1)", key)) from None  # fmt: skip
        except (openai.OpenAIError, ValueError, TypeError, AttributeError):  # answered, but not with a model list
            raise ModelTestError(f"{where} did not answer with an OpenAI model list; is --base_url an "
                                 "OpenAI-compatible API's root URL (usually ending in /v1)?") from None  # fmt: skip
        finally:
            client.close()
        shown = ", ".join(map(repr, served)) or "none"
        if model_cfg.served_model is None:
            if len(served) != 1:
                raise ModelTestError(f"{where} lists {len(served)} models ({shown}); name the one to evaluate with "
                                     "--served_model (or served_model in the model config)")  # fmt: skip
            model_cfg.served_model = served[0]
        elif model_cfg.served_model not in served:
            raise ModelTestError(f"{url} does not serve model {model_cfg.served_model!r}; it serves {shown}: "
                                 "set --served_model to one of them")  # fmt: skip
        if not model_cfg.model_name:
            model_cfg.model_name = model_cfg.served_model

    def __init__(self, model_cfg):
        import openai

        if model_cfg.served_model is None:
            type(self).check(model_cfg)
        self.cfg = model_cfg
        self.url = _base_url(model_cfg)
        self._key = _api_key(model_cfg)
        self.window = max(WINDOW, 4 * model_cfg.num_concurrent)  # enough to keep num_concurrent in flight
        self._loop = asyncio.new_event_loop()  # one loop for the whole run: the connection pool lives in it
        http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [_on_attempt]})
        self._client = openai.AsyncOpenAI(base_url=self.url, api_key=self._key, max_retries=model_cfg.max_retries,
                                          timeout=model_cfg.timeout, http_client=http)  # fmt: skip
        self._overheads: dict[bool, int] = {}  # with_image -> prompt tokens besides the filler words

    def generate(self, requests: list[Request], on_result=None) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        stopped: list[BaseException] = []  # what on_result raised (the runner could not save, Ctrl-C)

        async def run_all() -> None:
            limit = asyncio.Semaphore(self.cfg.num_concurrent)

            async def one(i: int, request: Request) -> None:
                async with limit:
                    results[i] = await self._complete(request)
                if on_result and not stopped:
                    try:
                        on_result(i, results[i])
                    except BaseException as e:  # noqa: BLE001 - the rest stop here; it is raised below
                        stopped.append(e)
                        for t in tasks:
                            t.cancel()

            tasks = [asyncio.create_task(one(i, r), name=f"{TASK_NAME} {r.id}") for i, r in enumerate(requests)]
            await asyncio.gather(*tasks, return_exceptions=True)

        self._loop.run_until_complete(run_all())
        if stopped:
            raise stopped[0]
        return results  # type: ignore[return-value]

    async def _complete(self, request: Request) -> Generation:
        """One streamed chat completion; every failure is this sample's error."""
        try:
            messages, shown = _messages(request)
        except SampleError as e:
            return Generation(error=str(e))
        prompt = json.dumps(shown, ensure_ascii=False)
        extra = {"extra_body": {"min_tokens": request.min_new_tokens}} if request.min_new_tokens else {}  # vLLM's
        attempt = {"sent": time.perf_counter(), "count": 0}
        token = _ATTEMPT.set(attempt)
        try:
            stream = await self._client.chat.completions.create(
                model=self.cfg.served_model, messages=messages, max_tokens=request.max_new_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, **extra,
            )  # fmt: skip
            pieces, first, usage, finish = [], None, None, None
            async with stream:  # closed even when cancelled midway
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            pieces.append(choice.delta.content)
                            first = first or time.perf_counter()
                        finish = choice.finish_reason or finish
        except Exception as e:  # noqa: BLE001 - whatever the endpoint or the network did, it is this sample's
            return Generation(prompt=prompt, error=_redact(self._failure(e, attempt["count"]), self._key))
        finally:
            _ATTEMPT.reset(token)
        end = time.perf_counter()
        sent = attempt["sent"]  # the answered attempt's: a retry's waiting is not the model's time
        extra_out = {"ttft_s": (first or end) - sent, "finish_reason": finish}
        if usage is None:
            extra_out["usage_reported"] = False
        return Generation(
            text="".join(pieces),
            prompt=prompt,
            input_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.completion_tokens if usage else None,
            e2e_time=end - sent,
            extra=extra_out,
        )

    # ---- task_type performance ----------------------------------------------------------------------

    def image_span_tokens(self) -> int:
        """The prompt tokens one image adds on this endpoint (its chat template's image markers included)."""
        return self._overhead(True) - self._overhead(False)

    def run_timed(self, input_len: int, output_len: int, batch_size: int, with_image: bool, seed: int) -> TimedBatch:
        """`batch_size` streamed chat completions sent at once, as `vllm bench serve` sends its random
        prompts: each a run of random filler words (one token each) sized so that the endpoint counts
        exactly `input_len` prompt tokens (its chat template, and with `with_image` a 448x448 random-noise
        PNG first, included), `ignore_eos` and `min_tokens` = max_tokens = `output_len` (vLLM's extra
        parameters), `logprobs` with no alternatives so every token shows in the stream, timed when the
        chunk carrying it arrives. The images are encoded before the clock starts; sending them is in
        TTFT, as a client sees it."""
        import numpy as np

        fixed = self._overhead(with_image)
        words = input_len - fixed
        if words < 1:
            what = "chat template and image" if with_image else "chat template"
            raise SampleError(f"{input_len} input tokens cannot hold this endpoint's {what} ({fixed} tokens) and a word")
        rng = np.random.default_rng(seed)
        contents = []
        for _ in range(batch_size):
            parts = [{"type": "image_url", "image_url": {"url": data_url(_noise_image(rng))}}] if with_image else []
            parts.append({"type": "text", "text": "".join(rng.choice(FILLER_WORDS, words))})
            contents.append(parts)

        async def batch():
            return await asyncio.gather(*(self._timed(c, output_len) for c in contents), return_exceptions=True)

        submitted = time.perf_counter()
        results = self._loop.run_until_complete(batch())
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed if isinstance(failed, SampleError) else SampleError(f"{type(failed).__name__}: {failed}")
        return TimedBatch(submitted=submitted, input_tokens=[n for n, _ in results], token_times=[t for _, t in results],
                          engine={"endpoint": self.url, "served_model": self.cfg.served_model})  # fmt: skip

    async def _timed(self, content: list[dict], output_len: int) -> tuple[int, list[float]]:
        """One performance request: (prompt tokens as the endpoint counted them, each token's arrival time)."""
        times, usage, untimed = [], None, False
        try:
            stream = await self._client.chat.completions.create(
                model=self.cfg.served_model, messages=[{"role": "user", "content": content}], max_tokens=output_len,
                temperature=0, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=0,
                extra_body={"ignore_eos": True, "min_tokens": output_len},
            )  # fmt: skip
            async with stream:
                async for chunk in stream:
                    now = time.perf_counter()
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        tokens = choice.logprobs.content if choice.logprobs is not None else None
                        if tokens:
                            times += [now] * len(tokens)
                        elif choice.delta is not None and choice.delta.content:
                            untimed = True
        except Exception as e:  # noqa: BLE001 - the endpoint's or the network's failure is the case's
            raise SampleError(_redact(self._failure(e, 1), self._key)) from None
        if usage is None:
            raise SampleError(f"{self.url} sent no usage (stream_options.include_usage): the input length is unknown")
        if untimed or len(times) != usage.completion_tokens:
            raise SampleError(f"{self.url} streamed {len(times)} logprobs for {usage.completion_tokens} tokens: "
                              "timing each token needs one logprob per token in the stream (logprobs: true)")  # fmt: skip
        return usage.prompt_tokens, times

    def _overhead(self, with_image: bool) -> int:
        """The prompt tokens besides the filler words (the chat template's; with `with_image` the image's
        too), from the endpoint's counts of two probes (one word, every word), which also check that each
        filler word is one token. Asked once per kind."""
        import numpy as np

        if with_image not in self._overheads:
            image = ([{"type": "image_url", "image_url": {"url": data_url(_noise_image(np.random.default_rng(0)))}}]
                     if with_image else [])  # fmt: skip
            first = image + [{"type": "text", "text": FILLER_WORDS[0]}]
            every = image + [{"type": "text", "text": "".join(FILLER_WORDS)}]
            one, many = (self._loop.run_until_complete(self._prompt_tokens(c)) for c in (first, every))
            if many - one != len(FILLER_WORDS) - 1:
                raise SampleError(f"{self.url} counts {many - one + 1} tokens for the {len(FILLER_WORDS)} filler words "
                                  "of a performance prompt (one each is needed for an exact input length); its "
                                  "tokenizer is not a BPE one like Qwen's: run performance on --backend engine")  # fmt: skip
            self._overheads[with_image] = one - 1
        return self._overheads[with_image]

    async def _prompt_tokens(self, content: list[dict]) -> int:
        try:
            reply = await self._client.chat.completions.create(
                model=self.cfg.served_model, messages=[{"role": "user", "content": content}], max_tokens=1, temperature=0)
        except Exception as e:  # noqa: BLE001
            raise SampleError(_redact(self._failure(e, 1), self._key)) from None
        if reply.usage is None:
            raise SampleError(f"{self.url} reports no usage: a performance prompt's input length cannot be known")
        return reply.usage.prompt_tokens

    def _failure(self, e: Exception, attempts: int) -> str:
        """A failed request as one line: the status and the endpoint's own message, and how often it was tried."""
        import openai

        url = f"{self.url.rstrip('/')}/chat/completions"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(e, openai.APIStatusError):
            return f"HTTP {e.status_code} from {url}{tries}: {_message(e)}"
        if isinstance(e, openai.APITimeoutError):
            return f"no answer from {url} within {self.cfg.timeout:g} s{tries} (--timeout)"
        if isinstance(e, openai.APIConnectionError):
            return f"cannot reach {url}{tries}: {_cause(e)}"
        if isinstance(e, openai.APIError):  # an error event in the stream
            return f"{url}: {e.message}"
        return f"{url}: {type(e).__name__}: {e}"

    def close(self) -> None:
        """Stop what is still in flight (Ctrl-C arrived while the loop ran) and close the connections and
        the loop."""
        if self._loop.is_closed():
            return
        pending = asyncio.all_tasks(self._loop)
        for t in pending:
            t.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(self._client.close())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()


async def _on_attempt(request) -> None:
    attempt = _ATTEMPT.get()
    if attempt is not None:
        attempt["sent"] = time.perf_counter()
        attempt["count"] += 1


def _base_url(model_cfg) -> str:
    url = model_cfg.base_url
    if not url:
        raise ModelTestError("the openai backend needs the endpoint's URL: pass --base_url (e.g. "
                             "http://127.0.0.1:8000/v1) or set base_url in the model config")  # fmt: skip
    if not url.startswith(("http://", "https://")):
        raise ModelTestError(f"base_url {url!r} is not an http:// or https:// URL; give it as the openai client "
                             "takes it, e.g. http://127.0.0.1:8000/v1")  # fmt: skip
    return url


def _api_key(model_cfg) -> str:
    return model_cfg.api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY


def _redact(text: str, key: str) -> str:
    """`text` with the API key masked: an endpoint may echo it in an error, and errors go to logs."""
    return text.replace(key, "***") if key and key != NO_KEY else text


def _cause(e: Exception) -> str:
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def _message(e) -> str:
    """The endpoint's own error message: OpenAI's {"error": {"message"}}, vLLM's older {"message"},
    FastAPI's {"detail"}, or the body as it came."""
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or json.dumps(err)[:500])
        return str(err)
    return str(body or e.message)[:500]


def _refusal(e, where: str) -> str:
    """A check() refusal: what the status means for this run, and what to do."""
    status = f"HTTP {e.status_code}: {_message(e)}"
    if e.status_code in (401, 403):
        return (f"{where} refused the API key ({status}); pass the server's key with --api_key or OPENAI_API_KEY "
                "(or api_key in the model config)")  # fmt: skip
    if e.status_code == 404:
        return f"{where} not found ({status}); base_url is the API's root, usually ending in /v1"
    return f"{where} answered {status}; is the server up and ready?"


def _messages(request: Request) -> tuple[list[dict], list[dict]]:
    """The chat messages sent, and the same with each image's data URL replaced by its name (the prompt
    samples.jsonl records: small, and readable)."""
    sent, shown = [], []
    for part in request.parts:
        if "image" in part:
            image = part["image"]
            sent.append({"type": "image_url", "image_url": {"url": data_url(image)}})
            shown.append({"type": "image_url", "image_url": {"url": image_name(image) or "<in-memory image>"}})
        else:
            sent.append({"type": "text", "text": part["text"]})
            shown.append(sent[-1])
    return [{"role": "user", "content": sent}], [{"role": "user", "content": shown}]


def _noise_image(rng):
    """A PERF_IMAGE-sized RGB image of uniform random pixels (no two requests send the same one)."""
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (PERF_IMAGE, PERF_IMAGE, 3), dtype="uint8"))


def data_url(image) -> str:
    """`data:<mime>;base64,...` for an image: a file's or ImageBytes' own bytes when the OpenAI API takes
    their format (mime type from the content, not the name); other formats and PIL images as PNG of the
    8-bit RGB pixels every backend reads (open_image). SampleError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    data = _encoded(image)
    if data is not None:
        name = image_name(image) or "embedded image"
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt = im.format
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise SampleError(f"image unreadable: {name}: {e}") from None
        if fmt in SENT_AS_IS:
            return f"data:{SENT_AS_IS[fmt]};base64,{base64.b64encode(data).decode('ascii')}"
    buf = io.BytesIO()
    open_image(image).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _encoded(image) -> bytes | None:
    """An image's encoded bytes as stored (a file, ImageBytes, a `datasets` cell); None for PIL images."""
    if isinstance(image, ImageBytes):
        return image.data
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        image = image.get("path") or ""
    if not isinstance(image, (str, os.PathLike)):
        return None
    path = os.fspath(image)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SampleError(f"image not found: {path}") from None
    except OSError as e:
        raise SampleError(f"image unreadable: {path}: {e.strerror or e}") from None
