"""Serving benchmark of the OpenAI-compatible server, like `vllm bench serve`.

A request-rate or concurrency sweep against `python -m engine.serve` (or any server at --base-url) with
TextVQA-shaped requests, streamed, and, when this script starts the server itself, the server's
overhead against the offline engine (`engine.LLM.generate`) on the same requests in the same run.

    python benchmarks/serve.py [--base-url URL | --model PATH]
        [--request-rate R,R2,... | --max-concurrency C,C2,...] [--num-prompts 32] [--max-tokens 32]
        [--ignore-eos] [--seed 0] [--timeout 120] [--deadline 1800] [--rounds 3]
        [--max-num-seqs N] [--max-model-len N] [--chat-template chatml|raw] [--device D] [--dtype T]
        [--threads N] [--served-model-name NAME] [--output-json FILE] [--disable-tqdm]

Server: --base-url uses a running server (OPENAI_API_KEY, if set, is sent as the bearer token);
otherwise this script starts `python -m engine.serve PATH --host 127.0.0.1 --port 0` as a child process
on --model PATH, or, without --model, on a tiny random Qwen-VL (engine.tiny_config: hidden 128, 2
layers, vision width 64, the real 151,936-token vocabulary, fp32) written to a temporary folder, and
stops it and removes the folder at the end. --threads N sets torch's CPU threads for both the child
server (OMP_NUM_THREADS) and the offline engine; the default on a CPU device is 1, since on a shared
2-core host two OpenMP threads per process stall on each other (the same generate took 1 s with one
thread and 3-20 s with two, as other jobs came and went); --threads 0 leaves torch's own default.

Requests: each one a real photo (scikit-image's sample photos if installed, else matplotlib's) made
distinct by a seeded crop, flip and colour shift, 640x480 JPEG, sent as a `data:image/jpeg;base64`
URL, and a TextVQA-style question, as one user message; temperature 0, `max_tokens`, `stream: true`
with `stream_options: {"include_usage": true}`; --ignore-eos adds vLLM's `ignore_eos: true` (fixed
output length) when the server accepts it (a server that answers the warm-up's ignore_eos with HTTP
400 gets requests without it, and a note says so). Every setting of the sweep gets requests of its own
(other pictures), so no setting finds another's images in the server's vision or prefix cache; two
warm-up requests run first and are not counted. Arrivals: --request-rate R sends at Poisson times
(exponential gaps of mean 1/R, seeded by --seed; `inf`: all at once); --max-concurrency C keeps at most
C requests in flight (all available at t=0). Default: --max-concurrency 1,4,16.

Measured per request (vLLM's definitions): TTFT = first chunk carrying content - send; ITL = every gap
between successive content chunks; TPOT = (E2E - TTFT) / (output tokens - 1), output tokens from the
final usage chunk (else the content chunks counted); E2E = end of the stream (`data: [DONE]`) - send.
Per setting: request throughput = completed requests / duration and output tokens/s = their output
tokens / duration (duration: first send to the last request's end); mean, p50, p90, p99 (numpy's
linear percentiles) of TTFT, TPOT (per request), ITL (all gaps pooled) and E2E; failures (HTTP errors,
error events, streams cut short, timeouts: recorded with their message, never a crash); and the CPU
seconds the server (when started here) and this client spent, since on a 2-core host they compete.

Overhead (when the server is started here): the saturation setting (the largest concurrency, or the
highest rate) runs --rounds times, each on fresh pictures and each right after `LLM.generate` of the
same requests in this process (the prompts rendered the way the server renders them, the same JPEG
files, max_tokens, ignore_eos, max_num_seqs, max_model_len, dtype, threads) on a fresh engine (cold
caches, as the server's are for those pictures); the idle server's CPU time meanwhile is reported.
Figures: the fastest server round's output tokens/s / the fastest offline round's (other jobs on the
host only ever slow a run down; the table shows the fastest round too); the same per CPU second (the
server process's against this process's during generate), which such jobs disturb far less; and
whether prompts (token counts) and greedy answers agree. Target: the server reaches >= 90% of offline
throughput at saturation on a 2-core CPU.

Bounded: every request has --timeout seconds; nothing is sent after --deadline seconds from the start
(requests left over count as failed, running ones are cut at the deadline); the server gets at most
300 s to start. --output-json FILE gets the figures and every request's timings, rewritten after each
setting. Exit codes: 0 done (failures are in the figures), 1 the server failed to start or answer the
warm-up, 2 bad usage (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import ASKS, PLACES, THINGS  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
IMAGE_SIZE = (640, 480)
WARMUP_REQUESTS = 2
SERVER_START_S = 300.0
LISTENING = re.compile(r"engine\.serve: listening on (http://\S+)")
TARGET = 0.9
SERVER_FLAGS = ("max_num_seqs", "max_model_len", "chat_template", "device", "dtype", "threads", "rounds")
AUTH_HINT = " (set OPENAI_API_KEY to the server's API key)"


class BenchError(Exception):
    """A condition the user has to fix or look at (bad flags, a server that does not start); main()
    prints it as one line."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---- workload ---------------------------------------------------------------------------------


@dataclass
class BenchRequest:
    image: str  # the JPEG file: the offline engine reads it
    question: str
    data_url: str  # the same file's bytes, for the server


def base_photos():
    """Real photos as RGB PIL images: scikit-image's sample photos when it is installed, else the ones
    matplotlib (a dependency) ships."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data
    except ImportError:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
        return [Image.open(folder / name).convert("RGB") for name in MATPLOTLIB_PHOTOS]
    photos = []
    for name in SKIMAGE_PHOTOS:
        a = getattr(data, name)()
        photos.append(Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a).convert("RGB"))
    return photos


def make_requests(folder: Path, count: int, seed: int) -> list[BenchRequest]:
    """`count` requests, each a distinct picture (a seeded crop, flip and colour shift of a base photo)
    saved as a JPEG and a question about it. Distinct pixels keep the engine's vision-feature and
    prefix caches from serving one request with another's work."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    bases = base_photos()
    requests = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        img = bases[i % len(bases)]
        w, h = img.size
        side = rng.uniform(0.6, 1.0)
        cw, ch = int(w * side), int(h * side)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch)).resize(IMAGE_SIZE, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(img).astype(np.float32) * np.array([rng.uniform(0.8, 1.2) for _ in range(3)])
        path = folder / f"photo_{seed}_{i:05d}.jpg"
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        question = f"{rng.choice(ASKS).capitalize()} {rng.choice(THINGS)} {rng.choice(PLACES)}?"
        url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        requests.append(BenchRequest(str(path), question, url))
    return requests


def chat_body(req: BenchRequest, model: str, max_tokens: int, ignore_eos: bool) -> bytes:
    """The request body, encoded once before the clock starts (a ~60 KB data URL each)."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": req.data_url}},
                    {"type": "text", "text": req.question},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate` requests/s: exponential gaps
    of mean 1/rate, seeded; rate inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- one request, timed -----------------------------------------------------------------------


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter() when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying content
    end: float = 0.0  # the stream's end (data: [DONE]), or the failure
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # usage.completion_tokens, else the content chunks counted
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in pairwise(self.chunk_times)]

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; undefined for a one-token answer."""
        if not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def stream_chat(client, url: str, body: bytes, headers: dict, result: RequestResult) -> None:
    """POST one streaming chat completion and fill `result` as the server-sent events arrive (so a
    request cut by its timeout keeps what it had)."""
    clock = time.perf_counter
    completion_tokens, done, parts = None, False, []
    result.start = clock()
    async with client.stream("POST", url, content=body, headers=headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            result.error = f"HTTP {resp.status_code}: {' '.join(text.split())[:300]}"
            result.end = clock()
            return
        async for line in resp.aiter_lines():
            now = clock()
            if not line.startswith("data:"):
                continue  # the blank line between events, comments, event: fields
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("error"):
                err = event["error"]
                result.error = f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
                result.end = clock()
                return
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    result.chunk_times.append(now)
                    parts.append(content)
            if event.get("usage"):
                result.prompt_tokens = event["usage"].get("prompt_tokens")
                completion_tokens = event["usage"].get("completion_tokens")
    result.end = clock()
    result.text = "".join(parts)
    result.output_tokens = completion_tokens if completion_tokens is not None else len(result.chunk_times)
    if not done:
        result.error = "the stream ended without data: [DONE]"
    elif not result.chunk_times:
        result.error = "the stream carried no content: no first token to time"
    else:
        result.success = True


async def timed_request(
    client, url: str, body: bytes, headers: dict, timeout: float, deadline: float
) -> RequestResult:
    """One request bounded by `timeout` seconds and the run's `deadline` (a perf_counter() time); any
    failure is recorded in the result, never raised."""
    result = RequestResult()
    limit = min(timeout, deadline - time.perf_counter())
    if limit <= 0:
        result.error = "not sent: the --deadline had passed"
        result.start = result.end = time.perf_counter()
        return result
    try:
        await asyncio.wait_for(stream_chat(client, url, body, headers, result), limit)
    except asyncio.TimeoutError:
        result.error = f"timed out after {limit:.1f} s" + (" (the --deadline)" if limit < timeout else "")
    except Exception as e:  # a failed request is a figure of the benchmark, not a crash
        result.error = f"{type(e).__name__}: {e}"[:300]
    if not result.success:
        result.start = result.start or time.perf_counter()
        result.end = time.perf_counter()
    return result


async def run_setting(
    url: str,
    bodies: list[bytes],
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    seed: int = 0,
    timeout: float = 120.0,
    deadline: float = math.inf,
    headers: dict | None = None,
    progress: bool = False,
) -> tuple[list[RequestResult], float]:
    """Send `bodies` to `url` at Poisson times of `rate` (or all at t=0), at most `concurrency` in
    flight; (results in request order, duration from the start to the last request's end)."""
    import httpx
    from tqdm import tqdm

    headers = {"Content-Type": "application/json", **(headers or {})}
    offsets = arrival_offsets(len(bodies), rate if rate is not None else math.inf, seed)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(bodies), unit="req", leave=False, disable=not progress)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def one(body: bytes) -> RequestResult:
            if gate is None:
                result = await timed_request(client, url, body, headers, timeout, deadline)
            else:
                async with gate:
                    result = await timed_request(client, url, body, headers, timeout, deadline)
            bar.update()
            return result

        start = time.perf_counter()
        tasks = []
        for offset, body in zip(offsets, bodies, strict=True):
            wait = min(start + offset, deadline) - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)  # the arrival process itself
            tasks.append(asyncio.create_task(one(body)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


# ---- figures ----------------------------------------------------------------------------------


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in milliseconds (numpy's linear percentiles, as vLLM reports them); None
    for each when there are no values."""
    import numpy as np

    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok]),
        "tpot_ms": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.success}),
    }


def request_record(r: RequestResult) -> dict:
    return {
        "success": r.success,
        "error": r.error,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "ttft_s": r.ttft if r.chunk_times else None,
        "tpot_s": r.tpot if r.chunk_times else None,
        "e2e_s": r.e2e,
        "itl_s": r.itl,
        "text": r.text,
    }


# ---- the server under test ---------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ServerProcess:
    """`python -m engine.serve` as a child process on 127.0.0.1 and a free port; its stderr is drained
    by a thread (a full pipe would block the server), the last lines kept for error messages."""

    def __init__(self, model: Path, args: argparse.Namespace, device: str, dtype: str):
        cmd = [
            sys.executable,
            "-m",
            "engine.serve",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            device,
            "--dtype",
            dtype,
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--disable-uvicorn-access-log",  # a log line per request is not serving work
        ]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
        if args.chat_template:
            cmd += ["--chat-template", args.chat_template]
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.cmd = cmd
        self.tail: deque[str] = deque(maxlen=20)
        self.url: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.tail.append(line.rstrip())
            m = LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process is gone: stop waiting

    def wait_listening(self, seconds: float) -> str:
        if not self._ready.wait(seconds) or self.url is None:
            why = (
                f"exited with code {self.proc.poll()}"
                if self.proc.poll() is not None
                else f"not listening after {seconds:.0f} s"
            )
            raise BenchError(
                f"the server ({' '.join(self.cmd)}) {why}; its last lines:\n  " + "\n  ".join(self.tail)
            )
        return self.url

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def served_model(base: str, headers: dict) -> str:
    """The first model GET /v1/models lists."""
    import httpx

    try:
        resp = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise BenchError(f"GET {base}/v1/models: {type(e).__name__}: {e}; is the server up?") from None
    if resp.status_code != 200:
        body = " ".join(resp.text.split())[:200]
        hint = AUTH_HINT * (resp.status_code == 401)
        raise BenchError(f"GET {base}/v1/models: HTTP {resp.status_code}: {body}{hint}")
    try:
        return resp.json()["data"][0]["id"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise BenchError(f"GET {base}/v1/models lists no model id; pass --served-model-name") from None


# ---- offline reference ------------------------------------------------------------------------


def offline_prompt(req: BenchRequest, template: str):
    """The request as the engine takes it offline, rendered as engine.serve renders the chat message:
    chatml as the engine's chat form (Qwen-VL-Chat's make_context, the image as "Picture 1: <img>..."),
    raw as the bare `<img>...</img>question` query. The span's label differs (the file's path here, a
    placeholder there) but not its length or pixels; token counts are checked against the server's
    usage."""
    if template == "raw":
        return f"<img>{req.image}</img>{req.question}"
    return [{"role": "user", "content": [{"image": req.image}, {"text": req.question}]}]


def run_offline(
    model: Path, args, device: str, dtype: str, warmup: list[BenchRequest], requests: list[BenchRequest]
) -> dict:
    """LLM.generate of `requests` on a fresh engine built like the server's, after a warm-up."""
    from engine import LLM, SamplingParams
    from engine.serve.prompts import resolve_template

    template = resolve_template(args.chat_template or "auto", model)  # the server's own choice
    kwargs = dict(dtype=dtype, device=device, max_num_seqs=args.max_num_seqs, progress=False)
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    llm = LLM(model, **kwargs)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=args.ignore_eos)
    llm.generate([offline_prompt(r, template) for r in warmup], params, use_tqdm=False)
    prompts = [offline_prompt(r, template) for r in requests]
    start, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False, errors="return")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    del llm
    gc.collect()
    ok = [o for o in outs if o.finish_reason != "error"]
    tokens = sum(len(o.outputs[0].token_ids) for o in ok)
    return {
        "chat_template": template,
        "completed": len(ok),
        "failed": len(outs) - len(ok),
        "duration_s": wall,
        "cpu_s": cpu,
        "request_throughput": len(ok) / wall,
        "output_throughput": tokens / wall,
        "total_output_tokens": tokens,
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text if o.finish_reason != "error" else None for o in outs],
    }


# ---- the command line -------------------------------------------------------------------------


def positive_list(kind, name: str):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(v > 0 for v in values):
            raise argparse.ArgumentTypeError(
                f"{name} takes positive numbers separated by commas, got {text!r}"
            )
        return values

    return parse


def positive(kind, zero: bool = False):
    """An argparse type: a number of `kind` above 0 (or at least 0 with `zero`); inf and nan refused."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            what = "a non-negative" if zero else "a positive"
            raise argparse.ArgumentTypeError(f"expected {what} {kind.__name__}, got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/serve.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n  0  done (failed requests are in the figures)\n"
        "  1  the server did not start or failed the warm-up\n  2  bad usage\n  130  interrupted",
    )
    server = ap.add_mutually_exclusive_group()
    server.add_argument(
        "--base-url", help="a running server, e.g. http://127.0.0.1:8000 (no offline comparison)"
    )
    server.add_argument(
        "--model",
        help="checkpoint folder: start `python -m engine.serve` on it (default: a tiny "
        "random Qwen-VL in a temporary folder)",
    )
    sweep = ap.add_mutually_exclusive_group()
    sweep.add_argument(
        "--request-rate",
        type=positive_list(float, "--request-rate"),
        help="requests/s of Poisson arrivals, one setting each, e.g. 1,4,inf",
    )
    sweep.add_argument(
        "--max-concurrency",
        type=positive_list(int, "--max-concurrency"),
        help="requests in flight at most, one setting each (default 1,4,16)",
    )
    ap.add_argument("--num-prompts", type=positive(int), default=32, help="requests per setting")
    ap.add_argument("--max-tokens", type=positive(int), default=32, help="max_tokens of each request")
    ap.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (a fixed output length)")
    ap.add_argument(
        "--rounds",
        type=positive(int),
        help="runs of the saturation setting, each right after LLM.generate of its requests (default 3)",
    )
    ap.add_argument("--seed", type=int, default=0, help="pictures, questions and Poisson arrivals")
    ap.add_argument("--timeout", type=positive(float), default=120.0, help="seconds per request")
    ap.add_argument("--deadline", type=positive(float), default=1800.0, help="seconds for the whole run")
    ap.add_argument("--served-model-name", help="the request's model (default: the first of GET /v1/models)")
    ap.add_argument(
        "--max-num-seqs",
        type=positive(int),
        help="the started server's and the offline engine's "
        "(default: the largest --max-concurrency, else 16)",
    )
    ap.add_argument(
        "--max-model-len", type=positive(int), help="the started server's and the offline engine's"
    )
    ap.add_argument(
        "--chat-template", choices=("chatml", "raw"), help="the started server's (default: its own)"
    )
    ap.add_argument(
        "--device", help="the started server's: cpu, cuda[:i], npu[:i] (default: the best available)"
    )
    ap.add_argument("--dtype", help="the started server's (default: float32 on cpu, bfloat16 otherwise)")
    ap.add_argument(
        "--threads",
        type=positive(int, zero=True),
        help="torch CPU threads of the started server and offline engine (default 1 on cpu; 0: torch's own)",
    )
    ap.add_argument("--output-json", help="write the figures and per-request timings here")
    ap.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.base_url:
        if not re.match(r"https?://[^/\s]+", args.base_url):
            ap.error(f"--base-url must look like http://HOST:PORT, got {args.base_url!r}")
        args.base_url = re.sub(r"/v1$", "", args.base_url.rstrip("/"))
        for flag in SERVER_FLAGS:
            if getattr(args, flag) is not None:
                ap.error(
                    f"--{flag.replace('_', '-')} sets up the server this script starts; with --base-url it "
                    "does nothing: leave it out"
                )
    if args.model and not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there; give a checkpoint folder")
    if args.rounds is None:
        args.rounds = 1 if args.base_url else 3
    if not args.request_rate and not args.max_concurrency:
        args.max_concurrency = [1, 4, 16]
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.max_concurrency) if args.max_concurrency else 16
    return args


def setting_label(args, value) -> str:
    return f"concurrency {value}" if args.max_concurrency else f"rate {value:g}/s"


def print_table(settings: list[dict]) -> None:
    from tabulate import tabulate

    def num(x, fmt=",.1f"):
        return "-" if x is None else format(x, fmt)

    rows = [
        ["requests done / failed"]
        + [f"{s['metrics']['completed']} / {s['metrics']['failed']}" for s in settings],
        ["duration (s)"] + [num(s["metrics"]["duration_s"], ".2f") for s in settings],
        ["request throughput (req/s)"] + [num(s["metrics"]["request_throughput"], ".2f") for s in settings],
        ["output throughput (tok/s)"] + [num(s["metrics"]["output_throughput"]) for s in settings],
        ["input / output tokens"]
        + [f"{s['metrics']['total_input_tokens']} / {s['metrics']['total_output_tokens']}" for s in settings],
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append([f"{name} {stat} (ms)"] + [num(s["metrics"][key][stat]) for s in settings])
    rows.append(["server CPU (s)"] + [num(s["server_cpu_s"], ".2f") for s in settings])
    rows.append(["client CPU (s)"] + [num(s["client_cpu_s"], ".2f") for s in settings])
    print(
        tabulate(
            rows,
            headers=["", *(s["setting"] for s in settings)],
            disable_numparse=True,
            colalign=("left", *["right"] * len(settings)),
        )
    )
    for s in settings:
        for err in s["metrics"]["errors"][:3]:
            print(f"  {s['setting']}: failed: {err}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return bench(args)
    except BenchError as e:
        print(f"benchmarks/serve.py: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("benchmarks/serve.py: interrupted (the server started here is stopped)", file=sys.stderr)
        return 130


def bench(args) -> int:
    started = time.perf_counter()
    deadline = started + args.deadline
    values = args.max_concurrency or args.request_rate
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "settings": []}
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    server = None
    try:
        if args.base_url:
            base, model, device, dtype = args.base_url, None, None, None
        else:
            server, model, device, dtype = start_server(args, work, deadline)
            base = server.url
        name = args.served_model_name or served_model(base, headers)
        url = base + "/v1/chat/completions"
        report |= {"base_url": base, "model": name, "machine": machine(device)}

        # requests: the warm-up's, then each setting's (the saturation setting's once per round)
        saturation = values.index(max(values))
        rounds = [args.rounds if k == saturation and model is not None else 1 for k in range(len(values))]
        n = args.num_prompts
        made = iter(make_requests(work / "photos", WARMUP_REQUESTS + n * sum(rounds), args.seed))
        warmup = [next(made) for _ in range(WARMUP_REQUESTS)]
        sets = [[[next(made) for _ in range(n)] for _ in range(r)] for r in rounds]
        ignore_eos = warm_up(args, url, name, headers, warmup, deadline)

        def serve(requests: list[BenchRequest], value, seed: int) -> dict:
            label = setting_label(args, value)
            print(f"{label}: {n} requests ...", flush=True)
            bodies = [chat_body(r, name, args.max_tokens, ignore_eos) for r in requests]
            cpu0, client0 = server.cpu_seconds() if server else None, time.process_time()
            rate, concurrency = (None, value) if args.max_concurrency else (value, None)
            results, duration = asyncio.run(
                run_setting(url, bodies, rate=rate, concurrency=concurrency, seed=seed, timeout=args.timeout,
                            deadline=deadline, headers=headers, progress=not args.disable_tqdm)
            )  # fmt: skip
            return {
                "setting": label,
                "metrics": summarize(results, duration),
                "server_cpu_s": delta(server.cpu_seconds(), cpu0) if server else None,
                "client_cpu_s": time.process_time() - client0,
                "requests": [request_record(r) for r in results],
            }

        served, offline = [], []  # the saturation setting's rounds, and LLM.generate right before each
        for k, value in enumerate(values):
            for requests in sets[k]:
                if k == saturation and model is not None:
                    cpu0 = server.cpu_seconds()
                    print(f"offline: LLM.generate of the next {n} requests ...", flush=True)
                    offline.append(run_offline(model, args, device, dtype, warmup, requests))
                    offline[-1]["server_cpu_s"] = delta(server.cpu_seconds(), cpu0)
                record = serve(requests, value, args.seed + k)
                if k == saturation:
                    served.append(record)
            # several rounds: the fastest in the table, since other jobs on the host only slow a run down
            if len(sets[k]) > 1:
                record = best(served, lambda r: r["metrics"]["output_throughput"])
                record = record | {"setting": f"{record['setting']} (best of {len(served)})"}
            report["settings"].append(record)
            report |= {"saturation_rounds": served, "offline": offline} if offline else {}
            write_json(args.output_json, report)

        print(f"\n{report['machine']}")
        print(
            f"requests: {n} per setting, each a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG as a data: URL and a "
            f"question, max_tokens {args.max_tokens}{', ignore_eos' if ignore_eos else ''}, temperature 0, "
            f"streamed; {'Poisson arrivals' if args.request_rate else 'all available at t=0'}"
        )
        print_table(report["settings"])
        if offline:
            report["overhead"] = print_overhead(args, values[saturation], served, offline)
        write_json(args.output_json, report)
        print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def start_server(args, work: Path, deadline: float) -> tuple[ServerProcess, Path, str, str]:
    """`python -m engine.serve` on --model, or on a tiny random Qwen-VL written into `work`; this
    process's torch threads set as the server's, for the offline runs."""
    from engine import DeviceError, resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise BenchError(f"--device {args.device}: {e}", code=2) from None
    dtype = args.dtype or ("float32" if device.startswith("cpu") else "bfloat16")
    if args.model:
        model = Path(args.model)
    else:
        from engine import tiny_config, write_random_checkpoint

        model = write_random_checkpoint(work / "tiny-qwen-vl", tiny_config(), seed=0)
        print(f"model: a tiny random Qwen-VL in {model} (removed at the end)")
    if args.threads is None:
        args.threads = 1 if device.startswith("cpu") else 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    server = ServerProcess(model, args, device, dtype)
    try:
        server.wait_listening(min(SERVER_START_S, deadline - time.perf_counter()))
    except BenchError:
        server.stop()
        raise
    print(f"server: {' '.join(server.cmd)} -> {server.url}")
    return server, model, device, dtype


def warm_up(args, url: str, name: str, headers: dict, warmup: list[BenchRequest], deadline: float) -> bool:
    """Two short requests, not counted; whether requests carry ignore_eos (False when asked for and the
    server answers it with HTTP 400). A failed warm-up is a BenchError: nothing would be measured."""
    ignore_eos = args.ignore_eos
    for attempt in (0, 1):
        bodies = [chat_body(r, name, 4, ignore_eos) for r in warmup]
        done, _ = asyncio.run(
            run_setting(url, bodies, concurrency=1, timeout=args.timeout, deadline=deadline, headers=headers)
        )
        failed = [r.error for r in done if not r.success]
        if attempt == 0 and ignore_eos and failed and failed[0].startswith("HTTP 400"):
            print(f"note: the server refused ignore_eos ({failed[0][:120]}); requests go without it")
            ignore_eos = args.ignore_eos = False
            continue
        if failed:
            hint = AUTH_HINT * failed[0].startswith("HTTP 401")
            raise BenchError(f"the warm-up request to {url} failed: {failed[0]}{hint}")
        return ignore_eos
    raise AssertionError("unreachable")


def delta(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else now - before


def listed(values: list[float]) -> str:
    return ", ".join(f"{x:,.1f}" for x in values)


def best(runs: list[dict], key) -> dict:
    return max(runs, key=lambda r: key(r) or 0)


def print_overhead(args, value, served: list[dict], offline: list[dict]) -> dict:
    """The server at saturation against LLM.generate of the same requests, run right before it, over
    --rounds rounds (fresh pictures each): the fastest of each side, since other jobs on the host only
    ever slow a run down. Also per CPU second (the server process's against this process's during
    generate), which such jobs disturb far less than the wall time."""
    tps = [r["metrics"]["output_throughput"] or 0.0 for r in served]
    offline_tps = [o["output_throughput"] for o in offline]
    ratio = max(tps) / max(offline_tps)
    cpu_ratio = None
    if all(r["server_cpu_s"] for r in served) and all(o["cpu_s"] for o in offline):
        server_per_cpu = max(r["metrics"]["total_output_tokens"] / r["server_cpu_s"] for r in served)
        cpu_ratio = server_per_cpu / max(o["total_output_tokens"] / o["cpu_s"] for o in offline)
    same_prompts, agree, total = True, 0, 0
    for r, o in zip(served, offline, strict=True):
        same_prompts &= [q["prompt_tokens"] for q in r["requests"]] == o["prompt_tokens"]
        agree += sum(q["success"] and q["text"] == t for q, t in zip(r["requests"], o["texts"], strict=True))
        total += len(o["texts"])
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    fast = best(served, lambda r: r["metrics"]["output_throughput"])
    ref = best(offline, lambda o: o["output_throughput"])
    m = fast["metrics"]
    print(
        f"\n== server vs offline LLM.generate on the same requests: max_num_seqs {args.max_num_seqs}, "
        f"threads {args.threads or 'torch default'}, {len(served)} round(s), the fastest of each side =="
    )
    print(
        f"offline: {ref['output_throughput']:,.1f} output tok/s, {ref['request_throughput']:.2f} req/s "
        f"({ref['duration_s']:.2f} s, {ref['cpu_s']:.2f} CPU s; the idle server used "
        f"{ref['server_cpu_s'] or 0:.2f} CPU s meanwhile); rounds: {listed(offline_tps)}"
    )
    print(
        f"server:  {m['output_throughput']:,.1f} output tok/s, {m['request_throughput']:.2f} req/s at "
        f"{setting_label(args, value)} ({m['duration_s']:.2f} s, {fast['server_cpu_s'] or 0:.2f} CPU s); "
        f"rounds: {listed(tps)}"
    )
    print(
        f"prompt tokens: {'the same' if same_prompts else 'DIFFERENT'} on both sides; identical greedy "
        f"answers: {agree} of {total}; failed: server {sum(r['metrics']['failed'] for r in served)}, "
        f"offline {sum(o['failed'] for o in offline)}"
    )
    if cpu_ratio is not None:
        print(f"server / offline output tokens per CPU second: {cpu_ratio:.1%}")
    print(f"server / offline output throughput: {ratio:.1%}   target >= {TARGET:.0%}: {verdict}")
    return {
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "target": TARGET,
        "verdict": verdict,
        "same_prompt_tokens": same_prompts,
        "identical_answers": agree,
        "compared": total,
    }


def machine(device: str | None) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"machine: {os.cpu_count()} CPUs (load average {load}), python {platform.python_version()}"
    if device:
        import torch
        from engine_generate import device_name

        text += f", torch {torch.__version__}, server device {device}: {device_name(device)}"
    return text


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
