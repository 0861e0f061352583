"""Protects benchmarks/serve.py's measuring code against a fake OpenAI streaming server with known
delays and chunks: TTFT counts from the first chunk carrying content (not the role chunk), ITL is every
gap between content chunks, TPOT divides by the usage's output tokens minus one; the percentile and
throughput arithmetic; failed requests (HTTP errors, error events, cut streams, timeouts, the deadline)
counted, never raised; seeded Poisson arrivals; and the whole command against the fake server (the
TextVQA-shaped request it sends, ignore_eos dropped when refused, the JSON written; a refused warm-up
is one line and exit 1). Bounded: every request has a timeout of 5 s at most, a hanging one 0.5 s; the
module runs in a few seconds."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import math
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "serve.py")
bench = sys.modules["bench_serve"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(bench)

EPS = 0.005  # timer granularity: a sleep never ends earlier than this before its time
SLACK = 0.4  # a loaded 2-core host may run a sleep this much late


class FakeServer:
    """An OpenAI-shaped streaming chat server on 127.0.0.1 in a thread of its own. What a request gets
    is picked by its last text part: "ok" (the default), "http500", "error-event", "no-done" (a
    clean end without data: [DONE]), "drop" (the connection closed mid-stream), "hang"."""

    def __init__(self):
        self.ttft, self.gap, self.chunks, self.tokens_per_chunk = 0.2, 0.05, 5, 2
        self.reject_ignore_eos = False
        self.refuse: int | None = None  # answer every chat request with this HTTP status
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        start = asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        async def shutdown():
            self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(
                next(
                    (h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")), 0
                )
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            if head.startswith("GET /v1/models"):
                await self.respond(
                    writer, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
                )
            elif self.refuse:
                await self.respond(
                    writer, self.refuse, {"error": {"message": "Incorrect or missing API key"}}
                )
            elif self.reject_ignore_eos and "ignore_eos" in body:
                await self.respond(writer, 400, {"error": {"message": "unknown field ignore_eos"}})
            else:
                self.bodies.append(body)
                await self.stream(writer, body["messages"][-1]["content"][-1]["text"])
        finally:
            writer.close()

    async def respond(self, writer, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def stream(self, writer, what: str) -> None:
        if what == "http500":
            return await self.respond(writer, 500, {"error": {"message": "boom"}})

        async def event(payload) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        def chunk(delta: dict, finish=None) -> dict:
            return {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n"
        )
        await event(chunk({"role": "assistant", "content": ""}))  # at once: not the first token
        if what == "hang":
            await asyncio.sleep(30)
        await asyncio.sleep(self.ttft)
        for i in range(self.chunks):
            if i:
                await asyncio.sleep(self.gap)
            await event(chunk({"content": f"w{i} "}))
            if what == "drop" and i == 1:
                return  # closed without the last chunk of the body
        if what == "error-event":
            await event({"error": {"message": "the engine failed", "type": "internal_error"}})
            return
        await event(chunk({}, "length"))
        await event(
            {
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 300, "completion_tokens": self.chunks * self.tokens_per_chunk},
            }
        )
        if what != "no-done":
            await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def body(what: str) -> bytes:
    return json.dumps(
        {
            "model": "fake-model",
            "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": what}]}],
        }
    ).encode()


def run(url: str, whats: list[str], **kwargs):
    return asyncio.run(bench.run_setting(url + "/v1/chat/completions", [body(w) for w in whats], **kwargs))


def test_ttft_itl_tpot_from_the_stream(server):
    results, duration = run(server.url, ["ok", "ok"], concurrency=2, timeout=5)
    assert duration < server.ttft + 4 * server.gap + SLACK  # both at once, not one after the other
    for r in results:
        assert r.success, r.error
        assert r.text == "w0 w1 w2 w3 w4 " and r.prompt_tokens == 300
        assert len(r.chunk_times) == 5 and r.output_tokens == 10  # the usage's count, not the chunks'
        assert (
            server.ttft - EPS <= r.ttft <= server.ttft + SLACK
        )  # the role chunk at t=0 is not the first token
        assert len(r.itl) == 4 and all(server.gap - EPS <= g <= server.gap + SLACK for g in r.itl)
        assert r.itl == [b - a for a, b in pairwise(r.chunk_times)]
        assert r.e2e >= r.chunk_times[-1] - r.start >= server.ttft + 4 * server.gap - EPS
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 9)


def make_result(
    ttft: float, gaps: list[float], tail: float, tokens: int, prompt: int = 100
) -> bench.RequestResult:
    times = [10.0 + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return bench.RequestResult(
        success=True,
        start=10.0,
        chunk_times=times,
        end=times[-1] + tail,
        prompt_tokens=prompt,
        output_tokens=tokens,
    )


def test_percentile_and_throughput_arithmetic():
    results = [
        make_result(0.1, [0.02, 0.04], 0.0, 3),  # e2e 0.16, tpot 0.03
        make_result(0.2, [0.01], 0.01, 2),  # e2e 0.22, tpot 0.02
        make_result(0.3, [], 0.0, 1),  # one token: no tpot
        make_result(0.4, [0.05, 0.05, 0.05], 0.0, 7),  # e2e 0.55, tpot 0.025
        make_result(1.0, [0.1], 0.0, 2),  # e2e 1.1, tpot 0.1
        bench.RequestResult(error="HTTP 500: boom", start=10.0, end=10.5),
    ]
    m = bench.summarize(results, duration=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (5, 1, ["HTTP 500: boom"])
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (500, 15)
    assert m["request_throughput"] == pytest.approx(2.5) and m["output_throughput"] == pytest.approx(7.5)
    # TTFT 100, 200, 300, 400, 1000 ms; linear percentiles: p90 at rank 3.6 = 400 + 0.6 * 600
    assert m["ttft_ms"] == pytest.approx({"mean": 400, "p50": 300, "p90": 760, "p99": 976})
    # TPOT 20, 25, 30, 100 ms (the one-token request has none): p50 at rank 1.5, p90 at 2.7 = 30 + 0.7 * 70
    assert m["tpot_ms"] == pytest.approx({"mean": 43.75, "p50": 27.5, "p90": 79, "p99": 97.9})
    # ITL pooled: 10, 20, 40, 50, 50, 50, 100 ms
    assert m["itl_ms"] == pytest.approx({"mean": 320 / 7, "p50": 50, "p90": 70, "p99": 97})
    assert m["e2e_ms"]["mean"] == pytest.approx((160 + 220 + 300 + 550 + 1100) / 5)
    assert bench.summarize([results[-1]], 1.0)["ttft_ms"] == {
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
    }


def test_failures_are_counted_not_raised(server):
    server.ttft, server.gap = 0.05, 0.01
    whats = ["ok", "http500", "error-event", "no-done", "drop", "hang"]
    start = time.perf_counter()
    results, _ = run(server.url, whats, concurrency=6, timeout=0.5)
    assert time.perf_counter() - start < 0.5 + SLACK + 1  # the hanging request is cut at its timeout
    errors = dict(zip(whats, (r.error for r in results), strict=True))
    assert results[0].success and errors["ok"] == ""
    assert errors["http500"].startswith("HTTP 500: ") and "boom" in errors["http500"]
    assert errors["error-event"] == "error event: the engine failed"
    assert errors["no-done"] == "the stream ended without data: [DONE]"
    assert errors["drop"].startswith("RemoteProtocolError")
    assert errors["hang"] == "timed out after 0.5 s"
    assert not any(r.success for r in results[1:])
    m = bench.summarize(results, 1.0)
    assert (m["completed"], m["failed"], len(m["errors"])) == (1, 5, 5)


def test_the_deadline_bounds_the_run(server):
    start = time.perf_counter()
    results, _ = run(server.url, ["hang"] * 3, concurrency=1, timeout=5, deadline=start + 0.3)
    assert time.perf_counter() - start < 0.3 + SLACK + 1
    assert results[0].error.startswith("timed out after 0.") and results[0].error.endswith("(the --deadline)")
    assert [r.error for r in results[1:]] == ["not sent: the --deadline had passed"] * 2


def test_poisson_arrivals_are_seeded_and_respected(server):
    a = bench.arrival_offsets(4000, 20.0, seed=3)
    assert a == bench.arrival_offsets(4000, 20.0, seed=3) != bench.arrival_offsets(4000, 20.0, seed=4)
    assert a[0] == 0 and all(y > x for x, y in pairwise(a))
    assert a[-1] / 3999 == pytest.approx(1 / 20, rel=0.05)  # mean gap 1/rate
    assert bench.arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    server.ttft, server.gap = 0.01, 0.0
    results, _ = run(server.url, ["ok"] * 4, rate=20.0, seed=1, timeout=5)
    offsets = bench.arrival_offsets(4, 20.0, seed=1)
    sent = [r.start - results[0].start for r in results]
    assert all(r.success for r in results)
    assert all(o - EPS <= s <= o + SLACK for s, o in zip(sent[1:], offsets[1:], strict=True))


def test_the_command_against_a_fake_server(server, tmp_path, capsys):
    server.ttft, server.gap, server.reject_ignore_eos = 0.02, 0.01, True
    out = tmp_path / "serve.json"
    argv = "--max-concurrency 1,2 --num-prompts 3 --max-tokens 4 --ignore-eos --disable-tqdm".split()
    code = bench.main(["--base-url", server.url + "/v1", "--output-json", str(out), *argv])
    printed = capsys.readouterr().out
    assert code == 0
    assert "note: the server refused ignore_eos" in printed and "concurrency 2" in printed
    report = json.loads(out.read_text())
    assert [s["setting"] for s in report["settings"]] == ["concurrency 1", "concurrency 2"]
    for s in report["settings"]:
        assert (s["metrics"]["completed"], s["metrics"]["failed"]) == (3, 0)
        assert s["metrics"]["output_throughput"] > 0 and len(s["requests"]) == 3
    assert report["model"] == "fake-model" and "overhead" not in report  # no offline run against --base-url
    sent = server.bodies[2:]  # after the two warm-up requests
    assert len(sent) == 6
    images = set()
    for b in sent:
        assert (b["model"], b["max_tokens"], b["temperature"], b["stream"]) == ("fake-model", 4, 0, True)
        assert b["stream_options"] == {"include_usage": True} and "ignore_eos" not in b
        image, question = b["messages"][0]["content"]
        assert question["type"] == "text" and question["text"].endswith("?")
        head, data = image["image_url"]["url"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == bench.IMAGE_SIZE
        images.add(data)
    assert len(images) == 6  # a picture of its own each (there are 5 base photos), across settings too


@pytest.mark.parametrize(
    "argv, what",
    [
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--request-rate", "fast"], "--request-rate"),
        (["--base-url", "localhost:8000"], "--base-url"),
        (["--base-url", "http://127.0.0.1:1", "--threads", "1"], "--threads"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(argv, what, capsys):
    with pytest.raises(SystemExit) as done:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and err[-1].startswith("benchmarks/serve.py: error: ") and what in err[-1]


def test_a_server_refusing_the_warm_up_is_one_line_and_exit_1(server, capsys):
    server.refuse = 401
    code = bench.main(["--base-url", server.url, "--num-prompts", "1", "--disable-tqdm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("benchmarks/serve.py: error: the warm-up request to ") and "HTTP 401" in err[0]
    assert "OPENAI_API_KEY" in err[0]


def test_overhead_takes_the_fastest_round_of_each_side(capsys):
    def served(texts, prompts, throughput, cpu_s):
        requests = [
            {"success": t is not None, "text": t, "prompt_tokens": p}
            for t, p in zip(texts, prompts, strict=True)
        ]
        metrics = {
            "output_throughput": throughput,
            "total_output_tokens": 300,
            "request_throughput": 1.0,
            "duration_s": 1.0,
            "failed": int(None in texts),
        }
        return {"metrics": metrics, "requests": requests, "server_cpu_s": cpu_s}

    def offline(throughput, cpu_s, prompts=(10, 11, 12)):
        return {
            "texts": ["a", "b", "c"],
            "prompt_tokens": list(prompts),
            "output_throughput": throughput,
            "total_output_tokens": 300,
            "cpu_s": cpu_s,
            "request_throughput": 1.0,
            "duration_s": 1.0,
            "failed": 0,
            "server_cpu_s": 0.0,
        }

    args = bench.parse_args(["--max-concurrency", "1,8"])
    # fastest server round 91 tok/s against the fastest offline round 100 tok/s; per CPU second the best
    # of each side: 300 / 3.0 s against 300 / 2.5 s
    rounds = [
        served(["a", "b", "c"], [10, 11, 12], 70.0, 4.0),
        served(["a", "x", None], [10, 11, 12], 91.0, 3.0),
    ]
    got = bench.print_overhead(args, 8, rounds, [offline(80.0, 2.5), offline(100.0, 3.0)])
    assert got["ratio"] == pytest.approx(0.91) and got["verdict"] == "PASS"
    assert got["cpu_ratio"] == pytest.approx(2.5 / 3.0)
    assert got["same_prompt_tokens"] and (got["identical_answers"], got["compared"]) == (4, 6)
    out = capsys.readouterr().out
    assert "91.0%   target >= 90%: PASS" in out and "failed: server 1, offline 0" in out
    got = bench.print_overhead(args, 8, rounds, [offline(80.0, 2.5, (10, 11, 13)), offline(101.2, 3.0)])
    assert got["verdict"] == "FAIL" and not got["same_prompt_tokens"]
