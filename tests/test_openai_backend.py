"""Protects `--backend openai` (modeltest/backends/openai.py), against a fake OpenAI server started here
(http.server on 127.0.0.1, once for the module) that records what it receives and answers from a script
per question:

- each sample is one streamed chat completion of the documented shape (image data URL = the file's own
  bytes and mime type, max_tokens, temperature 0, stream_options.include_usage), with the key from
  --api_key, the model config or OPENAI_API_KEY in the Authorization header and in no file written;
- at most --num_concurrent requests are in flight, and that many are reached;
- TTFT and the endpoint's usage reach samples.jsonl (no usage: null counts, said so); VQA scores as for
  any backend; results under results/openai/... naming the endpoint, no device or dtype;
- 429 / 503 with Retry-After are retried (Retry-After honoured) and answered; an always-500 and a 400
  are those samples' errors (the 400 not retried) and the run goes on;
- an interrupted run resumes with only the rest requested; base_url is part of the run's configuration;
- an unreachable URL, a wrong key, two models without --served_model: exit 2, one line, before any work;
- against `python -m engine.serve` on the tiny Qwen-VL, the predictions equal the engine backend's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from modeltest.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_textvqa  # noqa: E402
from test_runner import ANSWERS, EXPECTED  # noqa: E402  (answers per sample and their VQA accuracy)

N = len(ANSWERS)
FIRST_ID = 34602
MODEL = "tiny-vl"
KEY = "sk-test-Secret0123456789"
GATE_S = 5.0  # the longest the first requests wait at the concurrency gate for the rest
GRACE_S = 0.5  # once reached, how long a client that would send one request more has to show it


# ---- the fake endpoint ---------------------------------------------------------------------------------


class Endpoint:
    """What the fake server does (set per test by reset) and what it saw."""

    def __init__(self):
        self.cond = threading.Condition()
        self.reset()

    def reset(self, models=(MODEL,), key=None, script=None, gate=0, on_request=None):
        with self.cond:
            self.models, self.key, self.script, self.gate = list(models), key, script or {}, gate
            self.on_request = on_request  # called with the request's number (1, 2, ...) as it arrives
            self.requests: list[tuple[dict, dict]] = []  # (JSON body, headers) of each chat completion
            self.attempts: dict[int, list[float]] = defaultdict(list)  # sample -> arrival times
            self.auth: list[str] = []  # Authorization headers of every request
            self.in_flight = self.max_in_flight = 0
            self.gate_open = False

    def tags(self) -> list[int]:
        return [_tag(body) for body, _ in self.requests]


def _tag(body: dict) -> int:
    """The sample a request is for: its question ends with '#<i>' (see the data fixture)."""
    text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
    return int(re.search(r"#(\d+)", text).group(1))


def _handler(ep: Endpoint):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _refused(self) -> bool:
            auth = self.headers.get("Authorization", "")
            ep.auth.append(auth)
            if ep.key is not None and auth != f"Bearer {ep.key}":
                given = auth.removeprefix("Bearer ")  # echoed, as OpenAI does: the client must mask it
                self._json(401, {"error": {"message": f"Incorrect API key provided: {given}", "code": 401}})
                return True
            return False

        def do_GET(self):
            if self.path != "/v1/models":
                return self._json(404, {"detail": "Not Found"})
            if not self._refused():
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                             "owned_by": "test"} for m in ep.models]})  # fmt: skip

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with ep.cond:
                ep.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                number = len(ep.requests)
                tag = _tag(body)
                ep.attempts[tag].append(time.monotonic())
                ep.in_flight += 1
                ep.max_in_flight = max(ep.max_in_flight, ep.in_flight)
                if ep.gate and not ep.gate_open:  # hold each request until `gate` are in flight at once
                    if ep.in_flight >= ep.gate:  # reached; a client that would send more gets GRACE_S to show it
                        ep.cond.wait_for(lambda: ep.in_flight > ep.gate, timeout=GRACE_S)
                        ep.gate_open = True
                        ep.cond.notify_all()
                    elif not ep.cond.wait_for(lambda: ep.gate_open, timeout=GATE_S):
                        ep.gate_open = True  # never reached: the rest go at once (the test fails, quickly)
                step = ep.script.get(tag, {})
                fail = step.get("always") or (step["fail"].pop(0) if step.get("fail") else None)
            if ep.on_request:
                ep.on_request(number)
            self.left = False
            try:
                if ep.key is not None and self.headers.get("Authorization") != f"Bearer {ep.key}":
                    self._leave()
                    self._refused()
                elif fail:
                    status, message, headers = fail
                    self._leave()
                    self._json(status, {"error": {"message": message, "code": status}}, headers)
                else:
                    self._stream(tag, body, usage=step.get("usage", True))
            finally:
                self._leave()

        def _leave(self) -> None:
            """No longer in flight: called before the last bytes of a response go, so the client cannot
            have started its next request (or retry) before this one is counted out."""
            if not self.left:
                self.left = True
                with ep.cond:
                    ep.in_flight -= 1

        def _stream(self, tag: int, body: dict, usage: bool) -> None:
            answer = ANSWERS[tag][0]
            pieces = re.findall(r"\S+\s*|\s+", answer)

            def chunk(delta=None, finish=None, **extra):
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
                data = {"id": f"chatcmpl-{tag}", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                        "choices": choices, **extra}  # fmt: skip
                return f"data: {json.dumps(data)}\n\n".encode()

            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            out = [chunk({"role": "assistant", "content": ""})]
            out += [chunk({"content": p}) for p in pieces]
            out.append(chunk({}, "stop"))
            if usage:
                out.append(chunk(usage={"prompt_tokens": 100 + tag, "completion_tokens": len(pieces),
                                        "total_tokens": 100 + tag + len(pieces)}))  # fmt: skip
            for piece in out:
                self.wfile.write(piece)
                self.wfile.flush()
            self._leave()
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hung up midway (a cancelled request): expected here, not worth a traceback on the
        next test's stderr."""


@pytest.fixture(scope="module")
def server():
    ep = Endpoint()
    httpd = _Server(("127.0.0.1", 0), _handler(ep))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield ep
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def endpoint(server):
    server.reset()
    return server


@pytest.fixture(scope="module")
def data(photo_dir, tmp_path_factory) -> Path:
    """make_textvqa's questions, each tagged '#<i>' so the server knows which sample it answers."""
    path = make_textvqa(tmp_path_factory.mktemp("openai") / "textvqa", photo_dir, n=N)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["question"] += f" #{i}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(data: Path) -> list[dict]:
    return [json.loads(x) for x in data.read_text().splitlines()]


def _run(tmp: Path, data: Path, model: dict | None, *flags: str) -> tuple[int, list[dict], Path]:
    """modeltest on `data` (model config `model`, or none), the exit code, samples.jsonl's records, the output dir."""
    task = tmp / "task.yaml"
    task.write_text(yaml.safe_dump({"task_name": "textvqa", "local_dataset_path": str(data)}))
    args = ["--task_config_path", str(task), "--output_dir", str(tmp / "out"), "--no_progress", *flags]
    if model is not None:
        (tmp / "model.yaml").write_text(yaml.safe_dump({"model_name": "tiny-endpoint", "backend": "openai", **model}))
        args += ["--model_config_path", str(tmp / "model.yaml")]
    code = main(args)
    samples = next((tmp / "out").rglob("samples.jsonl"), None)
    records = [json.loads(x) for x in samples.read_text().splitlines()] if samples else []
    return code, records, tmp / "out"


def _files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line and not line.startswith("modeltest: note: ")]


# ---- what is sent, what is recorded ----------------------------------------------------------------------


def test_each_sample_is_one_streamed_chat_completion(endpoint, data, tmp_path, capsys):
    code, records, out = _run(tmp_path, data, {"base_url": endpoint.url, "block_size": 16},
                              "--api_key", KEY, "--num_concurrent", "2")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and len(records) == N and sorted(endpoint.tags()) == list(range(N))
    rows = _rows(data)
    for body, headers in endpoint.requests:
        i = _tag(body)
        image = data.parent / rows[i]["image"]
        assert headers["authorization"] == f"Bearer {KEY}"
        assert {k: v for k, v in body.items() if k != "messages"} == {
            "model": MODEL, "max_tokens": 10, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        [message] = body["messages"]
        assert message["role"] == "user" and [p["type"] for p in message["content"]] == ["image_url", "text"]
        url = message["content"][0]["image_url"]["url"]
        mime = "image/jpeg" if image.suffix == ".jpg" else "image/png"
        assert url.startswith(f"data:{mime};base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == image.read_bytes()  # the file's own bytes
        assert message["content"][1]["text"] == f"{rows[i]['question']} Answer:"
    assert {".jpg", ".png"} <= {Path(r["image"]).suffix for r in rows}  # both mime types were sent
    for rec in records:
        i = rec["id"] - FIRST_ID
        assert rec["error"] is None and rec["raw_output"] == ANSWERS[i][0] and rec["score"] == pytest.approx(ANSWERS[i][1])
        assert rec["input_tokens"] == 100 + i and rec["output_tokens"] == len(re.findall(r"\S+\s*", ANSWERS[i][0]))
        assert 0 < rec["ttft_s"] <= rec["e2e_time"] and "usage_reported" not in rec
        shown = json.loads(rec["prompt"])  # the messages, each image's data URL replaced by its name
        assert shown == [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(data.parent / rows[i]["image"])}},
            {"type": "text", "text": f"{rows[i]['question']} Answer:"}]}]  # fmt: skip
    csv_path = out / "results/openai/precision_test/textvqa" / MODEL / "textvqa_result.csv"
    summary = json.loads(csv_path.with_name("textvqa_result.json").read_text())
    assert summary["value"] == pytest.approx(EXPECTED) and summary["errors"] == 0  # scored as any backend
    assert summary["device"] is None and summary["dtype"] is None and summary["model"] == "tiny-endpoint"
    assert summary["endpoint"] == {"base_url": endpoint.url, "served_model": MODEL}
    assert "api_key" not in summary["config"]["model"]
    assert "note: block_size: 16 is ignored on the openai backend" in err
    assert _files_holding(out, KEY[-10:]) == [] and KEY[-10:] not in err


def test_the_key_comes_from_openai_api_key_or_the_model_config(endpoint, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-77")
    endpoint.reset(key="sk-from-env-77")  # the server refuses any other key
    (tmp_path / "a").mkdir()
    code, records, out = _run(tmp_path / "a", data, {"base_url": endpoint.url}, "--limit", "2")
    assert code == 0 and len(records) == 2 and set(endpoint.auth) == {"Bearer sk-from-env-77"}
    endpoint.reset(key="sk-from-yaml-88")
    (tmp_path / "b").mkdir()
    code, records, out2 = _run(tmp_path / "b", data, {"base_url": endpoint.url, "api_key": "sk-from-yaml-88"},
                               "--limit", "2")  # fmt: skip
    assert code == 0 and len(records) == 2 and set(endpoint.auth) == {"Bearer sk-from-yaml-88"}  # over the env's
    assert "api_key" not in json.loads(next(out2.rglob("run_config.json")).read_text())["model"]
    err = capsys.readouterr().err
    for secret in ("from-env-77", "from-yaml-88"):
        assert _files_holding(out, secret) == _files_holding(out2, secret) == [] and secret not in err


def test_concurrency_reaches_num_concurrent_and_never_more(endpoint, data, tmp_path):
    """Every request waits at the server until 3 are in flight: a client that never sends 3 at once
    fails (after GATE_S), one that sends 4 shows it in max_in_flight. No model config: the run is named
    after the endpoint's model."""
    endpoint.reset(gate=3)
    code, records, out = _run(tmp_path, data, None, "--backend", "openai", "--base_url", endpoint.url,
                              "--num_concurrent", "3")  # fmt: skip
    assert code == 0 and len(records) == N and endpoint.max_in_flight == 3
    assert all(r["error"] is None for r in records)
    summary = json.loads(next(out.rglob("textvqa_result.json")).read_text())
    assert summary["model"] == MODEL and summary["value"] == pytest.approx(EXPECTED)


# ---- failures -----------------------------------------------------------------------------------------


def test_transient_failures_are_retried_and_the_others_recorded(endpoint, data, tmp_path):
    endpoint.reset(script={
        0: {"fail": [(429, "rate limited", {"Retry-After": "1"})]},  # the client's own backoff would be <= 0.5 s
        1: {"fail": [(503, "warming up", {"Retry-After": "0.05"})] * 2},
        2: {"always": (500, "boom: out of memory", {})},
        3: {"always": (400, "prompt is 5000 tokens, more than max_model_len 4096", {})},
        4: {"usage": False},
    })  # fmt: skip
    code, records, _ = _run(tmp_path, data, {"base_url": endpoint.url, "max_retries": 2}, "--max_error_rate", "0.3")
    assert code == 0 and len(records) == N
    by = {r["id"] - FIRST_ID: r for r in records}
    assert len(endpoint.attempts[0]) == 2 and endpoint.attempts[0][1] - endpoint.attempts[0][0] >= 1.0
    assert len(endpoint.attempts[1]) == 3 and len(endpoint.attempts[2]) == 3 and len(endpoint.attempts[3]) == 1
    for i in (0, 1):
        assert by[i]["error"] is None and by[i]["raw_output"] == ANSWERS[i][0] and by[i]["score"] == pytest.approx(ANSWERS[i][1])
    assert by[0]["ttft_s"] < 0.9  # timed from the answered attempt, not from the first one
    assert "HTTP 500" in by[2]["error"] and "after 3 attempts: boom: out of memory" in by[2]["error"]
    assert by[3]["error"].startswith(f"HTTP 400 from {endpoint.url}/chat/completions: prompt is 5000 tokens")
    assert by[2]["score"] == by[3]["score"] == 0 and by[2]["prediction"] == ""
    assert by[4]["input_tokens"] is None and by[4]["output_tokens"] is None and by[4]["usage_reported"] is False
    assert by[4]["error"] is None and by[4]["score"] == pytest.approx(ANSWERS[4][1])  # answered and scored, counts not guessed
    summary = json.loads(next((tmp_path / "out").rglob("textvqa_result.json")).read_text())
    assert summary["errors"] == 2 and summary["total"] == N


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _interrupt(backend) -> None:
    """Ctrl-C as it lands while the backend's event loop waits for answers (not inside a request's task):
    from the server's thread, a KeyboardInterrupt raised in the loop."""
    backend._loop.call_soon_threadsafe(_ctrl_c)


def test_an_interrupted_run_resumes_with_only_the_rest(endpoint, data, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the 4th request is answered: the backend is closed; the rerun asks only for what
    samples.jsonl lacks, also with another --num_concurrent; another base_url is refused."""
    from modeltest.backends.openai import OpenAIBackend

    made, closed = [], []
    real_init, real_close = OpenAIBackend.__init__, OpenAIBackend.close
    monkeypatch.setattr(OpenAIBackend, "__init__", lambda self, cfg: made.append(self) or real_init(self, cfg))
    monkeypatch.setattr(OpenAIBackend, "close", lambda self: closed.append(self) or real_close(self))
    endpoint.reset(on_request=lambda n: n == 4 and _interrupt(made[0]))
    model = {"base_url": endpoint.url, "num_concurrent": 1}
    code, first, _ = _run(tmp_path, data, model)
    assert code == 130 and len(first) == 3 and closed == made and made[0]._loop.is_closed()
    endpoint.reset()
    code, records, _ = _run(tmp_path, data, model, "--num_concurrent", "2")
    assert code == 0 and len(records) == N
    assert sorted(endpoint.tags()) == sorted({r["id"] - FIRST_ID for r in records} - {r["id"] - FIRST_ID for r in first})
    capsys.readouterr()
    other = {**model, "base_url": endpoint.url.replace("127.0.0.1", "localhost")}
    code, _, _ = _run(tmp_path, data, other)
    err = capsys.readouterr().err
    assert code == 2 and "different configuration" in err and "endpoint.base_url" in err


def test_a_stopped_window_leaves_nothing_in_flight(endpoint, data):
    """Saving a result fails (disk full, Ctrl-C inside the runner's write): generate raises it with the
    other requests cancelled. Ctrl-C while the loop waits leaves them pending: close() cancels them and
    closes the connections and the loop."""
    from modeltest.backends.base import Request
    from modeltest.backends.openai import OpenAIBackend
    from modeltest.config import ModelConfig

    rows = _rows(data)
    requests = [Request(i, [{"image": str(data.parent / r["image"])}, {"text": r["question"]}], 10)
                for i, r in enumerate(rows)]  # fmt: skip
    backend = OpenAIBackend(ModelConfig(model_name="m", backend="openai", base_url=endpoint.url, num_concurrent=2))

    def save(i, gen):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        backend.generate(requests, on_result=save)
    assert _request_tasks(backend) == set() and len(endpoint.requests) <= 3
    endpoint.reset(on_request=lambda n: n == 2 and _interrupt(backend))
    with pytest.raises(KeyboardInterrupt):
        backend.generate(requests)
    pending = _request_tasks(backend)
    assert pending  # the other request in flight, and those waiting for a slot
    backend.close()
    assert backend._loop.is_closed() and all(t.done() for t in pending)
    backend.close()  # twice is harmless
    assert len(endpoint.requests) <= 3


def _request_tasks(backend) -> set:
    """The backend's request tasks not finished (not the loop's own, such as async generators' clean-ups)."""
    from modeltest.backends.openai import TASK_NAME

    return {t for t in asyncio.all_tasks(backend._loop) if t.get_name().startswith(TASK_NAME)}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable", "wrong key", "two models", "unknown model"])
def test_check_only_refuses_an_endpoint_it_cannot_use(endpoint, data, tmp_path, capsys, case):
    url, flags = endpoint.url, ["--check_only"]
    if case == "unreachable":
        url, flags = f"http://127.0.0.1:{_closed_port()}/v1", [*flags, "--max_retries", "0"]
        said = [f"cannot reach the endpoint at {url}", "--base_url"]
    elif case == "wrong key":
        endpoint.reset(key="sk-right-1")
        flags += ["--api_key", "sk-wrong-2"]
        said = [f"{url}/models refused the API key (HTTP 401", "--api_key or OPENAI_API_KEY"]
    elif case == "two models":
        endpoint.reset(models=("a", "b"))
        said = ["lists 2 models ('a', 'b')", "--served_model"]
    else:
        flags += ["--served_model", "other"]
        said = [f"{url} does not serve model 'other'; it serves '{MODEL}'"]
    code, _, out = _run(tmp_path, data, {"base_url": url}, *flags)
    err = capsys.readouterr().err
    assert code == 2 and len(_errors(err)) == 1 and "Traceback" not in err and not out.exists()
    assert all(s in err for s in said), err
    assert "sk-wrong-2" not in err  # the server echoed it; the message masks it


def test_a_wrong_key_stops_the_run_before_any_work(endpoint, data, tmp_path, capsys):
    endpoint.reset(key="sk-right-1")
    code, records, out = _run(tmp_path, data, {"base_url": endpoint.url, "api_key": "sk-wrong-2"})
    err = capsys.readouterr().err
    assert code == 2 and "refused the API key" in err and endpoint.requests == [] and not out.exists()
    endpoint.reset()
    code, _, out = _run(tmp_path, data, {"base_url": endpoint.url}, "--check_only")
    assert code == 0 and "check passed" in capsys.readouterr().err and not out.exists()


def test_torchrun_is_refused_before_the_endpoint_is_asked(data, tmp_path, capsys, monkeypatch):
    """Two processes would evaluate the same endpoint twice: one line, before GET /models (port 9 answers
    nothing, so reaching it would say so instead)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    code, _, _ = _run(tmp_path, data, None, "--backend", "openai", "--base_url", "http://127.0.0.1:9/v1")
    err = _errors(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "run the harness as one process, without torchrun" in err[0]


def test_device_and_batch_size_are_named_as_doing_nothing(endpoint, data, tmp_path, capsys):
    code, records, _ = _run(tmp_path, data, {"base_url": endpoint.url}, "--api_key", KEY, "--device", "cpu",
                            "--batch_size", "4")  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modeltest: note: --")]
    assert code == 0 and len(records) == N
    assert [n.split()[2] for n in notes] == ["--device", "--batch_size"]


def test_a_missing_base_url_is_one_line(data, tmp_path, capsys):
    code, _, _ = _run(tmp_path, data, None, "--backend", "openai")
    err = capsys.readouterr().err
    assert code == 2 and len(_errors(err)) == 1 and "--base_url" in err and "Traceback" not in err


# ---- pieces -------------------------------------------------------------------------------------------


def test_images_go_as_their_bytes_or_as_png(photo_dir, tmp_path):
    from PIL import Image

    from modeltest.backends.base import ImageBytes, SampleError
    from modeltest.backends.openai import data_url

    def decoded(url: str) -> tuple[str, bytes]:
        head, b64 = url.split(",", 1)
        return head, base64.b64decode(b64)

    jpeg = next(p for p in sorted(photo_dir.iterdir()) if p.suffix == ".jpg")
    assert decoded(data_url(ImageBytes(jpeg.read_bytes(), "x.png"))) == ("data:image/jpeg;base64", jpeg.read_bytes())
    assert decoded(data_url({"bytes": jpeg.read_bytes(), "path": None}))[1] == jpeg.read_bytes()
    pixels = Image.open(jpeg).convert("RGB").resize((32, 24))
    bmp = tmp_path / "x.bmp"
    pixels.save(bmp)
    for image in (pixels, str(bmp)):  # PIL images and formats the API does not take: PNG of the same pixels
        head, raw = decoded(data_url(image))
        assert head == "data:image/png;base64" and Image.open(io.BytesIO(raw)).tobytes() == pixels.tobytes()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(SampleError, match="image unreadable: .*bad.jpg"):
        data_url(str(tmp_path / "bad.jpg"))
    with pytest.raises(SampleError, match="image not found: .*gone.jpg"):
        data_url(str(tmp_path / "gone.jpg"))


def test_endpoint_keys_and_engine_keys_are_named_where_they_do_nothing():
    from modeltest.config import ModelConfig, TaskConfig, notices
    from modeltest.output import endpoint_paths

    task = TaskConfig(task_name="textvqa")
    assert notices(ModelConfig(model_name="m", backend="openai", base_url="http://h/v1"), task, "openai") == []
    engine_keys = ModelConfig(model_name="m", model_path="/ckpt", data_type="fp16", block_size=32, use_chat_template=True)
    said = "\n".join(notices(engine_keys, TaskConfig(task_name="textvqa", need_truncate_input=True), "openai"))
    for key in ("model_path: '/ckpt'", "data_type: 'fp16'", "block_size: 32", "use_chat_template: True"):
        assert f"{key} is ignored on the openai backend" in said
    assert "need_truncate_input do not apply on the openai backend" in said
    on_engine = "\n".join(notices(ModelConfig(model_name="m", api_key="sk-abc-123", num_concurrent=4), task, "engine"))
    assert "api_key: '***' is ignored on the engine backend" in on_engine and "sk-abc-123" not in on_engine
    assert "num_concurrent: 4 is ignored on the engine backend" in on_engine
    paths = endpoint_paths("o", "precision", "textvqa", "/models/Qwen-VL")  # vLLM names a model by its path
    assert paths.result_csv == Path("o/results/openai/precision_test/textvqa/models_Qwen-VL/textvqa_result.csv")


# ---- end to end: python -m engine.serve -------------------------------------------------------------------

SERVE = Path(__file__).resolve().parent.parent / "engine" / "serve" / "__main__.py"


@pytest.mark.skipif(not SERVE.exists(), reason="engine.serve is not there yet")
def test_predictions_through_engine_serve_equal_the_engine_backends(qwen_vl_ckpt, photo_dir, tmp_path):
    textvqa = make_textvqa(tmp_path / "data", photo_dir, n=4)
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", str(qwen_vl_ckpt), "--port", "0", "--device", "cpu",
                             "--dtype", "float32", "--chat-template", "raw"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = _listening(proc, timeout_s=180)
        runs = {}
        for backend, model in (("engine", {"backend": "engine", "model_path": str(qwen_vl_ckpt), "data_type": "fp32",
                                           "block_size": 16}),
                               ("openai", {"base_url": f"{url}/v1"})):  # fmt: skip
            (tmp_path / backend).mkdir()
            code, records, _ = _run(tmp_path / backend, textvqa, model, "--device", "cpu")
            assert code == 0 and len(records) == 4 and all(r["error"] is None for r in records)
            runs[backend] = {r["id"]: (r["raw_output"], r["prediction"], r["score"], r["input_tokens"], r["output_tokens"])
                             for r in records}  # fmt: skip
        assert runs["openai"] == runs["engine"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _listening(proc: subprocess.Popen, timeout_s: float) -> str:
    """The URL from the server's `engine.serve: listening on http://HOST:PORT` line (stderr), waited for at
    most timeout_s; the rest of stderr keeps draining so the server never blocks on a full pipe."""
    found: dict = {}
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"engine\.serve: listening on (http://\S+)", line)
            if m and not ready.is_set():
                found["url"] = m.group(1).rstrip("/")
                ready.set()
        ready.set()  # the server exited

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout_s)
    if "url" not in found:
        raise AssertionError("engine.serve did not start: " + "".join(lines[-20:]))
    return found["url"]
