"""Protects the OpenAI-compatible server (`python -m engine.serve`), run as a real subprocess on the tiny
random Qwen-VL (fp32, CPU) and spoken to with the official `openai` client (httpx where a raw body or
header is checked):

- routes and shapes: chat completions (image as a data: URL, streaming or not, include_usage's last
  chunk), completions (`<img>path</img>` from the allowed folder), /v1/models, /health, /metrics;
- greedy answers equal `LLM.generate` token for token: raw template = the base model's
  `<img>..</img>question Answer:`, chatml = the engine's chat messages (system message included);
  --chat-template auto picks raw from generation_config.json's chat_format;
- errors: OpenAI's body and status for bad images (undecodable, too many pixels, too many bytes),
  http(s) URLs, files outside --allowed-local-media-path, `<img>` typed into text, a prompt too long
  for --max-model-len, n=2, unknown fields and pydantic errors (400, never 422), a wrong or missing
  key (401), an unknown model (404), a full waiting queue (503 + Retry-After);
- 32 concurrent streams all complete, each equal to its non-streaming answer, KV usage back to 0;
- a client that disconnects (streaming or not) aborts its request and frees its KV blocks;
- SIGTERM: the request in flight finishes, new connections are refused, exit 0; a stream still running
  when --drain-timeout ends gets an error event saying so, then [DONE];
- tensor parallel 2 under torchrun (CPU, gloo): rank 0 serves, rank 1 follows, tp 1's answers;
- the CLI: a bad flag or model folder is one line on stderr and exit 2; --help names the command as
  typed and ends with the exit codes.

Three servers and one torchrun pair per run (each starts in a few seconds); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine import SamplingParams
from engine.serve import cli

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import DIST_ENV  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key"
MODEL = "tiny-qwen-vl"
QUESTION = "What is in the picture? Answer:"
START_TIMEOUT_S = 180


class Server:
    """`python -m engine.serve` in a subprocess; its stderr is read by a thread (the port comes from the
    `listening on` line; the rest is kept for failure messages)."""

    def __init__(self, *args: str, launcher: tuple[str, ...] = (sys.executable, "-m"), env: dict | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        for key in ("MODELTEST_API_KEY", *DIST_ENV):
            env.pop(key, None)
        cmd = [*launcher, "engine.serve", *args, "--port", "0", "--device", "cpu", "--dtype", "float32",
               "--uvicorn-log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.match(r"engine\.serve: listening on (http://\S+)$", line.strip())
            if m:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()  # the process ended

    def wait_ready(self) -> Server:
        if not self.ready.wait(START_TIMEOUT_S) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines[-30:]))
        return self

    def log(self) -> str:
        return "".join(self.lines[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def client(self, key: str | None = KEY, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """The server's metrics, by name and labels as written (one scrape)."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}  # fmt: skip

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 when not there yet, as for a counter with no increments)."""
        want = {"model_name": MODEL, **labels}
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == want:
                return value
        return 0.0

    def wait_metric(self, name: str, ok, timeout: float = 30.0, **labels: str) -> float:
        """Poll /metrics until ok(value) (bounded: AssertionError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if ok(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} stayed at {value} for {timeout} s")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def raw_ckpt(qwen_vl_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint (its files linked) with a base model's generation_config.json: chat_format raw."""
    folder = tmp_path_factory.mktemp("serve") / "tiny-base"
    folder.mkdir()
    for f in qwen_vl_ckpt.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "generation_config.json").write_text(json.dumps({"chat_format": "raw"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def media_dir(photo_dir, tmp_path_factory) -> Path:
    """The folder the main server may read images from: copies of the photos (links would resolve out)."""
    folder = tmp_path_factory.mktemp("media")
    for photo in photo_dir.iterdir():
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture(scope="module")
def server(raw_ckpt, media_dir):
    """Raw template (auto, from generation_config.json), API key, local images from media_dir, small
    image limits, room for 32 sequences at once."""
    s = Server(str(raw_ckpt), "--served-model-name", MODEL, "--api-key", KEY, "--allowed-local-media-path",
               str(media_dir), "--max-model-len", "1024", "--block-size", "16", "--num-gpu-blocks-override",
               "1024", "--max-num-seqs", "32", "--max-image-pixels", "300000", "--max-image-bytes", "1000000")  # fmt: skip
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="module")
def busy_server(qwen_vl_ckpt):
    """The checkpoint as it is (no generation_config.json: chatml), one sequence at a time, one waiting."""
    s = Server(str(qwen_vl_ckpt), "--served-model-name", MODEL, "--max-model-len", "1024", "--block-size", "16",
               "--num-gpu-blocks-override", "256", "--max-num-seqs", "1", "--max-waiting", "1")  # fmt: skip
    yield s.wait_ready()
    s.stop()


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def offline(llm, prompt, max_tokens: int = 8, logprobs: int | None = None):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, logprobs=logprobs), use_tqdm=False)[0]


# ---- answers ------------------------------------------------------------------------------------------


def test_raw_chat_with_an_image_is_the_base_models_vqa_prompt_token_for_token(server, qwen_vl_llm, media_dir):
    photo = media_dir / "astronaut.jpg"
    want = offline(qwen_vl_llm, f"<img>{photo}</img>{QUESTION}", logprobs=2)
    got = server.client().chat.completions.create(model=MODEL, messages=image_message(data_url(photo)),
                                                  max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-") and got.model == MODEL
    assert abs(got.created - time.time()) < 300
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert got.usage.completion_tokens == len(want.token_ids) == 8
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    tok = qwen_vl_llm.get_tokenizer()
    assert [c.token for c in choice.logprobs.content] == [tok.decode([t]) for t in want.token_ids]
    assert [bytes(c.bytes) for c in choice.logprobs.content] == [tok.token_bytes(t) for t in want.token_ids]
    for c, t, entry in zip(choice.logprobs.content, want.token_ids, want.logprobs, strict=True):
        assert abs(c.logprob - entry[t]) < 1e-4 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob  # greedy


def test_a_file_url_under_the_allowed_folder_answers_as_its_data_url(server, media_dir):
    photo = media_dir / "coffee.png"
    client = server.client()
    answers = [client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=6, temperature=0)
               .choices[0].message.content for url in (data_url(photo), photo.as_uri())]  # fmt: skip
    assert answers[0] == answers[1]


def test_completions_read_img_spans_from_the_allowed_folder(server, qwen_vl_llm, media_dir):
    prompt = f"<img>{media_dir / 'chelsea.jpg'}</img>What animal is this? Answer:"
    want = offline(qwen_vl_llm, prompt, max_tokens=6, logprobs=1)
    got = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.choices[0].text == want.text and got.usage.completion_tokens == 6
    lp = got.choices[0].logprobs
    assert all(abs(a - e[t]) < 1e-4 for a, t, e in zip(lp.token_logprobs, want.token_ids, want.logprobs, strict=True))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    # the same request streamed: the chunks add up to the same text, the usage chunk comes last
    chunks = list(server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chatml_chat_is_the_engines_chat_form_token_for_token(busy_server, qwen_vl_llm, photo_dir):
    photo = photo_dir / "rocket.png"
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": [{"image": str(photo)}, {"text": "What is this?"}]}]  # fmt: skip
    want = offline(qwen_vl_llm, messages)
    api = [messages[0], image_message(data_url(photo), "What is this?")[0]]
    client = busy_server.client(key=None)
    got = client.chat.completions.create(model=MODEL, messages=api, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    stream = client.chat.completions.create(model=MODEL, messages=api, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_a_seed_makes_sampling_reproducible_and_a_stop_string_cuts_the_text(server):
    client = server.client()
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8)
    a, b = (client.chat.completions.create(**ask, temperature=1.0, seed=7).choices[0].message.content for _ in range(2))
    assert a == b
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    stop = greedy[len(greedy) // 2 :][:2]
    cut = client.chat.completions.create(**ask, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.url}/health", headers=auth, timeout=30).status_code == 200
    for route in ("/health", "/metrics"):  # with --api-key every route needs it
        assert httpx.get(f"{server.url}{route}", timeout=30).status_code == 401, route
    server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    names = {key.partition("{")[0] for key in server.metrics()}
    for name in ("engine:num_requests_running", "engine:num_requests_waiting", "engine:kv_cache_usage_perc",
                 "engine:prefix_cache_hits_total", "engine:prompt_tokens_total", "engine:generation_tokens_total",
                 "engine:time_to_first_token_seconds_bucket", "engine:inter_token_latency_seconds_bucket",
                 "engine:e2e_request_latency_seconds_count", "engine:request_success_total"):  # fmt: skip
        assert name in names, name
    before = server.metric("engine:generation_tokens_total")
    server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert server.metric("engine:generation_tokens_total") == before + 3


# ---- errors -------------------------------------------------------------------------------------------


def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _bad_request(server, match: str, param: str | None = None, **request):
    """A chat request that must be refused with 400 and OpenAI's error body naming `match`."""
    request = {"model": MODEL, "max_tokens": 4, **request}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**request)
    error = _error(e.value)
    assert e.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert re.search(match, error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_images_are_400_naming_the_problem(server, media_dir, tmp_path):
    from PIL import Image

    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really" * 50).decode()
    param = "messages.0.content.0.image_url"
    _bad_request(server, "not an image this server reads", param, messages=image_message(garbage))
    bomb = png_url(Image.new("1", (3000, 3000)))  # a few KB of PNG declaring 9 million pixels
    _bad_request(server, r"3000x3000 = 9000000 pixels, more than --max-image-pixels 300000", param,
                 messages=image_message(bomb))  # fmt: skip
    big = "data:image/png;base64," + base64.b64encode(os.urandom(1_500_000)).decode()
    _bad_request(server, "more than --max-image-bytes 1000000", param, messages=image_message(big))
    truncated = "data:image/jpeg;base64," + base64.b64encode((media_dir / "astronaut.jpg").read_bytes()[:3000]).decode()
    _bad_request(server, "could not be decoded: image file is truncated", param, messages=image_message(truncated))
    _bad_request(server, "not fetched by this server: send the image inline as a data: URL", param,
                 messages=image_message("https://example.com/cat.jpg"))  # fmt: skip
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    _bad_request(server, "outside --allowed-local-media-path", param, messages=image_message(outside.as_uri()))
    link = media_dir / "link-out.png"  # a link in the allowed folder pointing out of it
    link.symlink_to(outside)
    try:
        _bad_request(server, "outside --allowed-local-media-path", param, messages=image_message(link.as_uri()))
    finally:
        link.unlink()
    many = [{"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (8, 8)))}}] * 9
    _bad_request(server, r"9 images in one request; this server takes at most 8", "messages",
                 messages=[{"role": "user", "content": many}])  # fmt: skip
    _bad_request(server, "may not contain <img>", "messages",
                 messages=[{"role": "user", "content": f"<img>{media_dir / 'coffee.png'}</img>What is it?"}])  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL, prompt=f"<img>{outside}</img>hi", max_tokens=2)
    assert "outside --allowed-local-media-path" in _error(e.value)["message"]


def test_requests_the_engine_cannot_run_are_400_not_422_or_500(server):
    hello = [{"role": "user", "content": "Hello"}]
    _bad_request(server, r"prompt is \d+ tokens.*more than max_model_len 1024",
                 messages=[{"role": "user", "content": "word " * 1100}])  # fmt: skip
    _bad_request(server, "one choice per request", "n", messages=hello, n=2)
    _bad_request(server, "only allowed with stream: true", "stream_options", messages=hello,
                 stream_options={"include_usage": True})  # fmt: skip
    _bad_request(server, "unrecognized request argument supplied: tools", "tools", messages=hello,
                 extra_body={"tools": []})  # fmt: skip
    _bad_request(server, "temperature", "temperature", messages=hello, temperature=5)
    _bad_request(server, "frequency_penalty is not supported", "frequency_penalty", messages=hello,
                 frequency_penalty=0.5)  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={**auth, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"hello", headers=auth, timeout=30)
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL}, headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == {"message": "messages is required", "param": "messages",
                                                          "type": "invalid_request_error", "code": None}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL, prompt="word " * 1100, max_tokens=2)
    assert "max_model_len 1024" in _error(e.value)["message"]


def test_a_wrong_key_is_401_and_an_unknown_model_404(server):
    for key in ("wrong", None):
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(key=key).models.list()
        assert e.value.status_code == 401 and _error(e.value)["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}/v1/models", timeout=30)  # no header at all
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = _error(e.value)
    assert e.value.status_code == 404 and error["code"] == "model_not_found" and "`gpt-4o` does not exist" in error["message"]


# ---- concurrency, disconnects, admission, shutdown ------------------------------------------------


def test_32_concurrent_streams_complete_and_equal_their_non_streaming_answers(server, media_dir):
    photos = sorted(media_dir.iterdir())
    requests = []
    for i in range(32):
        text = f"Question {i}: what do you see?"
        requests.append(image_message(data_url(photos[i % len(photos)]), text) if i % 4 == 0
                        else [{"role": "user", "content": text}])  # fmt: skip

    async def run() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def stream(messages):
            chunks = [c async for c in await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)]  # fmt: skip
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            return "".join(c.choices[0].delta.content or "" for c in chunks), reasons

        async def whole(messages):
            return (await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                         temperature=0)).choices[0].message.content  # fmt: skip

        try:
            streamed = await asyncio.wait_for(asyncio.gather(*(stream(m) for m in requests)), 240)
            whole_answers = await asyncio.wait_for(asyncio.gather(*(whole(m) for m in requests)), 240)
        finally:
            await client.close()
        return streamed, whole_answers

    streamed, whole_answers = asyncio.run(run())
    assert all(reasons == ["length"] for _, reasons in streamed)
    assert [text for text, _ in streamed] == whole_answers
    assert server.wait_metric("engine:kv_cache_usage_perc", lambda v: v == 0) == 0
    assert server.metric("engine:num_requests_running") == 0


def test_a_client_that_disconnects_frees_its_kv_blocks(server):
    """Streaming (the stream closed after two chunks) and not (the client's read timeout): each request
    ends as an abort, long before its 900 tokens, and the KV cache is empty again."""
    aborts = server.metric("engine:request_success_total", finished_reason="abort")
    lengths = server.metric("engine:request_success_total", finished_reason="length")
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=900, temperature=0,
               extra_body={"ignore_eos": True})
    stream = server.client().chat.completions.create(**ask, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert server.metric("engine:num_requests_running") == 1 and server.metric("engine:kv_cache_usage_perc") > 0
    stream.close()
    server.wait_metric("engine:request_success_total", lambda v: v == aborts + 1, finished_reason="abort")
    assert server.wait_metric("engine:kv_cache_usage_perc", lambda v: v == 0) == 0

    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=1.5).chat.completions.create(**ask)
    server.wait_metric("engine:request_success_total", lambda v: v == aborts + 2, finished_reason="abort")
    assert server.wait_metric("engine:kv_cache_usage_perc", lambda v: v == 0) == 0
    assert server.metric("engine:request_success_total", finished_reason="length") == lengths


def test_a_full_waiting_queue_is_503_with_retry_after(busy_server):
    """--max-num-seqs 1 --max-waiting 1: one running, one waiting, the next refused; once the first is
    gone the waiting one runs and completes."""
    client = busy_server.client(key=None)
    long = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=900,
                                          temperature=0, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(long))
    result: dict = {}

    def waiting():
        result["answer"] = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                          max_tokens=2, temperature=0)  # fmt: skip

    thread = threading.Thread(target=waiting, daemon=True)
    thread.start()
    try:
        busy_server.wait_metric("engine:num_requests_waiting", lambda v: v == 1)
        r = httpx.post(f"{busy_server.url}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hey"}], "max_tokens": 2})  # fmt: skip
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "server_error" and "--max-waiting 1" in r.json()["error"]["message"]
    finally:
        long.close()
        thread.join(timeout=120)
    assert not thread.is_alive() and result["answer"].choices[0].finish_reason == "length"


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(busy_server):
    """Last in this file: it stops busy_server."""
    client = busy_server.client(key=None)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=150, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
    chunks = iter(stream)
    first = [next(chunks), next(chunks)]
    busy_server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:  # new connections are refused while the process is still there, draining
        try:
            httpx.get(f"{busy_server.url}/health", timeout=5)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "still accepting connections 20 s after SIGTERM"
        time.sleep(0.05)
    assert busy_server.proc.poll() is None
    rest = list(chunks)  # the stream goes on to its end
    assert rest[-1].usage.completion_tokens == 150
    assert [c.choices[0].finish_reason for c in first + rest if c.choices][-1] == "length"
    assert busy_server.proc.wait(timeout=60) == 0, busy_server.log()


def test_a_stream_still_running_when_the_drain_timeout_ends_is_told_why(qwen_vl_ckpt):
    s = Server(str(qwen_vl_ckpt), "--max-model-len", "1024", "--block-size", "16", "--num-gpu-blocks-override",
               "128", "--drain-timeout", "1")  # fmt: skip
    try:
        s.wait_ready()
        stream = s.client(key=None).chat.completions.create(
            model=str(qwen_vl_ckpt), messages=[{"role": "user", "content": "Hello"}], max_tokens=900, temperature=0,
            stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = iter(stream)
        next(chunks), next(chunks)
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match=r"shut down before this request finished \(--drain-timeout\)"):
            list(chunks)
        assert s.proc.wait(timeout=60) == 0, s.log()
    finally:
        s.stop()


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with this RANK (from /proc: its children's environments)."""
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (ValueError, OSError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"torchrun's rank {rank} not found")


def test_tensor_parallel_2_under_torchrun_serves_tp1s_answers(qwen_vl_ckpt, qwen_vl_llm, photo_dir):
    """Rank 0 serves HTTP, rank 1 follows its steps; greedy answers (two at once, one with an image)
    equal tp 1's offline ones. SIGTERM to every rank (as a terminal's Ctrl-C or torchrun sends it):
    rank 1 keeps following until rank 0 has drained and tells it to stop; torchrun exits 0."""
    s = Server(str(qwen_vl_ckpt), "--served-model-name", MODEL, "--tensor-parallel-size", "2", "--max-model-len",
               "1024", "--block-size", "16", "--num-gpu-blocks-override", "128",
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"),
               env={"MODELTEST_DIST_TIMEOUT": "60"})  # fmt: skip
    try:
        s.wait_ready()
        photo = photo_dir / "chelsea.jpg"
        chats = [[{"role": "user", "content": "Hello"}],
                 [{"role": "user", "content": [{"image": str(photo)}, {"text": "What is this?"}]}]]  # fmt: skip
        wants = [offline(qwen_vl_llm, chat).text for chat in chats]
        apis = [chats[0], image_message(data_url(photo), "What is this?")]
        client = s.client(key=None)
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            got = client.chat.completions.create(model=MODEL, messages=apis[i], max_tokens=8, temperature=0)
            answers[i] = got.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert answers == {0: wants[0], 1: wants[1]}, s.log()
        for rank in (1, 0):
            os.kill(_rank_pid(s.proc.pid, rank), signal.SIGTERM)
        assert s.proc.wait(timeout=120) == 0, s.log()
    finally:
        s.stop()


# ---- the command line ---------------------------------------------------------------------------------


def test_help_names_the_command_as_typed_and_ends_with_the_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/modeltest-serve"])
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and text.startswith("usage: modeltest-serve ")
    codes = re.findall(r"^  (\d+) +", text.split("\nexit codes:\n", 1)[1], re.M)
    assert codes == ["0", "1", "2"]
    monkeypatch.setattr(sys, "argv", [str(REPO / "engine" / "serve" / "__main__.py")])
    assert cli.build_parser().format_usage().startswith("usage: python -m engine.serve ")


def test_bad_flags_and_model_folders_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["model", "--port", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port: invalid int value: 'x'" in err
    assert cli.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err == f"engine.serve: error: model folder not found: {tmp_path / 'missing'}\n"
    assert cli.main([str(tmp_path), "--limit-mm-per-prompt", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(("flag", "chunked", "eager"), [([], True, False), (["--no-enable-chunked-prefill"], False, False),
                                                       (["--enforce-eager"], True, True)])  # fmt: skip
def test_engine_flags_reach_the_engine_args(qwen_vl_ckpt, monkeypatch, flag, chunked, eager):
    """vLLM's engine flags are EngineArgs (here --[no-]enable-chunked-prefill, --enforce-eager), before
    any weight loads."""
    from engine.llm_engine import LLMEngine

    class Built(Exception):
        pass

    def capture(args):
        raise Built(args)

    monkeypatch.setattr(LLMEngine, "from_engine_args", staticmethod(capture))
    with pytest.raises(Built) as e:
        cli.main([str(qwen_vl_ckpt), "--port", "0", *flag])
    assert e.value.args[0].enable_chunked_prefill is chunked and e.value.args[0].enforce_eager is eager
