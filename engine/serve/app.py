"""The FastAPI application: OpenAI's routes over the engine thread (engine/serve/worker.py).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Every error is OpenAI's error body with its status: 400 for anything wrong in the request (pydantic's
validation errors included, instead of FastAPI's 422; bad or oversized images; a prompt too long for
max_model_len, which the engine refuses when the request is added), 401 for a missing or wrong API
key on any route when the server has one (/health and /metrics too: vLLM leaves them open, this
server does not — probes and scrapers send the header like any client), 404 for an
unknown model name or route, 503 with Retry-After when the waiting queue is full. A 500 means a bug.

A request is handed to the engine thread and answered from its DELTA outputs: streamed as server-sent
events, or gathered into one response. Either way, a client that goes away aborts its request at
once (the engine frees its KV blocks): the server watches for the ASGI disconnect message instead of
waiting for the next write to fail.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..sequence import RequestOutput
from .media import MediaLimits
from .metrics import CONTENT_TYPE, ServeMetrics
from .prompts import chat_prompt, completion_prompt
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    ServeError,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    error_body,
    sse,
    usage,
    usage_chunk,
)
from .worker import EngineWorker, Failed

logger = logging.getLogger("engine.serve")


@dataclass
class ServeState:
    """What the routes need: the engine thread, the names served, how prompts are made."""

    worker: EngineWorker
    metrics: ServeMetrics
    served_model_names: list[str]
    model_path: Path
    max_model_len: int
    chat_template: str  # chatml | raw
    media: MediaLimits
    token_bytes: Callable[[int], bytes]  # what one token id decodes to (logprobs)
    api_key: str | None = None
    created: int = 0

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise ServeError(f"The model `{name}` does not exist. This server serves "
                             f"{', '.join(self.served_model_names)}.", status=404, param="model",
                             code="model_not_found")  # fmt: skip


class _ClientGone(Exception):
    pass


_GONE = object()  # put on a request's event queue when its client disconnects


async def _disconnected(receive) -> None:
    """Returns when the ASGI server reports the client gone (or the response complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _outputs(events: asyncio.Queue) -> AsyncIterator:
    """A request's RequestOutputs up to the finished one; a failure is a ServeError."""
    while True:
        event = await events.get()
        if event is _GONE:
            raise _ClientGone
        if isinstance(event, Failed):
            raise ServeError(event.message, status=event.status)
        yield event
        if event.finished:
            return


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator of encoded events, raced against the client's
    disconnect message: when the client goes first, the iterator is closed (its `finally` aborts the
    request) without waiting for the next event to fail to send. When the server cancels the stream
    (the drain timeout after SIGTERM ran out), the stream ends with an error event and [DONE], so the
    client reads why instead of a cut connection."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._started = False

    async def __call__(self, scope, receive, send) -> None:
        body = asyncio.ensure_future(self._send_all(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        cancelled = False
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            for task in (body, gone):
                task.cancel()
            await asyncio.gather(body, gone, return_exceptions=True)
            await self.body_iterator.aclose()
        if cancelled:
            await self._send_shutdown(send)
            return
        error = None if body.cancelled() else body.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client went away mid-write
            raise error

    async def _send_all(self, send) -> None:
        self._started = True
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_shutdown(self, send) -> None:
        if not self._started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        error = error_body("the server shut down before this request finished (--drain-timeout)", 503)
        await send({"type": "http.response.body", "body": sse(error) + sse("[DONE]"), "more_body": False})


class APIKeyMiddleware:
    """Every request needs `Authorization: Bearer <key>` (pure ASGI, so streams pass untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                body = error_body("Incorrect or missing API key: send the header `Authorization: Bearer <key>`",
                                  401, code="invalid_api_key")  # fmt: skip
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the most specific of pydantic's errors."""
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and "[" not in str(x)]
    param = ".".join(loc) or None
    kind = err.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if param is None and kind in ("missing", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if kind == "missing":
        return f"{param} is required", param
    return f"{param or 'body'}: {err['msg']}", param


def create_app(state: ServeState) -> FastAPI:
    worker = state.worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        yield
        await worker.stop()  # uvicorn has drained the requests in flight (or timed out) by now

    app = FastAPI(title="engine.serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return JSONResponse(error_body(message, 400, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("engine.serve: error answering %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", 500), status_code=500)

    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse(error_body(worker.error or "the engine is not running", 503), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "modeltest",
                 "root": str(state.model_path), "max_model_len": state.max_model_len}
                for name in state.served_model_names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        sampling = body.to_sampling()
        worker.check_admission()
        prompt = await run_in_threadpool(chat_prompt, body.messages, state.chat_template, state.media)
        reply = Reply.new("chatcmpl", body.model)
        top = body.top_logprobs or 0

        def logprobs(out) -> dict | None:
            c = out.outputs[0]
            return chat_logprobs(c.logprobs, c.token_ids, top, state.token_bytes) if body.logprobs else None

        stream = _chat_events if body.stream else None
        return await _answer(worker, request, reply, prompt, sampling, stream, body.include_usage, chat_response,
                             logprobs)  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        sampling = body.to_sampling()
        text = body.prompt_text()
        worker.check_admission()
        prompt = await run_in_threadpool(completion_prompt, text, state.media)
        reply = Reply.new("cmpl", body.model)
        top = body.logprobs

        def logprobs(out, offset: int = 0) -> dict | None:
            c = out.outputs[0]
            return None if top is None else completion_logprobs(c.logprobs, c.token_ids, top, state.token_bytes, offset)

        stream = _completion_events if body.stream else None
        return await _answer(worker, request, reply, prompt, sampling, stream, body.include_usage,
                             completion_response, logprobs)  # fmt: skip

    return app


async def _answer(worker: EngineWorker, request: Request, reply: Reply, prompt, sampling: dict, stream,
                  include_usage: bool, respond: Callable, logprobs: Callable):  # fmt: skip
    """Run a request and answer it: when the client asked for a stream, the server-sent events of
    `stream` (_chat_events or _completion_events), else `respond(reply, text, finish_reason, logprobs,
    usage)` over the whole output (499 when the client went away first)."""
    events = await _start(worker, reply.id, prompt, sampling)
    if stream is not None:
        return EventStream(stream(worker, reply, events, include_usage, logprobs))
    done = await _whole(worker, request, reply.id, events)
    if done is None:
        return Response(status_code=499)  # nobody is there to read it
    return respond(reply, done.text, done.finish_reason, logprobs(done), _usage(done))


async def _start(worker: EngineWorker, request_id: str, prompt, sampling: dict) -> asyncio.Queue:
    """Submit and wait until the engine has taken the request: a prompt it refuses (too long, ...) is
    a ServeError before any response starts."""
    events = worker.submit(request_id, prompt, sampling)
    try:
        first = await events.get()
    except BaseException:
        worker.release(request_id)
        raise
    if isinstance(first, Failed):
        raise ServeError(first.message, status=first.status)
    return events


async def _gather(request: Request, events: asyncio.Queue) -> RequestOutput:
    """A request's DELTA outputs joined into its whole output, for a non-streaming answer; _ClientGone
    if the client disconnects first."""
    gone = asyncio.ensure_future(_disconnected(request.receive))
    gone.add_done_callback(lambda t: t.cancelled() or events.put_nowait(_GONE))
    try:
        texts, token_ids, entries, last = [], [], [], None
        async for out in _outputs(events):
            c = out.outputs[0]
            texts.append(c.text)
            token_ids += c.token_ids
            entries += c.logprobs or []
            last = out
    finally:
        gone.cancel()
    whole = replace(last.outputs[0], text="".join(texts), token_ids=token_ids, logprobs=entries or None)
    return replace(last, outputs=[whole])


async def _whole(worker: EngineWorker, request: Request, request_id: str, events: asyncio.Queue) -> RequestOutput | None:
    """A non-streaming answer: the request's whole output, or None when its client went away first
    (either way the request is released: aborted if it has not finished)."""
    try:
        return await _gather(request, events)
    except _ClientGone:
        return None
    finally:
        worker.release(request_id)


def _usage(out: RequestOutput) -> dict:
    return usage(len(out.prompt_token_ids), len(out.token_ids))


async def _chat_events(worker, reply: Reply, events: asyncio.Queue, include_usage: bool, logprobs):
    """A chat completion as OpenAI streams it: a first chunk with the assistant role, one chunk per
    output that adds text (or logprobs), the finish reason on the last, then with include_usage a
    chunk with no choices and the usage, then [DONE]."""
    try:
        yield sse(chat_chunk(reply, {"role": "assistant", "content": ""}, with_usage=include_usage))
        prompt_tokens = generated = 0
        async for out in _outputs(events):
            c = out.outputs[0]
            prompt_tokens, generated = len(out.prompt_token_ids), generated + len(c.token_ids)
            lp = logprobs(out) if c.token_ids else None
            if c.text or lp or out.finished:
                delta = {"content": c.text} if c.text else {}
                yield sse(chat_chunk(reply, delta, c.finish_reason, lp, include_usage))
        if include_usage:
            yield sse(usage_chunk(reply, "chat.completion.chunk", usage(prompt_tokens, generated)))
        yield sse("[DONE]")
    except ServeError as e:  # the engine failed or shut down mid-stream: say so in the stream
        yield sse(e.body())
        yield sse("[DONE]")
    finally:
        worker.release(reply.id)


async def _completion_events(worker, reply: Reply, events: asyncio.Queue, include_usage: bool, logprobs):
    """A completion as OpenAI streams it: one chunk per output that adds text (or logprobs), the finish
    reason on the last, the usage chunk with include_usage, then [DONE]."""
    try:
        prompt_tokens = generated = offset = 0
        async for out in _outputs(events):
            c = out.outputs[0]
            prompt_tokens, generated = len(out.prompt_token_ids), generated + len(c.token_ids)
            lp = logprobs(out, offset) if c.token_ids else None
            offset += len(c.text)
            if c.text or lp or out.finished:
                yield sse(completion_chunk(reply, c.text, c.finish_reason, lp, include_usage))
        if include_usage:
            yield sse(usage_chunk(reply, "text_completion", usage(prompt_tokens, generated)))
        yield sse("[DONE]")
    except ServeError as e:
        yield sse(e.body())
        yield sse("[DONE]")
    finally:
        worker.release(reply.id)
